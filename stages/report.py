"""Report stage: what each GGUF costs in quality and buys in size and speed, checked against a gate.

    python -m stages.report --config runs/demo/config.yaml                          # local
    docker compose run --rm gguf python -m stages.report --config runs/demo/config.yaml

For the f16 GGUF and every quantized type, on the run's held-out text (data.eval_files, or the
split the train stage held out), written plain without a chat template:

- perplexity with llama-perplexity (chunks of report.ctx tokens, the second half of each scored);
- KL divergence and top-1 agreement of each type against the f16 file's token distributions
  (llama-perplexity --kl-divergence), which says what quantization changed, not how good the
  model is;
- prompt and generation tokens/s with llama-bench;
- the merged HF model's own perplexity on exactly the same tokens and chunks, computed with
  transformers, so that the conversion itself is checked (f16 GGUF vs HF).

Quality gate: a mean KL above report.max_kl[type], or an f16-vs-HF perplexity gap above
report.max_conversion_ppl_delta, fails the stage with the numbers (the measured report is kept in
logs/ for diagnosis). Passing runs get, in gguf/: report.json, report.md, report.png (size against
KL and perplexity), an Ollama Modelfile for the first quant type, and a model card README.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from stages.common import llamacpp, names, specs
from stages.common.artifacts import read_manifest, stage_output, verify_manifest, write_json_atomic
from stages.common.chat_template import derive_turns, modelfile
from stages.common.cli import StageContext, context, stage_parser
from stages.common.config import PipelineConfig
from stages.common.data import plain_text
from stages.common.errors import StageError, console, run_stage
from stages.common.gguf_runtime import GGUFModel, read_gguf
from stages.common.heldout import held_out
from stages.common.layout import RunLayout

SPEC = specs.spec(names.REPORT)


PERPLEXITY_TOOL = "llama-perplexity"
BENCH_TOOL = "llama-bench"
# llama-bench's test: prompt and generated tokens, repetitions. Past 1 B parameters a quarter of it,
# once: one f16 repetition of the full test takes about a minute on 2 cores at 7 B.
BENCH = {"small": (128, 32, 3), "large": (32, 8, 1)}
LARGE = 1_000_000_000
# Past LARGE the f16 file is not benchmarked: it is not what ships, and at 7 B it fills a 16 GB
# host's memory, so generation would read it from disk for every token.
NOT_BENCHED = {"prompt_tokens_per_s": None, "gen_tokens_per_s": None}
# Lines of llama-perplexity's output that the report reads (tools/perplexity/perplexity.cpp).
FINAL_PPL = re.compile(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)")
KL_FIELDS = {
    "ppl": re.compile(r"Mean PPL\(Q\)\s*:\s*([\d.]+)"),
    "kl_mean": re.compile(r"Mean\s+KLD:\s*(-?[\d.]+)"),
    "kl_99": re.compile(r"99\.0%\s+KLD:\s*(-?[\d.]+)"),
    "top1_agreement": re.compile(r"Same top p:\s*([\d.]+)"),
}


# --- llama.cpp tools -----------------------------------------------------------------------------


def _match(pattern: re.Pattern[str], output: str, what: str) -> float:
    m = pattern.search(output)
    if not m:
        raise StageError(
            f"{PERPLEXITY_TOOL} printed no {what}; its output format changed? (llama.cpp {llamacpp.COMMIT})"
        )
    return float(m[1])


def perplexity_base(f16: Path, text: Path, logits: Path, ctx: int, chunks: int) -> float:
    """Perplexity of the f16 GGUF; its token distributions are saved to `logits` for the KL runs."""
    out = llamacpp.run_tool(PERPLEXITY_TOOL, ["-m", str(f16), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks),
                                  "--kl-divergence-base", str(logits)])  # fmt: skip
    return _match(FINAL_PPL, out, "final perplexity")


def kl_against_base(model: Path, logits: Path, chunks: int) -> dict[str, float]:
    out = llamacpp.run_tool(PERPLEXITY_TOOL, ["-m", str(model), "--kl-divergence-base", str(logits), "--kl-divergence",
                                  "--chunks", str(chunks)])  # fmt: skip
    stats = {k: _match(p, out, k) for k, p in KL_FIELDS.items()}
    stats["top1_agreement"] /= 100
    return stats


def bench_test(n_params: int) -> tuple[int, int, int]:
    return BENCH["large" if n_params > LARGE else "small"]


def bench(model: Path, n_params: int) -> dict[str, float]:
    """Prompt processing and generation tokens/s on this host's CPU threads (llama-bench, JSON)."""
    n_prompt, n_gen, reps = bench_test(n_params)
    args = ["-m", str(model), "-p", str(n_prompt), "-n", str(n_gen), "-r", str(reps), "-o", "json"]
    out = llamacpp.run_tool(BENCH_TOOL, args)
    rows = json.loads(out[out.index("[") : out.rindex("]") + 1])
    pp = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return {"prompt_tokens_per_s": round(pp["avg_ts"], 1), "gen_tokens_per_s": round(tg["avg_ts"], 1)}


def read_base_logits(path: Path):
    """The f16 file's next-token distributions as llama-perplexity --kl-divergence-base saves them
    (tools/perplexity/perplexity.cpp): "_logits_", n_ctx, n_vocab, n_chunk (int32), the tokens, then
    for each scored position (the second half of each chunk) a record of (scale, min log-prob) as two
    float32 and n_vocab uint16 q, with logit = max - (65535 - q) * scale. Returns (tokens, q) where
    q has one row of n_vocab values per scored position, chunk after chunk."""
    import numpy as np

    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if bytes(raw[:8]) != b"_logits_":
        raise StageError(f"{path.name} is not a llama-perplexity logits file (llama.cpp {llamacpp.COMMIT})")
    n_ctx, n_vocab, n_chunk = (int(x) for x in raw[8:20].view(np.int32))
    tokens = raw[20 : 20 + 4 * n_chunk * n_ctx].view(np.int32)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    records = raw[20 + 4 * n_chunk * n_ctx :].view(np.uint16).reshape(-1, nv)
    if len(records) != n_chunk * (n_ctx - 1 - n_ctx // 2):
        raise StageError(f"{path.name}: {len(records)} records for {n_chunk} chunks of {n_ctx}; a truncated file?")
    return tokens.reshape(n_chunk, n_ctx), records[:, 4 : 4 + n_vocab]


# --- The merged HF model on the same tokens ---------------------------------------------------------


def chunks_of(tokens: list[int], ctx: int, max_chunks: int, bos: int | None) -> list[list[int]]:
    """llama-perplexity's chunks: consecutive ctx-token windows, the first token of each replaced
    by BOS when the model adds one."""
    out = []
    for i in range(min(len(tokens) // ctx, max_chunks)):
        chunk = tokens[i * ctx : (i + 1) * ctx]
        if bos is not None:
            chunk = [bos, *chunk[1:]]
        out.append(chunk)
    return out


def hf_perplexity(merged: Path, chunks: list[list[int]]) -> tuple[float, str]:
    """exp(mean NLL) over the second half of each chunk, as llama-perplexity scores it. float32
    when it fits in RAM (the reference), bfloat16 otherwise (recorded)."""
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    weights = sum(f.stat().st_size for f in merged.glob("*.safetensors"))  # 16-bit on disk
    dtype = torch.float32 if weights * 2 * 1.3 < psutil.virtual_memory().available else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=dtype).eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for chunk in chunks:
            first = len(chunk) // 2
            logits = model(torch.tensor([chunk])).logits[0, first:-1].float()
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[first + 1 :]), reduction="sum").item()
            count += len(chunk) - first - 1
    return math.exp(nll / count), str(dtype).removeprefix("torch.")


# --- Outputs -------------------------------------------------------------------------------------


def chart(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """File size against KL divergence (vs f16) and perplexity, one point per type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kl_ax, ppl_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for r in rows:
        size = r["size_bytes"] / 2**20
        ppl_ax.scatter(size, r["perplexity"], color="tab:blue")
        ppl_ax.annotate(r["type"], (size, r["perplexity"]), textcoords="offset points", xytext=(4, 4))
        if r.get("kl_mean") is not None:
            kl_ax.scatter(size, r["kl_mean"], color="tab:red")
            kl_ax.annotate(r["type"], (size, r["kl_mean"]), textcoords="offset points", xytext=(4, 4))
    kl_ax.set(xlabel="file size (MiB)", ylabel="mean KL divergence vs f16", title="what quantization changed")
    ppl_ax.set(xlabel="file size (MiB)", ylabel="perplexity (held-out)", title="held-out perplexity")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| type | size | bits/weight | perplexity | mean KL vs f16 | top-1 agreement | prompt tok/s | gen tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        kl = "—" if r.get("kl_mean") is None else f"{r['kl_mean']:.4f}"
        top1 = "—" if r.get("top1_agreement") is None else f"{r['top1_agreement']:.1%}"
        lines.append(
            f"| {r['type']} | {r['size_bytes'] / 2**20:.1f} MiB | {r['bits_per_weight']:.2f} | {r['perplexity']:.4f} "
            f"| {kl} | {top1} | {r['prompt_tokens_per_s'] or '—'} | {r['gen_tokens_per_s'] or '—'} |"
        )
    return lines


def report_markdown(report: dict[str, Any]) -> str:
    conv = report["conversion"]
    lines = [
        f"# GGUF quality report: `{report['run_name']}`",
        "",
        f"Held-out text: {report['text']['tokens']} tokens, {report['text']['chunks']} chunks of "
        f"{report['text']['ctx']} (second half of each scored). KL divergence and top-1 agreement are "
        "against the f16 GGUF. Speed: llama-bench, "
        f"{report['bench_threads']} CPU threads, prompt {report['bench'][0]} / generation {report['bench'][1]} "
        f"tokens, {report['bench'][2]} repetition(s).",
        "",
        *report_table(report["types"]),
        "",
        f"Conversion check: merged HF model ({conv['hf_dtype']}) perplexity {conv['hf_perplexity']:.4f}, "
        f"f16 GGUF {conv['gguf_perplexity']:.4f}: {conv['relative_delta']:+.3%} "
        f"(gate ±{conv['max_delta']:.1%}).",
        "",
        "![size against KL divergence and perplexity](report.png)",
        "",
    ]
    return "\n".join(lines)


def model_card(cfg: PipelineConfig, layout: RunLayout, report: dict[str, Any], files: list[str]) -> str:
    """README.md for the gguf/ folder: where the model came from and what it measures."""
    train = read_manifest(layout.root, names.TRAIN) or {}
    metrics, inputs = train.get(names.M_METRICS, {}), train.get(names.M_INPUTS, {})
    data = inputs.get("data", {})
    data_lines = [f"- `{Path(f).name}`: sha256 `{h}`, {Path(f).stat().st_size if Path(f).exists() else '?'} bytes"
                  for f, h in data.items()]  # fmt: skip
    if metrics.get("train_rows") is not None:
        data_lines.append(f"- {metrics['train_rows']} training rows, {metrics.get('eval_rows')} held out")
    hyper = {
        "lora": cfg.lora.model_dump(mode="json"),
        "quantization (training)": cfg.quantization.model_dump(mode="json"),
        "training": {
            k: v
            for k, v in cfg.training.model_dump(mode="json").items()
            if k not in ("device", "logging_steps", "save_steps", "eval_steps")
        },
    }
    loss = (
        f"first logged {metrics['first_loss']:.4f}, final {metrics['final_loss']:.4f}, "
        f"held-out {metrics['eval_loss']:.4f}"
        if metrics.get("final_loss") is not None and metrics.get("eval_loss") is not None
        else "not recorded (adapter imported)"
    )
    primary = layout.gguf(cfg.gguf.quant_types[0]).name
    lines = [
        f"# {cfg.run_name}",
        "",
        f"A LoRA fine-tune of `{cfg.model.name_or_path}`"
        + (f" (revision `{inputs['model_revision']}`)" if inputs.get("model_revision") else "")
        + ", merged and converted to GGUF by kiln.",
        "",
        "## Files",
        "",
        *[f"- `{f}`" for f in files],
        "",
        "## Use",
        "",
        "```sh",
        f"llama-cli -m {primary} -cnv",
        f"ollama create {cfg.run_name} -f Modelfile && ollama run {cfg.run_name}",
        "```",
        "",
        "## Data",
        "",
        *(data_lines or ["- not recorded (adapter imported)"]),
        "",
        "## Training",
        "",
        f"Loss: {loss}.",
        "",
        "```json",
        json.dumps(hyper, indent=1),
        "```",
        "",
        "## Quality",
        "",
        *report_table(report["types"]),
        "",
        f"f16 GGUF vs merged HF perplexity: {report['conversion']['relative_delta']:+.3%}. "
        "Full report: [report.md](report.md).",
        "",
    ]
    return "\n".join(lines)


def ollama_files(cfg: PipelineConfig, layout: RunLayout, f16: Path) -> str:
    """The Modelfile for the first quant type, derived from the merged model's own chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(layout.merged)
    with GGUFModel(f16, n_ctx=256) as model:
        stops = sorted({model.token_text(t) for t in model.eos_ids} - {""})
        bos_text = model.token_text(model.llm.token_bos()) if model.add_bos else ""

    def render(messages):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    turns = derive_turns(render, bos_text)
    return modelfile(layout.gguf(cfg.gguf.quant_types[0]).name, turns, stops, cfg.data.system_prompt)


# --- The stage -----------------------------------------------------------------------------------


def gate(cfg: PipelineConfig, report: dict[str, Any]) -> list[str]:
    failures = []
    for r in report["types"]:
        limit = cfg.report.max_kl.get(r["type"])
        if limit is not None and r.get("kl_mean") is not None and r["kl_mean"] > limit:
            failures.append(f"{r['type']} mean KL vs f16 is {r['kl_mean']:.4f} > report.max_kl.{r['type']}={limit}")
    conv = report["conversion"]
    if abs(conv["relative_delta"]) > cfg.report.max_conversion_ppl_delta:
        failures.append(
            f"f16 GGUF perplexity {conv['gguf_perplexity']:.4f} vs merged HF {conv['hf_perplexity']:.4f} "
            f"differs by {conv['relative_delta']:+.2%} > "
            f"report.max_conversion_ppl_delta={cfg.report.max_conversion_ppl_delta}"
        )
    return failures


def measure(cfg: PipelineConfig, layout: RunLayout, work: Path) -> dict[str, Any]:
    f16 = layout.gguf(cfg.gguf.outtype)
    text = plain_text(held_out(cfg, layout).rows)  # never rows the adapter trained on
    text_file, logits = work / "held_out.txt", work / "f16.logits"
    text_file.write_text(text)

    # Tokens exactly as llama-perplexity makes them (BOS by the model's rule, no control tokens).
    with GGUFModel(f16, n_ctx=256) as model:
        bos = model.llm.token_bos() if model.add_bos else None
        tokens = model.tokenize(text, add_bos=model.add_bos, special=False)
    ctx = cfg.report.ctx
    if len(tokens) < 2 * ctx:
        raise StageError(
            f"report: the held-out text is {len(tokens)} tokens; llama-perplexity needs at least 2 × report.ctx "
            f"= {2 * ctx}. Lower report.ctx or hold out more rows"
        )
    f16_info = read_gguf(f16)
    chunks = chunks_of(tokens, ctx, cfg.report.chunks_for(f16_info.n_params), bos)
    console.print(f"scoring {len(chunks)} chunks of {ctx} tokens ({f16_info.n_params / 1e9:.2f} B parameters)")

    quant = read_manifest(layout.root, names.QUANTIZE)[names.M_METRICS]["types"]
    rows = []
    with console.status("llama-perplexity on the f16 GGUF") as status:
        ppl16 = perplexity_base(f16, text_file, logits, ctx, len(chunks))
        rows.append({"type": cfg.gguf.outtype, "file": f16.name, "size_bytes": f16_info.size_bytes,
                     "bits_per_weight": round(f16_info.bits_per_weight, 3), "perplexity": ppl16,
                     "kl_mean": None, "top1_agreement": None,
                     **(bench(f16, f16_info.n_params) if f16_info.n_params <= LARGE else NOT_BENCHED)})  # fmt: skip
        for qtype in cfg.gguf.quant_types:
            status.update(f"llama-perplexity --kl-divergence on {qtype}")
            path = layout.gguf(qtype)
            kl = kl_against_base(path, logits, len(chunks))
            rows.append({"type": qtype, "file": path.name, "size_bytes": quant[qtype]["size_bytes"],
                         "bits_per_weight": quant[qtype]["bits_per_weight"], "perplexity": kl.pop("ppl"),
                         **kl, **bench(path, f16_info.n_params)})  # fmt: skip
            console.print(
                f"{qtype}: KL {rows[-1]['kl_mean']:.4f}, top-1 {rows[-1]['top1_agreement']:.1%}, "
                f"perplexity {rows[-1]['perplexity']:.4f} (f16 {ppl16:.4f})"
            )
        status.update("merged HF model's perplexity on the same tokens")
        hf_ppl, hf_dtype = hf_perplexity(layout.merged, chunks)
    console.print(f"conversion: HF perplexity {hf_ppl:.4f} ({hf_dtype}), f16 GGUF {ppl16:.4f}")
    return {
        "run_name": cfg.run_name,
        "text": {"tokens": len(tokens), "ctx": ctx, "chunks": len(chunks), "characters": len(text)},
        "bench_threads": os.cpu_count(),
        "bench": bench_test(f16_info.n_params),
        "types": rows,
        "conversion": {
            "hf_perplexity": hf_ppl,
            "hf_dtype": hf_dtype,
            "gguf_perplexity": ppl16,
            "relative_delta": ppl16 / hf_ppl - 1,
            "max_delta": cfg.report.max_conversion_ppl_delta,
        },
        "gate": {"max_kl": cfg.report.max_kl, "max_conversion_ppl_delta": cfg.report.max_conversion_ppl_delta},
        names.M_LLAMA_CPP: llamacpp.info(),
    }


def report(ctx: StageContext) -> None:
    cfg, layout, run_dir = ctx.cfg, ctx.layout, ctx.run_dir

    # Setup: complete GGUFs and merged model, the tools present.
    for stage in (names.MERGE, names.CONVERT, names.QUANTIZE):
        verify_manifest(run_dir, stage)
    for tool in (PERPLEXITY_TOOL, BENCH_TOOL):
        llamacpp.tool(tool)
    f16 = layout.gguf(cfg.gguf.outtype)
    SPEC.check_memory(cfg, layout)
    if not (held := held_out(cfg, layout)).rows:
        console.print(f"[yellow]report skipped[/yellow]: {held.reason}")
        with stage_output(run_dir, names.REPORT) as out:
            out.commit(inputs={"held_out": "none"}, metrics={"skipped": held.reason})
        return

    # Run: measure in a scratch folder (the saved f16 logits are hundreds of MB), then gate.
    with tempfile.TemporaryDirectory(
        prefix=f"{names.TMP_PREFIX}{names.REPORT}-{os.getpid()}-scratch-", dir=run_dir
    ) as work:
        result = measure(cfg, layout, Path(work))
    failures = gate(cfg, result)
    if failures:
        kept = layout.failed_report(names.REPORT)
        write_json_atomic(kept, result)
        raise StageError(f"quality gate: {'; '.join(failures)} (measurements in {kept})")
    modelfile_text = ollama_files(cfg, layout, f16)

    # Cleanup: the report, its chart, the Modelfile and the model card, next to the GGUFs.
    with stage_output(run_dir, names.REPORT) as out:
        write_json_atomic(out.path(layout.report_json), result)
        out.path(layout.report_md).write_text(report_markdown(result))
        chart(result["types"], out.path(layout.report_png), f"{cfg.run_name}: GGUF types")
        out.path(layout.modelfile).write_text(modelfile_text)
        files = sorted(p.name for p in layout.gguf_dir.glob("*.gguf"))
        out.path(layout.model_card).write_text(model_card(cfg, layout, result, files))
        out.commit(
            inputs={"types": [r["file"] for r in result["types"]]},
            metrics={
                "conversion_ppl_delta": round(result["conversion"]["relative_delta"], 5),
                **{f"kl_{r['type']}": round(r["kl_mean"], 5) for r in result["types"] if r["kl_mean"] is not None},
                "report": result,
            },
            extra={names.M_LLAMA_CPP: llamacpp.info()},
        )


def main(argv: list[str] | None = None) -> int:
    args = stage_parser("python -m stages.report", __doc__).parse_args(argv)
    return run_stage(names.REPORT, lambda: report(context(args)))


if __name__ == "__main__":
    raise SystemExit(main())
