"""Evaluate stage: held-out exact match of the base model against the fine-tuned one, both as GGUFs.

    python -m stages.evaluate --config runs/demo/config.yaml                          # local
    docker compose run --rm gguf python -m stages.evaluate --config runs/demo/config.yaml

Both models are scored the way they will be deployed: quantized to eval.quant_type and run by
the pinned llama.cpp with greedy decoding and the chat template stored in each GGUF. The base
GGUF is converted and quantized from the base checkpoint with the same tools as the fine-tuned
one, once, and cached under cache/gguf/. An answer counts when, stripped of surrounding white
space, it equals the reference answer. Writes runs/<run>/eval/exact_match.json.

Only held-out rows are scored: those the train stage's recorded split held out and never trained
on, or data.eval_files for an imported adapter (heldout.py). Without any, the stage is skipped:
its manifest says why and no score is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from stages.common import keys, llamacpp, names
from stages.common.artifacts import stage_output, verify_manifest
from stages.common.cli import StageContext, context, stage_parser
from stages.common.config import PipelineConfig
from stages.common.errors import StageError, console, run_stage
from stages.common.gguf_runtime import GGUFModel, read_gguf
from stages.common.heldout import held_out
from stages.common.layout import cache_dir
from stages.common.model import resolve
from stages.convert import convert_checkpoint
from stages.quantize import quantize_file


def base_gguf(cfg: PipelineConfig) -> Path:
    """The base model at eval.quant_type, made once per base checkpoint and llama.cpp version."""
    base = resolve(cfg.model).path
    identity = {
        "base": keys.fingerprint([base], keys.FileHashes()),
        "llama.cpp": llamacpp.COMMIT,
        "type": cfg.eval.quant_type,
        "token_embedding_type": cfg.gguf.token_embedding_type,
    }
    cache = cache_dir() / "gguf" / f"{base.name}-{keys.digest(identity)[:12]}"
    target = cache / f"base.{cfg.eval.quant_type}.gguf"
    if target.is_file():
        return target
    tmp = cache.with_name(f"{names.TMP_PREFIX}{cache.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    f16 = tmp / "base.f16.gguf"
    convert_checkpoint(base, f16, "f16", f"{base.name}")
    quantize_file(f16, tmp / target.name, cfg.eval.quant_type, cfg.gguf.token_embedding_type)
    f16.unlink()
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    return target


def reference_pairs(
    cfg: PipelineConfig, rows: list[dict[str, Any]], n_params: int
) -> list[tuple[list[dict[str, str]], str]]:
    """The first held-out (prompt, answer) pairs of `rows`, as many as the model's size affords
    (eval.example_budget)."""
    pairs = [(r["prompt"], r["completion"][0]["content"]) for r in rows if "prompt" in r]
    if rows and not pairs:
        raise StageError("eval.exact_match needs chat or alpaca data (a prompt and an answer per row)")
    return pairs[: cfg.eval.examples_for(n_params)]


def skip(ctx: StageContext, reason: str) -> None:
    """Commit an evaluate output that scores nothing and says why (no exact_match.json)."""
    console.print(f"[yellow]evaluate skipped[/yellow]: {reason}")
    with stage_output(ctx.run_dir, names.EVALUATE, owned=(names.EVAL_DIR,)) as out:
        out.commit(inputs={"held_out": "none"}, metrics={"skipped": reason})


def score(model_path: Path, pairs, max_tokens: int) -> tuple[float, list[dict[str, Any]]]:
    model = GGUFModel(model_path, n_ctx=2048)
    answers, hits = [], 0
    for messages, want in pairs:
        gen = model.generate(model.prompt_tokens(model.chat_prompt(messages)), max_tokens)
        ok = gen.text.strip() == want.strip()
        hits += ok
        answers.append({"expected": want, "got": gen.text, "match": ok, "stopped_at_eos": gen.stopped_at_eos})
    model.close()
    return hits / len(pairs), answers


def evaluate(ctx: StageContext) -> None:
    cfg, layout, run_dir = ctx.cfg, ctx.layout, ctx.run_dir

    # Setup: nothing to score is a skip with the reason, never a score on training rows.
    held = held_out(cfg, layout)
    if not held.rows:
        return skip(ctx, held.reason)
    verify_manifest(run_dir, names.QUANTIZE)
    tuned = layout.gguf(cfg.eval.quant_type)
    pairs = reference_pairs(cfg, held.rows, read_gguf(tuned).n_params)
    console.print(f"scoring {len(pairs)} held-out rows: {held.source}")
    base = base_gguf(cfg)

    # Run.
    base_em, base_answers = score(base, pairs, cfg.eval.max_tokens)
    console.print(f"base exact match: {base_em:.1%} ({base.name})")
    tuned_em, tuned_answers = score(tuned, pairs, cfg.eval.max_tokens)
    console.print(f"fine-tuned exact match: {tuned_em:.1%} ({tuned.name})")

    # Cleanup.
    with stage_output(run_dir, names.EVALUATE, owned=(names.EVAL_DIR,)) as out:
        report = {
            "quant_type": cfg.eval.quant_type,
            "n": len(pairs),
            "base_exact_match": base_em,
            "finetuned_exact_match": tuned_em,
            "examples": [
                {"messages": m, "base": b, "finetuned": t}
                for (m, _), b, t in zip(pairs, base_answers, tuned_answers, strict=True)
            ],
        }
        out.path(layout.exact_match).write_text(json.dumps(report, indent=1))
        out.commit(
            inputs={"base_gguf": str(base), "finetuned_gguf": tuned.name, "held_out": held.source},
            metrics={"base_exact_match": base_em, "finetuned_exact_match": tuned_em, "n": len(pairs)},
            extra={names.M_LLAMA_CPP: llamacpp.info()},
        )


def main(argv: list[str] | None = None) -> int:
    args = stage_parser("python -m stages.evaluate", __doc__).parse_args(argv)
    return run_stage(names.EVALUATE, lambda: evaluate(context(args)))


if __name__ == "__main__":
    raise SystemExit(main())
