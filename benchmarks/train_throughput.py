"""Train-stage throughput on CUDA: the reference recipe's configuration and the project's profiles,
measured in one run through the train stage's own code path (model loading, 4-bit quantization,
LoRA, trl's SFTTrainer with the stage's sampler and checks, collator, optimizer).

    python benchmarks/train_throughput.py [--profiles reference,24gb,12gb] [--steps 50]
    python benchmarks/train_throughput.py --profiles 24gb --gpus 2 --timing        # DDP, per-rank times
    python benchmarks/train_throughput.py --profiles 24gb --nodes 2                 # 2 one-GPU "nodes"
    python benchmarks/train_throughput.py --shape llama2-70b --gpus 2 --memory-cap-gib 24 \\
        --profiles 24gb-fsdp --steps 10                                            # FSDP, 24 GiB per GPU
    invoke bench-train

Model: Mistral-7B's exact shapes (`MistralConfig()` defaults) or a published Llama shape
(benchmarks/random_base.py), RANDOMLY INITIALISED, because the GPU hosts cannot download weights;
throughput and memory do not depend on the weights' values.
Data: a fixed synthetic token dataset, lengths log-normal with median 380 and mean 444 tokens
(sigma = sqrt(2 ln(444/380)) = 0.558), clipped to [16, 1024], seed 0; or `--lengths FILE` (a JSON
list of token lengths, e.g. a real dataset's).
Reported per profile: non-pad trained tokens/s over the timed steps (after warm-up), peak allocated
and reserved VRAM (the largest over the ranks), MFU per GPU, the loss at every step, and with
--timing where each rank's step time went (benchmarks/step_timing.py). One JSON per profile in
benchmarks/results/.

MFU = tokens/s x GFLOP per trained token / (989 TFLOP/s x GPUs). Mistral-7B with the reference LoRA:
30.6 GFLOP, the frozen 7.24 B-parameter base costing 2N forward + 2N backward (activation gradients
only: weights are frozen) = 29.0, LoRA and attention at the mean length the rest; other shapes use
the same count (gflop_per_token). 989 TFLOP/s: dense bf16 peak of an H100/H200 SXM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from stages.common.launch import Launch  # noqa: E402
from stages.common.profiles import PROFILES as USER_PROFILES  # noqa: E402

GFLOP_PER_TOKEN = 30.6  # Mistral-7B shapes, reference LoRA (module docstring)
PEAK_TFLOPS = 989.0
LENGTH_MEDIAN, LENGTH_MEAN, LENGTH_MAX, LENGTH_MIN = 380, 444, 1024, 16
# Non-pad tokens/s a plain PyTorch loop reached with these settings on one GPU; copied into each result.
REFERENCE_MEASURED = {"reference": 3250, "12gb": 2738, "24gb": 7599}

# Overrides on configs/mistral-7b-guanaco.yaml. The reference is the recipe as published; the
# profiles are the project's (stages/common/profiles.py); candidates are measured against them.
PROFILES: dict[str, list[str]] = {
    "reference": [],
    **USER_PROFILES,
    # The 24gb profile without and with training.fused_lora (which it now includes).
    "24gb-peft": [o for o in USER_PROFILES["24gb"] if o != "training.fused_lora=true"],
    "24gb-fused": [*USER_PROFILES["24gb"]],
    # Earlier or rejected candidates, kept so that the comparison can be rerun.
    "24gb-b32": ["training.batch_size=32", "training.gradient_checkpointing=true", "training.liger_kernel=true"],
    "24gb-offload": ["training.batch_size=32", "training.activation_offloading=true", "training.liger_kernel=true"],
    # FSDP over the GPUs, for bases larger than one GPU: batch 1 at the recipe's LoRA, checkpointing.
    "24gb-fsdp": [
        "training.fsdp=true",
        "training.optim=adamw_torch",
        "training.batch_size=1",
        "training.gradient_checkpointing=true",
        "lora.dropout=0.0",
    ],
    # Peak-VRAM points for the VRAM estimator (issue 14): checkpointing without Liger, and no checkpointing.
    "vram-b16-ckpt": ["training.batch_size=16", "training.gradient_checkpointing=true"],
    "vram-b8-nockpt": ["training.batch_size=8"],
}


def synthetic_lengths(rng, n: int):
    sigma = math.sqrt(2 * math.log(LENGTH_MEAN / LENGTH_MEDIAN))
    return rng.lognormal(math.log(LENGTH_MEDIAN), sigma, n).astype(int).clip(LENGTH_MIN, LENGTH_MAX)


def row_lengths(n: int, source: str, seed: int = 0) -> list[int]:
    """`n` row lengths: the synthetic distribution, or drawn (with replacement) from a JSON list."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if source == "synthetic":
        return synthetic_lengths(rng, n).tolist()
    pool = np.asarray(json.loads(Path(source).read_text()))
    return rng.choice(pool.clip(LENGTH_MIN, LENGTH_MAX), n).tolist()


def synthetic_rows(lengths: list[int], vocab: int, seed: int = 0) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(3, vocab, int(L)).tolist()} for L in lengths]


def padding_share(lengths: list[int], batch: int, world: int) -> float:
    """Pad tokens per real token with the train stage's sampler (stages/common/sampler.py) over
    `lengths`: the most that padding-free packing could save."""
    import numpy as np

    from stages.common.sampler import BalancedLengthSampler

    sampler = BalancedLengthSampler(lengths, batch, world)
    L = np.asarray(lengths)
    padded = sum(len(p) * int(L[p].max()) for rows in sampler.global_batches() for p in sampler.split(rows))
    return round(padded / int(L[np.concatenate(sampler.global_batches())].sum()) - 1, 4)


def gflop_per_token(config: dict, lora_r: int, targets: list[str], mean_len: float) -> float:
    """Frozen base 2N + 2N, LoRA 6 x its parameters, attention 12 x layers x hidden x length."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head = config.get("head_dim") or h // heads
    shapes = {"q_proj": (heads * head, h), "k_proj": (kv * head, h), "v_proj": (kv * head, h),
              "o_proj": (h, heads * head), "gate_proj": (inter, h), "up_proj": (inter, h),
              "down_proj": (h, inter)}  # fmt: skip
    base = layers * sum(o * i for o, i in shapes.values()) + 2 * config["vocab_size"] * h
    lora = layers * sum(lora_r * (o + i) for name, (o, i) in shapes.items() if name in targets)
    return (4 * base + 6 * lora + 12 * layers * h * mean_len) / 1e9


def random_mistral(path: Path) -> Path:
    """Mistral-7B's shapes with random weights, saved once as bf16 safetensors."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MistralForCausalLM(MistralConfig()).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    return path


def model_path(shape: str, workdir: Path) -> Path:
    name = {"mistral-7b": "mistral-7b-random", "tiny": "tiny-mistral", "tiny-nf4": "tiny-llama-nf4"}.get(
        shape, f"{shape.replace(':', '-L')}-nf4"
    )
    return workdir / name


def base_model(shape: str, workdir: Path) -> Path:
    """Write the random base once: Mistral-7B in bf16, a Llama shape in NF4, or the tests' tiny model
    (`tiny`: for a dry run of this script on the CPU)."""
    path = model_path(shape, workdir)
    if shape == "mistral-7b":
        return random_mistral(path)
    if shape == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import build_tiny_mistral

        return path if (path / "config.json").is_file() else build_tiny_mistral(path)
    from random_base import llama_config, tiny_config, write_prequantized

    if shape == "tiny-nf4":  # the FSDP path (a pre-quantized base loaded on the host) on the CPU
        return write_prequantized(path, tiny_config(), device="cpu")
    return write_prequantized(path, llama_config(shape))


def tokenizer_for(workdir: Path):
    """Any tokenizer serves: rows come pre-tokenized; the collator needs only pad/eos ids."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import train_sentencepiece
    from transformers import LlamaTokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "tokenizer.model").is_file():
        train_sentencepiece(workdir)
    tok = LlamaTokenizer.from_pretrained(workdir, legacy=False)
    tok.pad_token = tok.eos_token
    return tok


def run_profile(profile: str, args, model_dir: Path, trace: Path | None = None) -> dict:
    """One profile in this process (one rank), timed over args.steps after args.warmup; with `trace`,
    those steps run under torch.profiler and its kernel table is written there instead."""
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    from stages.common.config import load_config
    from stages.common.launch import local_rank, rank
    from stages.train import build_trainer, check_bnb_cuda

    cuda = torch.cuda.is_available()
    if args.memory_cap_gib and cuda:  # the consumer-card case on a bigger GPU: the allocator refuses past the cap
        total = torch.cuda.get_device_properties(local_rank()).total_memory
        torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * 2**30 / total, local_rank())
    warmup, steps = args.warmup, args.steps
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launch = [f"training.gpus={world}"]  # what torchrun started (the config's checks need it, e.g. FSDP)
    cfg = load_config(ROOT / "configs" / "mistral-7b-guanaco.yaml", [*launch, *PROFILES[profile], *args.set])
    t = cfg.training
    t.max_steps, t.save_steps, t.logging_steps = warmup + steps, 10**9, 1
    model_config = json.loads((model_dir / "config.json").read_text())
    tok = tokenizer_for(args.workdir / "tokenizer")
    if model_config["vocab_size"] < 32000:  # the tiny dry-run model: token ids must fit its vocabulary
        tok.pad_token_id = tok.eos_token_id = 2
    lengths = row_lengths((warmup + steps) * t.batch_size * t.gradient_accumulation_steps * world, args.lengths)
    rows = synthetic_rows(lengths, model_config["vocab_size"])
    trainer = build_trainer(cfg, model_dir, tok, rows, [], args.workdir / f"ckpt-{profile}", "cuda" if cuda else "cpu")
    if cuda:
        check_bnb_cuda()
    sync = torch.cuda.synchronize if cuda else lambda: None
    timing: dict = {}

    class Clock(TrainerCallback):
        """Times the steps after warm-up; peak memory over all steps (the longest batch comes first)."""

        def on_train_begin(self, _args, state, control, **kw):
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, _args, state, control, **kw):
            if state.global_step in (warmup, warmup + steps):
                sync()
                key = "0" if state.global_step == warmup else "1"
                timing.update({f"t{key}": time.perf_counter(), f"tok{key}": state.num_input_tokens_seen})

    class Trace(TrainerCallback):
        def on_step_end(self, _args, state, control, **kw):
            if state.global_step == warmup:
                self.prof = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                )
                self.prof.__enter__()
            if state.global_step == warmup + steps:
                torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                averages = self.prof.key_averages()
                table = averages.table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=70)
                trace.parent.mkdir(parents=True, exist_ok=True)
                head = f"{profile} {[*PROFILES[profile], *args.set]}, {steps} steps after {warmup}"
                trace.write_text(f"{head}\n{table}\n")

    trainer.add_callback(Clock())
    if trace is not None:
        trainer.add_callback(Trace())
    step_timing = None
    if args.timing:
        from step_timing import StepTiming

        step_timing = StepTiming(trainer, warmup, steps)
        trainer.add_callback(step_timing)
    trainer.train()
    if hasattr(trainer, "loss_watch"):  # absent when this script times an older train stage
        trainer.loss_watch.drain()
    if step_timing is not None:
        step_timing.write(timing_dir(args, profile, world))
    peaks = torch.tensor([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()] if cuda else [0, 0])
    peaks = peaks.to("cuda" if cuda else "cpu")
    if dist.is_initialized():
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    wrapped = trainer.model_wrapped
    sharded = sum(type(m).__name__.startswith("FSDP") for m in wrapped.modules())  # FSDP2: FSDP<Module> classes
    tokens = timing["tok1"] - timing["tok0"]
    tps = tokens / (timing["t1"] - timing["t0"])
    if model_config.get("model_type") == "mistral" and model_config["hidden_size"] == 4096:
        gflop = GFLOP_PER_TOKEN
    else:
        gflop = gflop_per_token(model_config, cfg.lora.r, cfg.lora.target_modules, sum(lengths) / len(lengths))
    return {
        "profile": profile,
        "overrides": [*PROFILES[profile], *args.set],
        "rank": rank(),
        "tokens_per_s": round(tps, 1),
        "timed_steps": steps,
        "warmup_steps": warmup,
        "timed_tokens": int(tokens),
        "peak_allocated_gib": round(float(peaks[0]) / 2**30, 2),
        "peak_reserved_gib": round(float(peaks[1]) / 2**30, 2),
        "peak_scope": "every training step, warm-up included (the epoch's longest batch is step 1)",
        "gflop_per_token": round(gflop, 2),
        "mfu_per_gpu": round(tps * gflop * 1e9 / (PEAK_TFLOPS * 1e12 * world), 4),
        "global_batch_rows": t.batch_size * t.gradient_accumulation_steps * world,
        "wrapper": type(wrapped).__name__,
        "fsdp_sharded_modules": sharded,
        "padding_share": padding_share(lengths, t.batch_size, world),
        "losses": losses,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }


def timing_dir(args, profile: str, world: int) -> Path:
    return args.workdir / f"timing-{profile}-w{world}{'-' + args.label if args.label else ''}"


def versions() -> dict:
    from stages.common.artifacts import package_versions

    return {
        **package_versions(("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "liger-kernel")),
        "python": platform.python_version(),
    }


def launch_profile(profile: str, args) -> dict:
    """Run one profile in fresh processes (each starts with an empty CUDA allocator); rank 0's result."""
    one = [__file__, "--one", profile, "--steps", str(args.steps), "--warmup", str(args.warmup), "--workdir",
           str(args.workdir), "--shape", args.shape, "--lengths", args.lengths,
           "--memory-cap-gib", str(args.memory_cap_gib or 0), *(["--trace"] if args.trace else []),
           *(["--timing"] if args.timing else []), "--out", str(args.out), "--label", args.label,
           *(a for o in args.set for a in ("--set", o))]  # fmt: skip
    procs, logs = [], []
    for node in range(args.nodes):
        gpus = [str(args.first_gpu + node * args.gpus + g) for g in range(args.gpus)]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
        if args.nodes * args.gpus == 1:
            cmd = [sys.executable, *one]
        else:  # the train stage's own launcher; nodes > 1: one torchrun per "node", over loopback
            cmd = Launch(args.nodes, args.gpus, node, "127.0.0.1", 29400 + args.first_gpu).torchrun(one)
        # Output to files as it comes: a profile killed at its time limit still shows how far it got.
        log = args.workdir / f"{profile}-node{node}{'-' + args.label if args.label else ''}.log"
        logs.append(log)
        with log.open("w") as fh:
            procs.append(subprocess.Popen(cmd, stdout=fh, stderr=fh, text=True, env=env, start_new_session=True))
    deadline = time.monotonic() + args.timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:  # each launcher leads its own process group: its ranks go with it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            print(logs[0].read_text()[-3000:], file=sys.stderr)
            return {"profile": profile, "error": f"timed out after {args.timeout} s"}
    out = logs[0].read_text()
    lines = [ln for ln in out.splitlines() if ln.startswith('{"profile"')]
    if any(p.returncode for p in procs) or not lines:
        for log in logs:
            print(log.read_text()[-3000:], file=sys.stderr)
        tail = (out.strip().splitlines() or ["no output"])[::-1]
        return {"profile": profile, "error": next((ln for ln in tail if "Error" in ln), tail[0])}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profiles", default="reference,24gb,12gb")
    # 50 steps: one length-grouped megabatch (50 batches) for every profile, so each is timed on a
    # full sample of the length distribution; shorter windows see a biased slice of it.
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-bench"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (processes) per node: > 1 runs DDP (or FSDP) via torchrun")
    p.add_argument("--nodes", type=int, default=1, help="nodes simulated on this host (loopback rendezvous)")
    p.add_argument("--first-gpu", type=int, default=0, help="index of the first GPU to use (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--shape", default="mistral-7b", help="mistral-7b, or a benchmarks/random_base.py shape")
    p.add_argument("--lengths", default="synthetic", help="'synthetic' or a JSON list of row lengths")
    p.add_argument("--memory-cap-gib", type=float, default=0, help="cap each process's CUDA allocator (0: none)")
    p.add_argument("--label", default="", help="added to the result file names")
    p.add_argument("--timeout", type=float, default=900, help="seconds per profile; its processes are killed after")
    p.add_argument("--set", action="append", default=[], help="extra config override for every profile")
    p.add_argument("--timing", action="store_true", help="record where each rank's step time goes")
    p.add_argument(
        "--trace",
        action="store_true",
        help="run the timed steps under torch.profiler; kernel tables go to <out>/exploration, no results",
    )
    p.add_argument("--prepare-only", action="store_true", help="write the random base and tokenizer, then exit")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one profile in this process
    args = p.parse_args(argv)
    if args.one:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        trace = args.out / "exploration" / f"trace-{args.one}-{stamp}.txt" if args.trace else None
        result = run_profile(args.one, args, model_path(args.shape, args.workdir), trace)
        if result["rank"] == 0:  # DDP: the token count is already gathered over ranks
            print(json.dumps(result), flush=True)
        return 0
    import torch

    if not torch.cuda.is_available() and not args.shape.startswith("tiny"):
        print(
            "error: this benchmark needs a CUDA GPU (--shape tiny or tiny-nf4 dry-run it on the CPU)", file=sys.stderr
        )
        return 2
    base_model(args.shape, args.workdir)
    tokenizer_for(args.workdir / "tokenizer")
    if args.prepare_only:
        return 0
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor()})"
    command = " ".join([Path(sys.executable).name, *sys.argv])
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results = {}
    args.out.mkdir(parents=True, exist_ok=True)
    flags = {"fsdp": "training.fsdp=true", "compile": "training.torch_compile=true"}
    mode = "".join(f"-{name}" for name, flag in flags.items() if flag in args.set)
    layout = f"{args.gpus}gpu" if args.nodes == 1 else f"{args.nodes}x{args.gpus}gpu"
    # Each profile's file is written as soon as it is measured: a run cut short keeps what it measured.
    # The reference, when asked for, should come first: the others are compared with it.
    for profile in args.profiles.split(","):
        r = launch_profile(profile, args)
        results[profile] = r
        if args.trace:
            print(f"{profile}: traced, table in {args.out / 'exploration'}", flush=True)
            continue
        if args.timing and "error" not in r:
            from step_timing import combine

            r["step_timing"] = st = combine(timing_dir(args, profile, args.gpus * args.nodes))
            real = sum(x["real_tokens"] for x in st["per_rank"])
            r["padding_share_measured"] = round(sum(x["padded_tokens"] for x in st["per_rank"]) / real - 1, 4)
        ref = results.get("reference", {}).get("tokens_per_s")
        r.update(
            gpu=gpu,
            gpus=args.gpus * args.nodes,
            nodes=args.nodes,
            memory_cap_gib=args.memory_cap_gib or None,
            model=f"{args.shape} shapes, randomly initialised",
            data=(f"synthetic tokens, log-normal lengths median {LENGTH_MEDIAN} mean {LENGTH_MEAN} max {LENGTH_MAX}"
                  if args.lengths == "synthetic" else f"synthetic tokens, lengths drawn from {args.lengths}"),
            reference_tokens_per_s=ref,
            speedup_vs_reference=round(r["tokens_per_s"] / ref, 3) if ref and "tokens_per_s" in r else None,
            plain_loop_reference_tokens_per_s=REFERENCE_MEASURED.get(profile),
            versions=versions(),
            command=command,
            measured_at=stamp,
        )  # fmt: skip
        label = f"-{args.label}" if args.label else ""
        name = f"train-throughput-{profile}-{layout}{mode}{label}-{stamp}.json"
        (args.out / name).write_text(json.dumps(r, indent=2) + "\n")
        print(
            f"{profile:14s} {r.get('tokens_per_s', 'error')!s:>8} tok/s  alloc {r.get('peak_allocated_gib')} GiB  "
            f"reserved {r.get('peak_reserved_gib')} GiB  MFU/GPU {r.get('mfu_per_gpu')}  "
            f"x{r.get('speedup_vs_reference')}  {name}  {r.get('error', '')}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
