"""Smoke stage: the quantized GGUF must answer every prompt and stop at EOS by itself.

    python -m stages.smoke --config runs/demo/config.yaml                          # local
    docker compose run --rm gguf python -m stages.smoke --config runs/demo/config.yaml

Runs the pinned llama.cpp, greedy, on runs/<run>/gguf/<run_name>.<TYPE>.gguf (smoke.quant_type,
default the first of gguf.quant_types): each raw prompt in smoke.prompts as written (BOS added
as llama.cpp adds it), and each user message in smoke.messages rendered with the chat template
stored in the GGUF (after data.system_prompt, if the data used one). Fails when an answer is
empty or does not reach an end-of-generation token within smoke.max_tokens: the usual signs of a
wrong chat template, a lost EOS or a broken conversion. The answers, with their token ids, go
into the manifest and runs/<run>/smoke.json.

Generation runs in-process through the bindings of the same llama.cpp (gguf_runtime.GGUFModel),
not by parsing llama-completion's stdout: EOS is then llama.cpp's own per-token test
(llama_vocab_is_eog, the one llama-completion makes before printing " [end of text]"), and the
pinned llama-completion can exit without flushing the end of its output (see
gguf_runtime.complete), which would read as a missing EOS or an empty answer.
"""

from __future__ import annotations

import json
import time

from rich.markup import escape

from stages.common import llamacpp, names
from stages.common.artifacts import stage_output, verify_manifest
from stages.common.cli import StageContext, context, stage_parser
from stages.common.data import with_system
from stages.common.errors import StageError, console, run_stage
from stages.common.gguf_runtime import GGUFModel, read_gguf

# Room for the prompt: the context is the answer budget plus this many tokens.
PROMPT_BUDGET = 1024


def smoke(ctx: StageContext) -> None:
    cfg, layout, run_dir = ctx.cfg, ctx.layout, ctx.run_dir

    # Setup: something to ask, a complete quantize output, a chat template when messages need one.
    if not (cfg.smoke.prompts or cfg.smoke.messages):
        raise StageError("smoke: no prompts or messages configured; add smoke.prompts or smoke.messages")
    verify_manifest(run_dir, names.QUANTIZE)
    path = layout.gguf(cfg.smoke_quant_type)
    info = read_gguf(path)
    if cfg.smoke.messages and not info.get("tokenizer.chat_template"):
        raise StageError(
            f"smoke.messages need a chat template, but {path.name} has no tokenizer.chat_template "
            "(the merged model had none); use smoke.prompts with the prompt format written out"
        )
    system = cfg.data.system_prompt
    n_ctx = cfg.smoke.max_tokens + PROMPT_BUDGET
    cases = [("prompt", p) for p in cfg.smoke.prompts] + [("message", m) for m in cfg.smoke.messages]

    # Run.
    results, failures = [], []
    with GGUFModel(path, n_ctx=n_ctx) as model:
        for i, (kind, given) in enumerate(cases, 1):
            turns = [{"role": "user", "content": given}]
            text = given if kind == "prompt" else model.chat_prompt(with_system(system, turns))
            tokens = model.prompt_tokens(text)
            if len(tokens) > PROMPT_BUDGET:
                raise StageError(
                    f"smoke {kind} {given[:40]!r}... is {len(tokens)} tokens; keep it under {PROMPT_BUDGET}"
                )
            start = time.monotonic()
            gen = model.generate(tokens, cfg.smoke.max_tokens)
            took = time.monotonic() - start
            console.print(
                f"[bold]{kind} {i}/{len(cases)}[/bold] {escape(repr(given))}\n"
                f"  → {escape(repr(gen.text.strip()))} "
                f"(EOS: {'yes' if gen.stopped_at_eos else 'no'}, {len(gen.tokens)} tokens, {took:.1f} s)",
                soft_wrap=True,
            )
            results.append(
                {
                    "kind": kind,
                    "input": given,
                    "prompt_tokens": tokens,
                    "output": gen.text,
                    "output_tokens": gen.tokens,
                    "stopped_at_eos": gen.stopped_at_eos,
                }
            )
            if not gen.text.strip():
                failures.append(f"empty answer to {given!r}")
            elif not gen.stopped_at_eos:
                failures.append(f"no EOS within {cfg.smoke.max_tokens} tokens for {given!r}")
    if failures:
        raise StageError(f"smoke test of {path.name} failed: {'; '.join(failures)}")

    # Cleanup: the answers, for people (smoke.json) and for the build graph (the manifest).
    with stage_output(run_dir, names.SMOKE) as out:
        report = {"gguf": path.name, "system_prompt": system, "max_tokens": cfg.smoke.max_tokens, "answers": results}
        out.path(layout.smoke).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
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
