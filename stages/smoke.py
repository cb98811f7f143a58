"""Smoke stage: the quantized GGUF must answer every prompt and stop at EOS by itself.

    python -m stages.smoke --config runs/demo/config.yaml                          # local
    docker compose run --rm gguf python -m stages.smoke --config runs/demo/config.yaml

Runs greedy generation in llama.cpp on runs/<run>/gguf/<run_name>.<TYPE>.gguf (smoke.quant_type,
default the first of gguf.quant_types) for each raw prompt in smoke.prompts and each user
message in smoke.messages (rendered with the chat template stored in the GGUF). Fails when an
answer is empty or does not reach an end-of-generation token within smoke.max_tokens: the
usual signs of a wrong chat template, a lost EOS or a broken conversion.
"""

from __future__ import annotations

from rich.markup import escape

from stages.common import llamacpp, names
from stages.common.artifacts import stage_output, verify_manifest
from stages.common.cli import StageContext, context, stage_parser
from stages.common.errors import StageError, console, run_stage
from stages.common.gguf_runtime import GGUFModel


def smoke(ctx: StageContext) -> None:
    cfg, run_dir = ctx.cfg, ctx.run_dir

    # Setup.
    if not (cfg.smoke.prompts or cfg.smoke.messages):
        raise StageError("smoke: no prompts or messages configured; add smoke.prompts or smoke.messages")
    verify_manifest(run_dir, names.QUANTIZE)
    path = run_dir / names.GGUF_DIR / names.gguf_name(cfg.run_name, cfg.smoke_quant_type)
    model = GGUFModel(path, n_ctx=2048)

    # Run.
    cases = [("prompt", p, p) for p in cfg.smoke.prompts]
    cases += [("message", m, model.chat_prompt([{"role": "user", "content": m}])) for m in cfg.smoke.messages]
    results, failures = [], []
    for kind, given, prompt in cases:
        gen = model.generate(model.prompt_tokens(prompt), cfg.smoke.max_tokens)
        console.print(
            f"[bold]{kind}[/bold] {escape(repr(given))}\n"
            f"  → {escape(repr(gen.text.strip()))} (eos: {gen.stopped_at_eos})"
        )
        results.append(
            {
                "kind": kind,
                "input": given,
                "output": gen.text,
                "tokens": len(gen.tokens),
                "stopped_at_eos": gen.stopped_at_eos,
            }
        )
        if not gen.text.strip():
            failures.append(f"empty answer to {given!r}")
        elif not gen.stopped_at_eos:
            failures.append(f"no EOS within {cfg.smoke.max_tokens} tokens for {given!r}")
    model.close()
    if failures:
        raise StageError(f"smoke test of {path.name} failed: {'; '.join(failures)}")

    # Cleanup.
    with stage_output(run_dir, names.SMOKE) as out:
        out.commit(
            inputs={"gguf": path.name},
            metrics={"passed": len(results), "answers": results},
            extra={names.M_LLAMA_CPP: llamacpp.info()},
        )


def main(argv: list[str] | None = None) -> int:
    args = stage_parser("python -m stages.smoke", __doc__).parse_args(argv)
    return run_stage(names.SMOKE, lambda: smoke(context(args)))


if __name__ == "__main__":
    raise SystemExit(main())
