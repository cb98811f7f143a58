"""Benchmark the merge stage against the reference merge (peft's merge_and_unload) on a random model.

    python benchmarks/merge.py --size 7b                       # Mistral-7B shapes; reference only if RAM allows
    python benchmarks/merge.py --size 7b --stage-args '--verify --compare-onto'   # checks inside the bound too
    python benchmarks/merge.py --size 1b --reference yes       # both, at a size where both fit
    python benchmarks/merge.py --size tiny --workdir /tmp/b    # seconds; what the tests run

Builds, in --workdir (deleted afterwards unless --keep), a random checkpoint with the shapes of the
chosen size (bf16, sharded like the real one: ~5 GB shards for 7B, written tensor by tensor so the
benchmark itself stays small) and a random LoRA adapter with the reference recipe's settings
(r=64, alpha 16, q/k/v/o/gate_proj, float32 factors). Then, each in its own process:

- ours: ``python -m stages.merge --base B --adapter A --output O --dtype float16``;
- reference: ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(B, dtype=float16), A)
  .merge_and_unload().save_pretrained(O)``, the seed recipe's merge. It holds the model twice
  (~28 GiB at 7B), so with --reference auto it runs only when the machine's available memory
  exceeds its estimated peak; otherwise the JSON records why it was skipped.

Peak RSS is measured by the OS: psutil polls the child's resident set every 50 ms, and
getrusage(RUSAGE_CHILDREN).ru_maxrss gives the kernel's own high-water mark. When both merges
ran, their outputs are compared tensor by tensor (bit equality). The JSON lands in
benchmarks/results/merge-<size>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.common.artifacts import package_versions  # noqa: E402
from stages.common.safetensors_io import (  # noqa: E402
    CheckpointReader,
    ShardWriter,
    TensorInfo,
    plan_shards,
    shard_names,
    write_index,
)

# Model shapes. 7b is Mistral-7B-v0.1's config; 1b is TinyLlama-1.1B's, a size where the reference fits.
SIZES: dict[str, dict] = {
    "7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        shard_gb=5.0,
    ),
    "1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        shard_gb=2.0,
    ),
    # ~0.27B parameters in small tensors: the tests' memory-bound check (RSS must not follow model size).
    "small": dict(
        vocab_size=8000,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        shard_gb=0.2,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        shard_gb=0.0001,
    ),
}
# The reference recipe's LoRA (configs/mistral-7b-guanaco.yaml).
LORA = dict(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])
POLL_S = 0.05


def mistral_tensors(s: dict) -> list[TensorInfo]:
    """Tensor names and shapes of a MistralForCausalLM, in the order HF checkpoints store them."""
    h, inter, heads, kv = s["hidden_size"], s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"]
    d = h // heads
    out = [TensorInfo("model.embed_tokens.weight", "BF16", (s["vocab_size"], h))]
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            TensorInfo(p + "input_layernorm.weight", "BF16", (h,)),
            TensorInfo(p + "self_attn.q_proj.weight", "BF16", (heads * d, h)),
            TensorInfo(p + "self_attn.k_proj.weight", "BF16", (kv * d, h)),
            TensorInfo(p + "self_attn.v_proj.weight", "BF16", (kv * d, h)),
            TensorInfo(p + "self_attn.o_proj.weight", "BF16", (h, heads * d)),
            TensorInfo(p + "post_attention_layernorm.weight", "BF16", (h,)),
            TensorInfo(p + "mlp.gate_proj.weight", "BF16", (inter, h)),
            TensorInfo(p + "mlp.up_proj.weight", "BF16", (inter, h)),
            TensorInfo(p + "mlp.down_proj.weight", "BF16", (h, inter)),
        ]
    out += [TensorInfo("model.norm.weight", "BF16", (h,)), TensorInfo("lm_head.weight", "BF16", (s["vocab_size"], h))]
    return [TensorInfo(t.name, t.dtype, t.shape, 0, 2 * t.numel) for t in out]


def _random(shape: tuple[int, ...], std: float, dtype, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen).to(dtype)


def build_base(folder: Path, size: str, seed: int) -> int:
    """A random bf16 checkpoint of the size's shapes; returns the parameter count."""
    import torch
    from transformers import MistralConfig

    s = SIZES[size]
    folder.mkdir(parents=True, exist_ok=True)
    config = MistralConfig(**{k: v for k, v in s.items() if k != "shard_gb"}, tie_word_embeddings=False)
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    infos = mistral_tensors(s)
    shards = plan_shards(infos, int(s["shard_gb"] * 1e9))
    files = shard_names(len(shards))
    weight_map, total = {}, 0
    for n, (name, shard) in enumerate(zip(files, shards, strict=True)):
        with ShardWriter(folder / name, shard) as writer:
            for k, info in enumerate(shard):
                if info.name.endswith("norm.weight"):
                    tensor = torch.ones(info.shape, dtype=torch.bfloat16)
                else:
                    tensor = _random(info.shape, 0.02, torch.bfloat16, seed * 100003 + n * 1009 + k)
                writer.write(info.name, tensor)
                weight_map[info.name] = name
        total += writer.size
    write_index(folder, weight_map, sum(i.nbytes for i in infos))
    return sum(i.numel for i in infos)


def build_adapter(folder: Path, base: Path, size: str, seed: int) -> int:
    """A random LoRA adapter (B nonzero, as after training) in peft's on-disk format."""
    import torch
    from peft import LoraConfig

    s = SIZES[size]
    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(base_model_name_or_path=str(base), task_type="CAUSAL_LM", **LORA).save_pretrained(folder)
    shapes = {t.name: t.shape for t in mistral_tensors(s)}
    infos, r = [], LORA["r"]
    for i in range(s["num_hidden_layers"]):
        for mod in LORA["target_modules"]:
            part = "mlp" if mod == "gate_proj" else "self_attn"
            key = f"model.layers.{i}.{part}.{mod}"
            out_f, in_f = shapes[f"{key}.weight"]
            infos.append(TensorInfo(f"base_model.model.{key}.lora_A.weight", "F32", (r, in_f)))
            infos.append(TensorInfo(f"base_model.model.{key}.lora_B.weight", "F32", (out_f, r)))
    with ShardWriter(folder / "adapter_model.safetensors", infos) as writer:
        for k, info in enumerate(infos):
            writer.write(info.name, _random(info.shape, 0.01, torch.float32, seed + k))
    return sum(i.numel for i in infos)


def reference_merge(base: Path, adapter: Path, output: Path) -> None:
    """The seed recipe's merge, run in its own process by `measure`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(output)


def measure(cmd: list[str], log: Path) -> dict:
    """Run cmd; wall time, peak RSS of it and its children (psutil polling), and ru_maxrss."""
    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.monotonic()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        peak = 0
        stop = threading.Event()

        def poll() -> None:
            nonlocal peak
            ps = psutil.Process(proc.pid)
            while not stop.is_set():
                try:
                    rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                    peak = max(peak, rss)
                except psutil.Error:
                    pass
                stop.wait(POLL_S)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        rc = proc.wait()
        stop.set()
        poller.join()
    wall = time.monotonic() - t0
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "command": " ".join(cmd),
        "exit_code": rc,
        "wall_s": round(wall, 2),
        "peak_rss_gib_polled": round(peak / 2**30, 3),
        # The kernel's high-water mark over all children waited for so far: exact for the first run,
        # and for a later run only when it exceeds the earlier ones (then it is that run's).
        "ru_maxrss_gib": round(maxrss / 2**20, 3) if maxrss > before else None,
        "log_tail": log.read_text().strip().splitlines()[-3:],
    }


def compare_outputs(ours: Path, ref: Path) -> dict:
    import torch

    with CheckpointReader(ours) as a, CheckpointReader(ref) as b:
        names_a, names_b = set(a.names()), set(b.names())
        differ = [n for n in sorted(names_a & names_b) if not torch.equal(a.get(n), b.get(n))]
    return {
        "tensors_compared": len(names_a & names_b),
        "only_in_ours": sorted(names_a - names_b),
        "only_in_reference": sorted(names_b - names_a),
        "tensors_differing": differ[:10],
        "bit_identical": not differ and names_a == names_b,
    }


def hardware() -> dict:
    import psutil

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "available_ram_gib_at_start": round(psutil.virtual_memory().available / 2**30, 1),
        # The cores may be shared (CI, other jobs): the load says how much of them the runs had.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="7b", help="model shapes to build")
    parser.add_argument(
        "--reference", choices=("auto", "yes", "no"), default="auto", help="run peft's merge too (auto: if RAM allows)"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-bench-merge"), help="scratch folder (deleted)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (checkpoints, outputs, logs)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--stage-args",
        default="",
        help="extra arguments for our merge, e.g. '--verify --compare-onto' (its metrics keep merge-only numbers)",
    )
    parser.add_argument("--reference-merge", nargs=3, metavar=("BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference_merge:  # the child process of the reference measurement
        reference_merge(*map(Path, args.reference_merge))
        return 0

    import psutil

    work = args.workdir / args.size
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    result: dict = {
        "benchmark": "merge",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "size": args.size,
        "shapes": SIZES[args.size],
        "lora": LORA,
        "hardware": hardware(),
        "versions": package_versions(),
    }
    try:
        base, adapter = work / "base", work / "adapter"
        t0 = time.monotonic()
        params = build_base(base, args.size, args.seed)
        lora_params = build_adapter(adapter, base, args.size, args.seed)
        base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        result["model"] = {
            "parameters": params,
            "base_bytes": base_bytes,
            "base_shards": len(list(base.glob("*.safetensors"))),
            "adapter_parameters": lora_params,
            "build_s": round(time.monotonic() - t0, 1),
        }
        print(f"built {params / 1e9:.2f}B-parameter base ({base_bytes / 2**30:.1f} GiB) and adapter in {work}")

        ours_out = work / "merged-ours"
        metrics = work / "ours-metrics.json"
        cmd = [sys.executable, "-m", "stages.merge", "--base", str(base), "--adapter", str(adapter)]
        cmd += ["--output", str(ours_out), "--dtype", "float16", "--metrics-json", str(metrics)]
        cmd += shlex.split(args.stage_args)
        result["ours"] = measure(cmd, work / "ours.log")
        if metrics.is_file():
            result["ours"]["stage_metrics"] = json.loads(metrics.read_text())
        print(f"ours: {result['ours']['wall_s']} s, peak RSS {result['ours']['peak_rss_gib_polled']} GiB")
        if result["ours"]["exit_code"] != 0:
            print("\n".join(result["ours"]["log_tail"]))

        # The reference holds the fp16 model twice (loaded, then a merged copy while saving) plus the runtime.
        need = 2.1 * params * 2 + (1 << 30)
        avail = psutil.virtual_memory().available
        run_ref = args.reference == "yes" or (args.reference == "auto" and avail > need)
        if run_ref:
            ref_out = work / "merged-reference"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--reference-merge", str(base), str(adapter)]
            result["reference"] = measure([*cmd, str(ref_out)], work / "reference.log")
            print(
                f"reference: {result['reference']['wall_s']} s, "
                f"peak RSS {result['reference']['peak_rss_gib_polled']} GiB"
            )
            if result["reference"]["exit_code"] == 0 and result["ours"]["exit_code"] == 0:
                result["outputs_compared"] = compare_outputs(ours_out, ref_out)
                print(f"outputs bit-identical: {result['outputs_compared']['bit_identical']}")
        else:
            result["reference"] = {
                "skipped": (
                    f"needs ~{need / 2**30:.1f} GiB (the fp16 model twice plus the runtime), "
                    f"{avail / 2**30:.1f} GiB available"
                    if args.reference == "auto"
                    else "--reference no"
                )
            }
            print(f"reference skipped: {result['reference']['skipped']}")
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        result["notes"] = (
            "Both merges read a base the benchmark has just written, so part of it may still be in the page "
            "cache, alike for both. Wall times include each process's start-up (imports)."
        )
        if "wall_s" in result["reference"]:
            result["wall_ratio_ours_over_reference"] = round(
                result["ours"]["wall_s"] / result["reference"]["wall_s"], 3
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"merge-{args.size}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if result["ours"]["exit_code"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
