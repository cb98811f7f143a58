"""Report stage: what each GGUF costs in quality and buys in size and speed, checked against a gate.

    python -m stages.report --config runs/demo/config.yaml                          # local
    docker compose run --rm gguf python -m stages.report --config runs/demo/config.yaml

On the held-out chunks the convert stage scored (its f16 file's distributions are saved beside
it), for every quantized type: perplexity, KL divergence and top-1 agreement against f16 (what
quantization changed, not how good the model is), and llama-bench tokens/s. A mean KL above
report.max_kl[type] fails the stage with the numbers (kept in logs/report.failed.json). Passing
runs get, in gguf/: report.json, report.md, report.png, an Ollama Modelfile and a model card.
The conversion check itself (f16 GGUF against the merged HF model) is convert's; its figures are
repeated here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from stages.common import llamacpp, names, specs
from stages.common.artifacts import read_manifest, stage_output, verify_manifest, write_json_atomic
from stages.common.chat_template import derive_turns, modelfile
from stages.common.cli import StageContext, context, stage_parser
from stages.common.config import PipelineConfig
from stages.common.errors import StageError, console, run_stage
from stages.common.gguf_runtime import GGUFModel
from stages.common.heldout import held_out
from stages.common.layout import RunLayout
from stages.common.perplexity import PERPLEXITY_TOOL, kl_against_base

SPEC = specs.spec(names.REPORT)


BENCH_TOOL = "llama-bench"
# llama-bench's test: prompt and generated tokens, repetitions. Past 1 B parameters a quarter of it,
# once, so that timing a large model on a CPU host does not outlast scoring it (docs/quality.md).
BENCH = {"small": (128, 32, 3), "large": (32, 8, 1)}
LARGE = 1_000_000_000
# Past LARGE the f16 file is not benchmarked: it is not what ships, and at 7 B it fills a 16 GB
# host's memory, so generation would read it from disk for every token.
NOT_BENCHED = {"prompt_tokens_per_s": None, "gen_tokens_per_s": None}
# --- llama.cpp tools -----------------------------------------------------------------------------


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
        f"Held-out text: {report['text']['chunks']} chunks of {report['text']['ctx']} tokens, the second half "
        f"of each scored ({report['text']['positions']} positions). KL divergence and top-1 agreement are "
        "against the f16 GGUF. Speed: llama-bench, "
        f"{report['bench_threads']} CPU threads, prompt {report['bench'][0]} / generation {report['bench'][1]} "
        f"tokens, {report['bench'][2]} repetition(s).",
        "",
        *report_table(report["types"]),
        "",
        f"Conversion check (convert stage): merged HF model ({conv['hf_dtype']}) perplexity "
        f"{conv['hf_perplexity']:.4f}, f16 GGUF {conv['gguf_perplexity']:.4f}: {conv['relative_delta']:+.3%} "
        f"(gate ±{conv['max_delta']:.1%}); same next token at {conv['top1_agreement']:.2%} of the positions "
        f"(gate {conv['min_top1']:.0%}).",
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


def ollama_files(cfg: PipelineConfig, layout: RunLayout, gguf: Path) -> str:
    """The Modelfile for the first quant type, derived from the merged model's own chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(layout.merged)
    with GGUFModel(gguf, n_ctx=256, vocab_only=True) as model:
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
    return failures


def measure(cfg: PipelineConfig, layout: RunLayout) -> dict[str, Any]:
    """Every type against the f16 file's distributions, which convert saved on the held-out chunks."""
    f16, logits = layout.gguf(cfg.gguf.outtype), layout.gguf_logits(cfg.gguf.outtype)
    converted = read_manifest(layout.root, names.CONVERT)[names.M_METRICS]
    conversion = converted["conversion"]
    chunks, ppl16, n_params = conversion["chunks"], conversion["gguf_perplexity"], converted["n_params"]
    quant = read_manifest(layout.root, names.QUANTIZE)[names.M_METRICS]["types"]
    rows = [{"type": cfg.gguf.outtype, "file": f16.name, "size_bytes": converted["size_bytes"],
             "bits_per_weight": converted["bits_per_weight"], "perplexity": ppl16, "kl_mean": None,
             "top1_agreement": None, **(bench(f16, n_params) if n_params <= LARGE else NOT_BENCHED)}]  # fmt: skip
    with console.status("llama-perplexity --kl-divergence") as status:
        for qtype in cfg.gguf.quant_types:
            status.update(f"llama-perplexity --kl-divergence on {qtype}")
            path = layout.gguf(qtype)
            kl = kl_against_base(path, logits, chunks)
            rows.append({"type": qtype, "file": path.name, "size_bytes": quant[qtype]["size_bytes"],
                         "bits_per_weight": quant[qtype]["bits_per_weight"], "perplexity": kl.pop("ppl"),
                         **kl, **bench(path, n_params)})  # fmt: skip
            console.print(
                f"{qtype}: KL {rows[-1]['kl_mean']:.4f}, top-1 {rows[-1]['top1_agreement']:.1%}, "
                f"perplexity {rows[-1]['perplexity']:.4f} (f16 {ppl16:.4f})"
            )
    return {
        "run_name": cfg.run_name,
        "text": {"ctx": conversion["ctx"], "chunks": chunks, "positions": conversion["positions"]},
        "bench_threads": os.cpu_count(),
        "bench": bench_test(n_params),
        "types": rows,
        "conversion": conversion,
        "gate": {"max_kl": cfg.report.max_kl},
        names.M_LLAMA_CPP: llamacpp.info(),
    }


def report(ctx: StageContext) -> None:
    cfg, layout, run_dir = ctx.cfg, ctx.layout, ctx.run_dir

    # Setup: complete GGUFs and the f16 file's saved distributions, the tools present.
    for stage in (names.CONVERT, names.QUANTIZE):
        verify_manifest(run_dir, stage)
    for tool in (PERPLEXITY_TOOL, BENCH_TOOL):
        llamacpp.tool(tool)
    conversion = read_manifest(run_dir, names.CONVERT)[names.M_METRICS].get("conversion")
    held = held_out(cfg, layout)  # the split may have changed since convert (an imported adapter)
    skipped = held.reason if not held.rows else (conversion or {}).get("skipped")
    if skipped:  # never score rows the adapter trained on
        console.print(f"[yellow]report skipped[/yellow]: {skipped}")
        with stage_output(run_dir, names.REPORT) as out:
            out.commit(inputs={"held_out": "none"}, metrics={"skipped": skipped})
        return
    if conversion is None:
        raise StageError(
            "convert ran without its conversion check (report.enabled was false), so it saved no f16 "
            "distributions to measure against; rerun the convert stage"
        )

    # Run: measure, then gate.
    result = measure(cfg, layout)
    failures = gate(cfg, result)
    if failures:
        kept = layout.failed_report(names.REPORT)
        write_json_atomic(kept, result)
        raise StageError(f"quality gate: {'; '.join(failures)} (measurements in {kept})")
    modelfile_text = ollama_files(cfg, layout, layout.gguf(cfg.gguf.quant_types[0]))

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
