"""Train stage: QLoRA fine-tuning of a causal LM with trl's SFTTrainer, peft and bitsandbytes.

    python -m stages.train --config runs/demo/config.yaml                                    # local
    docker compose run --rm train python -m stages.train --config runs/demo/config.yaml      # container, GPU
    docker compose run --rm train-cpu python -m stages.train --config runs/demo/config.yaml  # container, CPU
    python -m stages.train --config C --set training.gpus=2             # DDP, relaunched under torchrun
    invoke stage train --gpus 2 --nodes 2 --node-rank 0 --main-address HOST --config C     # multi-node

Reads the base model (model.*) and the rows (data.*), loads the base in 4-bit NF4 with double
quantization (quantization.*), adds LoRA adapters (lora.*) and trains them (training.*). The
same code runs on CUDA and on the CPU: bitsandbytes has a CPU backend for NF4 and 8-bit AdamW.
Writes runs/<run>/adapter/ (adapter weights, config, tokenizer, loss log) and keeps resumable
checkpoints (adapter, optimizer, scheduler, RNG states) in runs/<run>/checkpoints/. With
training.gpus x training.nodes > 1 the stage re-runs itself under torchrun (stages/common/launch.py);
global rank 0 writes the outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from stages.common import fsdp, gpu_fit, heldout, launch, monitoring, names, specs
from stages.common.artifacts import check_free_disk, sha256_file, stage_output, write_json_atomic
from stages.common.checkpoints import latest_checkpoint
from stages.common.cli import StageContext, context, stage_parser
from stages.common.config import PipelineConfig
from stages.common.data import check_report, drop_too_long, train_and_held_out, train_files
from stages.common.errors import StageError, console, run_stage
from stages.common.losswatch import LossWatch, NonFiniteLoss
from stages.common.model import resolve
from stages.common.sampler import BalancedLengthSampler

GPU_FIX = (
    "training.device is 'cuda' but no CUDA GPU is visible; give the container a GPU "
    "(compose: the train service's deploy.resources.reservations.devices; docker run: --gpus all; "
    "host: install the NVIDIA driver and nvidia-container-toolkit), or set training.device=cpu"
)

SPEC = specs.spec(names.TRAIN)


# --- Setup ---------------------------------------------------------------------------------


def pick_device(cfg: PipelineConfig) -> str:
    """'cuda' or 'cpu'; fails fast when CUDA is asked for and cannot be used."""
    import torch

    want = cfg.training.device
    has_cuda = torch.cuda.is_available()
    if want == "cuda" and not has_cuda:
        raise StageError(GPU_FIX)
    device = "cuda" if (want == "cuda" or (want == "auto" and has_cuda)) else "cpu"
    if device == "cuda" and cfg.quantization.load_in_4bit:
        check_bnb_cuda()
    return device


def check_bnb_cuda() -> None:
    """bitsandbytes must have loaded its CUDA library; its CPU fallback would be silently slow."""
    from bitsandbytes import cextension

    if cextension.BNB_BACKEND != "CUDA" or not getattr(cextension.lib, "compiled_with_cuda", False):
        raise StageError(
            f"bitsandbytes loaded its {cextension.BNB_BACKEND} backend, not CUDA "
            f"(library: {type(cextension.lib).__name__}); install a bitsandbytes build matching torch's CUDA "
            "(python -m bitsandbytes shows the diagnosis)"
        )


def load_tokenizer(path: Path, cfg: PipelineConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    if tok.pad_token is None:
        # The reference recipe pads with EOS. That is safe here: labels are masked by the attention
        # mask, not by token id, so the real EOS at the end of each row stays a label.
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def prepare_rows(cfg: PipelineConfig, tokenizer) -> tuple[list, list, dict[str, Any]]:
    split = train_and_held_out(cfg.data, cfg.training.seed)
    report = split.train_report
    train = drop_too_long(split.train, tokenizer, cfg.data.max_seq_length, report)
    check_report(report, cfg.data.max_bad_fraction, "training data")
    stats = {"train_rows": len(train), "eval_rows": len(split.held_out), "dropped_malformed": report.malformed}
    stats["dropped_too_long"] = report.too_long
    if report.dropped:
        console.print(
            f"dropped {report.dropped} of {report.total} training rows ({report.malformed} malformed, "
            f"{report.too_long} over {cfg.data.max_seq_length} tokens)"
        )
    held = split.held_out
    if split.held_out_report is not None:
        held = drop_too_long(held, tokenizer, cfg.data.max_seq_length, split.held_out_report)
    return train, held, stats


def data_digests(cfg: PipelineConfig) -> dict[str, str]:
    return {f: sha256_file(Path(f)) for f in [*train_files(cfg.data), *cfg.data.eval_files]}


def training_digest(cfg: PipelineConfig, data: dict[str, str]) -> str:
    """What a checkpoint must have been trained with to be resumed (`data`: the files' sha256)."""
    parts = {k: cfg.model_dump(mode="json")[k] for k in ("model", "data", "quantization", "lora", "training")}
    for key in launch.LAUNCH_ONLY_FIELDS:
        parts["training"].pop(key)
    parts["files"] = data
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# --- The trainer (shared with benchmarks/train_throughput.py) -------------------------------


def load_model(path: Path, cfg: PipelineConfig, device: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = cfg.quantization
    compute = getattr(torch, q.compute_dtype)
    quant = None
    if q.load_in_4bit:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=compute,
            # FSDP flattens and shards parameters of one dtype: the packed 4-bit weights are stored
            # in the compute dtype's bytes so that they can be sharded with the rest.
            **({"bnb_4bit_quant_storage": compute} if cfg.training.fsdp else {}),
        )
    local_rank = launch.local_rank()
    device_map = {"": f"cuda:{local_rank}"} if device == "cuda" else {"": "cpu"}
    if cfg.training.fsdp and fsdp.prequantized(path):
        device_map = {"": "cpu"}  # may not fit one GPU: FSDP moves each rank's shard (stages/common/fsdp.py)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quant,
        dtype=compute,
        device_map=device_map,
        use_safetensors=True,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if cfg.training.fsdp and device == "cuda" and q.load_in_4bit:
        fsdp.quant_states_to(model, f"cuda:{local_rank}")
    return model


def sft_config(cfg: PipelineConfig, output_dir: Path, device: str, has_eval: bool):
    from trl import SFTConfig

    t = cfg.training
    # transformers >= 5.19 names the length-grouped sampler; older releases take group_by_length.
    if "train_sampling_strategy" in SFTConfig.__dataclass_fields__:
        sampler = {"train_sampling_strategy": "group_by_length" if t.group_by_length else "random"}
    else:
        sampler = {"group_by_length": t.group_by_length}
    return SFTConfig(
        **sampler,
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
        lr_scheduler_type=t.lr_scheduler,
        optim=t.optim,
        bf16=t.bf16,
        fp16=t.fp16,
        use_cpu=device == "cpu",
        # Under FSDP, checkpointing is the FSDP plugin's (fsdp_args); the Trainer refuses both at once.
        gradient_checkpointing=t.gradient_checkpointing and not t.fsdp,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing and not t.fsdp else None,
        packing=t.packing,
        use_liger_kernel=t.liger_kernel,
        activation_offloading=t.activation_offloading,
        torch_compile=t.torch_compile,
        max_length=cfg.data.max_seq_length,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        eval_strategy=("steps" if t.eval_steps else "no") if has_eval else "no",
        eval_steps=t.eval_steps,
        seed=t.seed,
        data_seed=t.seed,
        report_to=cfg.training.report_to,  # tensorboard: runs/<run>/tensorboard (monitoring.py)
        # LoRA leaves most parameters frozen; DDP's unused-parameter scan would only cost a pass.
        ddp_find_unused_parameters=False,
        **fsdp_args(cfg),
        include_num_input_tokens_seen="non_padding",
        logging_nan_inf_filter=False,  # a host sync per step; a non-finite loss stops the stage anyway
        dataset_num_proc=None,
        disable_tqdm=False,
    )


def fsdp_args(cfg: PipelineConfig) -> dict[str, Any]:
    """FSDP through accelerate (transformers' Trainer builds the plugin from these), for a 4-bit base
    too big for one GPU: decoder layers wrapped one by one, full shard, frozen and trainable
    parameters side by side (use_orig_params), rank 0 reading the checkpoint."""
    if not cfg.training.fsdp:
        return {}
    return {
        "fsdp": True,
        "fsdp_config": {
            "reshard_after_forward": True,  # full shard (FSDP2)
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "use_orig_params": True,
            "cpu_ram_efficient_loading": True,
            "sync_module_states": True,
            "activation_checkpointing": cfg.training.gradient_checkpointing,
        },
    }


def peft_config(cfg: PipelineConfig):
    from peft import LoraConfig

    lo = cfg.lora
    return LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        bias=lo.bias,
        target_modules=list(lo.target_modules),
        use_rslora=lo.use_rslora,
        task_type="CAUSAL_LM",
    )


def build_trainer(
    cfg: PipelineConfig, model_path: Path, tokenizer, train_rows, eval_rows, output_dir: Path, device: str
):
    """Model, adapters, data and trainer, exactly as the train stage runs them."""
    from datasets import Dataset
    from trl import SFTTrainer

    class CheckedSFTTrainer(SFTTrainer):
        """Stops at the first non-finite loss, before any later checkpoint (stages/common/losswatch.py);
        groups rows by length with equal tokens per rank (stages/common/sampler.py)."""

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if not cfg.training.group_by_length or dataset is None:
                return super()._get_train_sampler(train_dataset)
            lengths = [len(ids) for ids in dataset["input_ids"]]
            per_rank = self.args.per_device_train_batch_size
            return BalancedLengthSampler(lengths, per_rank, max(1, self.args.world_size), cfg.training.seed)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            # peft reloads adapter weights in float32, while trl trains QLoRA adapters in bf16: without
            # this cast a resumed run would continue in another dtype and drift from the uninterrupted
            # one (tests/test_train.py compares the two).
            target = model or self.model
            dtypes = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad}
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            for n, p in target.named_parameters():
                if n in dtypes and p.dtype != dtypes[n]:
                    p.data = p.data.to(dtypes[n])

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.loss_watch.push(loss, self.state.global_step + 1)
            return loss

        def _save_checkpoint(self, model, trial):
            self.loss_watch.drain()
            super()._save_checkpoint(model, trial)

    model = load_model(model_path, cfg, device)
    trainer = CheckedSFTTrainer(
        model=model,
        args=sft_config(cfg, output_dir, device, bool(eval_rows)),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=peft_config(cfg),
    )
    trainer.loss_watch = LossWatch()
    if cfg.training.fused_lora:
        from stages.common import fused_lora

        fused_lora.apply(trainer.model)
    return trainer


# --- The stage -------------------------------------------------------------------------------


def train(ctx: StageContext, argv: list[str]) -> int | None:
    cfg, layout, run_dir = ctx.cfg, ctx.layout, ctx.run_dir
    if not launch.inside_launcher():
        plan = launch.plan(cfg.training)
        if plan.world_size > 1:
            return launch.relaunch(plan, "stages.train", argv)  # each rank comes back here, under torchrun
    if not launch.inside_launcher() and "CUDA_VISIBLE_DEVICES" not in os.environ:
        # One process seeing several GPUs would make Trainer wrap the model in nn.DataParallel,
        # which 4-bit models do not support; several GPUs go through torchrun (training.gpus).
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"
    main_rank = launch.is_main()

    # Setup: everything that can fail cheaply fails here, before the model is loaded.
    monitoring.prepare_training_output(cfg, layout)
    device = pick_device(cfg)
    resolved = resolve(cfg.model)
    if device == "cuda":
        gpu_fit.check_train_fits(cfg, resolved.path)
    tokenizer = load_tokenizer(resolved.path, cfg)
    train_rows, eval_rows, data_stats = prepare_rows(cfg, tokenizer)
    check_free_disk(run_dir, 2 << 30, "adapter and checkpoints")
    SPEC.check_memory(cfg, layout, base=resolved.path, device=device)
    ckpt_dir = layout.checkpoints
    data_sha = data_digests(cfg)  # hashed once: the resume check and the manifest both need it
    resume = latest_checkpoint(ckpt_dir, training_digest(cfg, data_sha), manage=main_rank)
    console.print(
        f"device: {device}; bitsandbytes 4-bit: {cfg.quantization.load_in_4bit}; "
        f"rows: {len(train_rows)} train, {len(eval_rows)} eval; resume: {resume.name if resume else 'no'}"
    )

    # Run. Every rank trains and evaluates; global rank 0 alone writes.
    output = stage_output(run_dir, names.TRAIN, owned=(names.ADAPTER_DIR,)) if main_rank else nullcontext()
    with output as out:
        trainer = build_trainer(cfg, resolved.path, tokenizer, train_rows, eval_rows, ckpt_dir, device)
        bnb_backend = None
        if cfg.quantization.load_in_4bit:
            from bitsandbytes import cextension

            bnb_backend = cextension.BNB_BACKEND
            if device == "cuda":
                check_bnb_cuda()
        try:
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            trainer.loss_watch.drain()
        except NonFiniteLoss as exc:
            raise StageError(
                f"training stopped: {exc} (no checkpoint written after it); lower training.learning_rate, "
                "check the data, or keep quantization.compute_dtype=bfloat16"
            ) from None
        eval_loss = trainer.evaluate()["eval_loss"] if eval_rows else None
        adapter_state = fsdp.full_adapter_state(trainer.model) if cfg.training.fsdp else None
        if out is None:
            return None
        adapter_dir = out.path(layout.adapter)
        trainer.model.save_pretrained(adapter_dir, state_dict=adapter_state, safe_serialization=True)
        tokenizer.save_pretrained(adapter_dir)
        losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
        out.path(layout.training_log).write_text(json.dumps(trainer.state.log_history, indent=1))
        write_json_atomic(out.path(layout.split), heldout.split_record(cfg, train_rows, eval_rows))

        # Cleanup: the manifest records what went in and what came out.
        tokens = int(trainer.state.num_input_tokens_seen or 0)
        runtime_s = result.metrics.get("train_runtime", 0.0)
        out.commit(
            inputs={
                "model": str(resolved.path),
                "model_source": resolved.source,
                "model_revision": resolved.revision or cfg.model.revision,
                "data": data_sha,
                "resumed_from": resume.name if resume else None,
            },
            metrics={
                "device": device,
                "bitsandbytes_backend": bnb_backend,  # the kernels the 4-bit base ran on (CUDA on a GPU)
                "steps": trainer.state.global_step,
                "first_loss": losses[0][1] if losses else None,
                "final_loss": losses[-1][1] if losses else None,
                "eval_loss": eval_loss,
                "train_runtime_s": runtime_s,
                "tokens_trained": tokens,
                "tokens_per_s": round(tokens / runtime_s, 1) if runtime_s else None,
                "loss_curve": losses,
                **data_stats,
            },
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = stage_parser("python -m stages.train", __doc__).parse_args(argv)
    return run_stage(names.TRAIN, lambda: train(context(args), argv))


if __name__ == "__main__":
    raise SystemExit(main())
