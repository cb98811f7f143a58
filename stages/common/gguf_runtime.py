"""Run a GGUF in-process through the pinned llama.cpp: tokenize, logits, greedy generation.

It uses the ctypes bindings that ship in the same llama-cpp-python sdist as the llama.cpp tree
(``src/python/llama_cpp``), loaded against the libllama built by the project: one llama.cpp,
no second compile. The smoke and evaluate stages and the tests use it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from stages.common import llamacpp
from stages.common.errors import StageError


@cache
def bindings():
    lib_dir = llamacpp.bin_dir()
    if not (lib_dir / "libllama.so").is_file():
        raise StageError(f"libllama.so not found in {lib_dir}; build llama.cpp with `invoke llama-cpp`")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    sys.path.insert(0, str(llamacpp.src_dir() / "python"))
    import llama_cpp

    return llama_cpp


@dataclass
class Generation:
    text: str
    tokens: list[int]
    stopped_at_eos: bool


class GGUFModel:
    """One loaded GGUF. Greedy decoding only: smoke tests and scores must be reproducible."""

    def __init__(self, path: Path, n_ctx: int = 1024, logits_all: bool = False, n_threads: int | None = None):
        llama_cpp = bindings()
        if not path.is_file():
            raise StageError(f"GGUF {path} not found; run the convert/quantize stages first")
        self.path = path
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            logits_all=logits_all,
            n_threads=n_threads or os.cpu_count(),
            seed=0,
            verbose=False,
        )
        self.metadata: dict[str, str] = dict(self.llm.metadata)

    @property
    def eos_ids(self) -> set[int]:
        """Every end-of-generation token the vocab declares (EOS, EOT, ...)."""
        llama_cpp = bindings()
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        return {t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)}

    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode(errors="replace")

    def logits(self, tokens: list[int]):
        """float32 logits for every position of `tokens` (needs logits_all=True)."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """Render `messages` with the chat template stored in the GGUF, ready for the answer."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = self.metadata.get("tokenizer.chat_template")
        if not template:
            raise StageError(f"{self.path.name} has no tokenizer.chat_template; use raw smoke prompts instead")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        return env.from_string(template).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=self.token_text(self.llm.token_bos()),
            eos_token=self.token_text(self.llm.token_eos()),
        )

    def token_text(self, token: int) -> str:
        """The vocab text of a (special) token, as chat templates spell it ("<s>", "<|im_end|>")."""
        llama_cpp = bindings()
        if token < 0:
            return ""
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        return llama_cpp.llama_vocab_get_text(vocab, token).decode(errors="replace")

    def prompt_tokens(self, text: str) -> list[int]:
        """Tokens of a rendered prompt: BOS added only when the text does not already start with it."""
        bos = self.token_text(self.llm.token_bos())
        add_bos = self.metadata.get("tokenizer.ggml.add_bos_token", "true") == "true"
        return self.tokenize(text, add_bos=add_bos and not (bos and text.startswith(bos)), special=True)

    def generate(self, prompt_tokens: list[int], max_tokens: int) -> Generation:
        eos = self.eos_ids
        self.llm.reset()
        out: list[int] = []
        for tok in self.llm.generate(prompt_tokens, temp=0.0, top_k=1, reset=True):
            if tok in eos:
                return Generation(self.detokenize(out), out, True)
            out.append(tok)
            if len(out) >= max_tokens:
                break
        return Generation(self.detokenize(out), out, False)

    def close(self) -> None:
        self.llm.close()


def _raise(message: str):
    raise StageError(f"chat template: {message}")
