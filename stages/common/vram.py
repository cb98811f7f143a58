"""GPU memory of the train stage, estimated before the model is loaded.

    est = estimate(Shapes.from_config(config_json), TrainSetup.of(cfg))
    est.total            # bytes, comparable with torch.cuda.max_memory_allocated()
    est.parts            # {"base weights": ..., "adapter": ..., "optimizer": ..., "activations": ...}

The estimate counts what a QLoRA step keeps on the GPU for a llama-style decoder (Llama, Mistral,
Qwen2: q/k/v/o and gate/up/down projections, RMSNorm, SwiGLU), for a micro-batch whose rows are all
`data.max_seq_length` tokens long (length-grouped batches are padded to their longest row, so the
peak batch is that long as soon as a few rows are):

- frozen base: linear weights at 4 + 8/64 + 32/(64·256) bits per weight in NF4 with double
  quantization (4.5 without), or 16 bits without 4-bit loading; embeddings and an untied lm_head
  at 16 bits;
- adapter: LoRA A and B in the compute dtype with their gradients; the optimizer's states (8-bit:
  2 bytes per parameter; 32-bit AdamW: 8; paged optimizers keep theirs in CUDA managed memory,
  which torch does not count and the driver evicts to the host under pressure);
- activations, per token, as autograd saves them for backward: without checkpointing every layer's
  (RMSNorm inputs in float32, or in 16 bits with Liger; SDPA's q, k, v and output with k and v
  repeated to every head; SwiGLU's gate, activation and up projection, two of those with Liger;
  each adapted module's input, plus its dropout mask with LoRA dropout); with checkpointing one
  16-bit hidden state per layer plus one layer recomputed during backward; plus the backward's
  own gradients of the widest layer; plus the loss: 10 bytes per vocabulary entry (16-bit logits,
  their float32 copy, and the float32 log-softmax kept for backward) or, with Liger's fused linear
  cross-entropy, chunks of an eighth of the tokens.

Checked against every measured configuration: tests/test_vram.py lists each point with its
benchmarks/results file, and docs/gpu-memory.md has the table.

Not modelled, because not measured: activation offloading (counted as keeping one layer's
activations), 32-bit optimizers, FSDP's sharding (the base divided by the GPUs), architectures
other than llama-style decoders (estimate() returns None for them). torch.compile and fused LoRA
measured equal to eager peft and are not terms.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1 << 30
ENV_SKIP = "KILN_SKIP_MEMORY_CHECK"  # the same switch as the host-RAM preflight (preflight.py)
# Held back from the card's free memory: the caching allocator's slack (reserved minus allocated;
# docs/gpu-memory.md has the measured range) and cuBLAS/NCCL workspaces outside torch's count.
HEADROOM = 1 * GiB
CUDA_CONTEXT = GiB // 2  # what the CUDA context takes when the train stage starts (not yet counted by nvidia-smi)
NF4_BITS = {True: 4 + 8 / 64 + 32 / (64 * 256), False: 4 + 32 / 64}  # by double_quant
LOGITS_BYTES = 10  # per token and vocabulary entry without Liger: 2 + 4 + 4 (see above)
LIGER_CHUNKS = 8  # Liger's fused cross-entropy computes the logits of 1/8 of the tokens at a time (V/H ~ 8)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shapes:
    """A llama-style decoder's sizes, from its config.json."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> Shapes | None:
        """None when the config is not a llama-style decoder's (no intermediate_size, say)."""
        config = config.get("text_config", config)
        try:
            h, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(
                hidden=h,
                intermediate=int(config["intermediate_size"]),
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or h // heads),
                vocab=int(config["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.projections().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + (2 * self.layers + 1) * self.hidden

    def lora_params(self, r: int, targets: list[str]) -> int:
        return self.layers * sum(r * (a + b) for m, (a, b) in self.projections().items() if m in set(targets))


@dataclass(frozen=True)
class TrainSetup:
    """What of the config decides the train stage's GPU memory."""

    batch: int
    seq: int
    checkpointing: bool
    liger: bool
    offload: bool
    r: int
    targets: tuple[str, ...]
    dropout: bool
    optim: str
    load_in_4bit: bool
    double_quant: bool
    compute_bytes: int
    shards: int  # FSDP shards the base over the GPUs; 1 otherwise

    @classmethod
    def of(cls, cfg) -> TrainSetup:
        t, lo, q = cfg.training, cfg.lora, cfg.quantization
        targets = PROJECTIONS if lo.target_modules in (["all-linear"], "all-linear") else tuple(lo.target_modules)
        return cls(
            batch=t.batch_size,
            seq=cfg.data.max_seq_length,
            checkpointing=t.gradient_checkpointing,
            liger=t.liger_kernel,
            offload=t.activation_offloading,
            r=lo.r,
            targets=targets,
            dropout=lo.dropout > 0,
            optim=t.optim,
            load_in_4bit=q.load_in_4bit,
            double_quant=q.double_quant,
            compute_bytes=4 if q.compute_dtype == "float32" else 2,
            shards=t.gpus if t.fsdp else 1,
        )


@dataclass
class Estimate:
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{k} {v / GiB:.1f}" for k, v in self.parts.items()) + " GiB"


def optimizer_bytes_per_param(optim: str) -> float:
    if "paged" in optim:
        return 0.0  # CUDA managed memory: outside torch's count, evicted to the host under pressure
    if "8bit" in optim:
        return 2.0
    return 8.0


def layer_activation_bytes(s: Shapes, t: TrainSetup) -> int:
    """Bytes per token one decoder layer keeps for backward (no checkpointing)."""
    b, h, i = t.compute_bytes, s.hidden, s.intermediate
    norms = 2 * (b * h if t.liger else 4 * h)
    attention = 4 * b * s.q_dim  # q, k, v (repeated to every head) and the output
    mlp = (2 if t.liger else 3) * b * i
    ins = {m: a for m, (a, _) in s.projections().items() if m in t.targets}
    if t.dropout:  # each adapter drops out its own copy of its input, and keeps the mask (1 byte)
        lora = sum((b + 1) * a for a in ins.values())
    else:  # adapters that read the same tensor share it: q/k/v, gate/up
        groups = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}
        lora = sum(b * a for a in {groups.get(m, m): a for m, a in ins.items()}.values())
    lora += len(ins) * b * t.r  # lora_A's output, which lora_B keeps
    return norms + attention + mlp + lora


def activation_bytes_per_token(s: Shapes, t: TrainSetup) -> int:
    b = t.compute_bytes
    layer = layer_activation_bytes(s, t)
    if t.offload:
        kept = 0  # saved activations go to host memory
    elif t.checkpointing:
        kept = s.layers * b * s.hidden  # each layer's input
    else:
        kept = s.layers * layer
    final_norm = b * s.hidden if t.liger else 4 * s.hidden
    # The loss: 16-bit logits, float32 copy, log-softmax, gradient; or Liger's chunks and grad_input.
    loss = b * s.hidden + (4 + b) * s.vocab // LIGER_CHUNKS if t.liger else LOGITS_BYTES * s.vocab
    backward = 2 * b * (s.intermediate + s.hidden)  # gradients of the widest intermediates
    recompute = layer if (t.checkpointing or t.offload) else 0
    return kept + max(final_norm + loss, recompute + backward)


def estimate(s: Shapes, t: TrainSetup) -> Estimate:
    """Peak GPU memory of one training step, as torch counts it (max_memory_allocated)."""
    bits = NF4_BITS[t.double_quant] if t.load_in_4bit else 8 * t.compute_bytes
    lora = s.lora_params(t.r, list(t.targets))
    parts = {
        "base weights": int((s.linear_params * bits / 8 + s.embedding_params * t.compute_bytes) / t.shards),
        "adapter": lora * 2 * t.compute_bytes,  # weights and gradients
        "optimizer": int(lora * optimizer_bytes_per_param(t.optim)),
        "activations": t.batch * t.seq * activation_bytes_per_token(s, t),
    }
    return Estimate(parts)


def estimate_for(cfg, config: dict) -> Estimate | None:
    """estimate() for a PipelineConfig and the base model's config.json; None for other architectures."""
    shapes = Shapes.from_config(config)
    return estimate(shapes, TrainSetup.of(cfg)) if shapes else None


# --- The card ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total: int  # bytes
    free: int


def visible_gpus() -> list[Gpu]:
    """The NVIDIA GPUs this host (or container) sees, from nvidia-smi; no ML library imported.
    CUDA_VISIBLE_DEVICES narrows the list as it narrows what CUDA sees."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    query = ["--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run([smi, *query], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            gpus.append(Gpu(int(parts[0]), parts[1], int(parts[2]) << 20, int(parts[3]) << 20))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = [v.strip() for v in visible.split(",") if v.strip()]
        gpus = [g for g in gpus if str(g.index) in wanted]
    return gpus


def usable_bytes(free: int, context_counted: bool) -> int:
    """What a training run may plan to allocate out of `free` bytes."""
    return free - HEADROOM - (0 if context_counted else CUDA_CONTEXT)


# --- Which profile fits ---------------------------------------------------------------------------


def with_overrides(cfg, overrides: list[str]):
    """`cfg` with `--set`-style overrides applied on top (a new, validated PipelineConfig)."""
    from stages.common.config import validate_config
    from stages.common.config_tree import apply_overrides

    return validate_config(apply_overrides(cfg.model_dump(mode="json"), overrides), source="profile")


def candidates(cfg) -> list[tuple[str | None, object]]:
    """(profile name, config with it) from the fastest measured to the reference (None)."""
    from stages.common.profiles import by_speed

    return [(name, with_overrides(cfg, overrides)) for name, overrides in by_speed()]


def fitting_profile(cfg, config: dict, usable: int) -> tuple[str | None, Estimate] | None:
    """The fastest measured profile whose estimate fits in `usable` bytes, applied on top of `cfg`;
    None when none does."""
    for name, candidate in candidates(cfg):
        est = estimate_for(candidate, config)
        if est is not None and est.total <= usable:
            return name, est
    return None


def read_model_config(path: Path) -> dict | None:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
