"""Run and inspect a GGUF with the pinned llama.cpp: one llama.cpp, three ways in.

    from stages.common.gguf_runtime import GGUFModel, complete, read_gguf

- ``read_gguf(path)``: metadata and tensor statistics (parameters, bits per weight) through the
  pinned gguf-py; no model load. The convert and quantize stages record it.
- ``GGUFModel(path)``: the model loaded in-process through the ctypes bindings that ship in the same
  llama-cpp-python sdist as the llama.cpp tree (``src/python/llama_cpp``), against the project's
  libllama. Token-exact work: tokenize, logits at every position, greedy generation that returns
  token ids and stops on llama.cpp's own end-of-generation test. The smoke and evaluate stages and
  the tests use it.
- ``complete(path, prompt=...)`` / ``complete(path, message=...)``: one greedy generation with the
  ``llama-completion`` binary, as a user runs it (its sampler, its prompt tokenization and, for
  ``message``, llama.cpp's own Jinja engine applying the chat template stored in the GGUF). For
  cross-checks and tools.

Greedy decoding everywhere: smoke tests and scores must be reproducible.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from stages.common import llamacpp
from stages.common.errors import StageError

COMPLETION_TOOL = "llama-completion"
# llama-completion prints this on stdout after the generated text when it samples an
# end-of-generation token in one-shot mode (tools/completion/completion.cpp, "end of generation").
END_OF_TEXT = " [end of text]\n"
# ... and always ends stdout with a blank line, generation finished or not.
STDOUT_TRAILER = "\n\n"
GREEDY_ARGS = ("--temp", "0", "--top-k", "1", "--repeat-penalty", "1")
DEFAULT_SEED = 0
# Metadata fields worth keeping in manifests; the vocabulary arrays are left out (megabytes).
SKIPPED_FIELDS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
)


# --- Metadata --------------------------------------------------------------------------------


@cache
def gguf_py():
    """The pinned tree's gguf-py (the gguf image installs no other; locally it wins over PyPI's)."""
    if "gguf" not in sys.modules:
        sys.path.insert(0, str(llamacpp.src_dir() / "gguf-py"))
    try:
        import gguf
    except ImportError as exc:
        raise StageError(f"gguf-py not importable ({exc}); build llama.cpp with `invoke llama-cpp`") from None
    return gguf


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file holds, without loading the model."""

    path: Path
    size_bytes: int
    n_params: int  # elements in all tensors
    tensor_bytes: int  # bytes of tensor data, without metadata and vocab
    file_type: str  # llama.cpp's name for general.file_type, e.g. "MOSTLY_Q4_K_M"
    tensor_types: dict[str, int]  # ggml type -> number of tensors of that type
    largest_tensor_elements: int
    metadata: dict[str, Any] = field(repr=False)

    @property
    def bits_per_weight(self) -> float:
        """Tensor bits per parameter: what llama-quantize reports as BPW (the file also holds the vocab)."""
        return self.tensor_bytes * 8 / self.n_params

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def summary(self) -> dict[str, Any]:
        """Small, JSON-ready: sizes, types, general.* and the special tokens (for manifests)."""
        keep = {
            k: v
            for k, v in self.metadata.items()
            if k.startswith("general.") or (k.startswith("tokenizer.ggml.") and k.endswith(("_id", "_token", ".model")))
        }
        return {
            "size_bytes": self.size_bytes,
            "n_params": self.n_params,
            "bits_per_weight": round(self.bits_per_weight, 3),
            "file_type": self.file_type,
            "tensor_types": self.tensor_types,
            "has_chat_template": bool(self.get("tokenizer.chat_template")),
            "metadata": keep,
        }


def read_gguf(path: Path) -> GGUFInfo:
    """Metadata and tensor statistics of `path`; StageError when it is missing or not a GGUF."""
    if not path.is_file():
        raise StageError(f"GGUF {path} not found; run the convert/quantize stages first")
    gguf = gguf_py()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise StageError(f"{path} is not a readable GGUF ({exc}); rerun the stage that wrote it") from None
    metadata = {k: f.contents() for k, f in reader.fields.items() if k not in SKIPPED_FIELDS}
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    ftype = metadata.get("general.file_type")
    try:
        ftype_name = gguf.LlamaFileType(ftype).name if ftype is not None else "unknown"
    except ValueError:
        ftype_name = str(ftype)
    return GGUFInfo(
        path=path,
        size_bytes=path.stat().st_size,
        n_params=sum(int(t.n_elements) for t in reader.tensors),
        tensor_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        file_type=ftype_name,
        tensor_types=dict(sorted(types.items())),
        largest_tensor_elements=max((int(t.n_elements) for t in reader.tensors), default=0),
        metadata=metadata,
    )


# --- Generation with the llama-completion binary -----------------------------------------------


@dataclass(frozen=True)
class Completion:
    text: str
    stopped_at_eos: bool
    command: list[str]


def completion_command(
    model: Path,
    *,
    prompt: str | None = None,
    message: str | None = None,
    system: str | None = None,
    max_tokens: int = 128,
    n_ctx: int = 2048,
    seed: int = DEFAULT_SEED,
    threads: int | None = None,
) -> list[str]:
    """The llama-completion command line for one greedy generation (see `complete`)."""
    if (prompt is None) == (message is None):
        raise ValueError("pass exactly one of prompt= (raw text) or message= (a user turn)")
    cmd = [str(llamacpp.tool(COMPLETION_TOOL)), "-m", str(model), "-n", str(max_tokens), "-c", str(n_ctx)]
    cmd += [*GREEDY_ARGS, "--seed", str(seed), "--no-display-prompt", "--simple-io", "--no-escape"]
    if threads:
        cmd += ["-t", str(threads)]
    if prompt is not None:
        # One-shot on the raw text; llama.cpp adds BOS itself when the vocab asks for it.
        return [*cmd, "-no-cnv", "-p", prompt]
    # One user turn rendered by llama.cpp's Jinja engine with the GGUF's own chat template (as
    # llama-server does); -st answers once and exits, so the run ends like a -no-cnv one.
    cmd += ["-cnv", "-st", "--jinja", "-p", message]
    return [*cmd, "-sys", system] if system else cmd


def parse_completion(stdout: str) -> tuple[str, bool]:
    """(generated text, whether an end-of-generation token ended it) from llama-completion's stdout."""
    body = stdout.removesuffix(STDOUT_TRAILER)
    if body.endswith(END_OF_TEXT):
        return body.removesuffix(END_OF_TEXT), True
    return body, False


def complete(model: Path, *, timeout: float | None = None, **kwargs: Any) -> Completion:
    """Generate once with llama-completion (greedy); see `completion_command` for the arguments.
    stdin is closed, so a run that ever turned interactive ends instead of waiting for a user."""
    if not model.is_file():
        raise StageError(f"GGUF {model} not found; run the convert/quantize stages first")
    cmd = completion_command(model, **kwargs)
    try:
        proc = subprocess.run(
            cmd, env=llamacpp.tool_env(), stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise StageError(f"{COMPLETION_TOOL} on {model.name} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        last = next((ln for ln in reversed(err) if "error" in ln.lower()), err[-1] if err else "no output")
        raise StageError(f"{COMPLETION_TOOL} failed on {model.name} (exit {proc.returncode}): {last.strip()}")
    text, eos = parse_completion(proc.stdout.decode(errors="replace"))
    return Completion(text=text, stopped_at_eos=eos, command=cmd)


# --- In-process: the ctypes bindings ---------------------------------------------------------


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
    """One GGUF loaded in-process. Use as a context manager, or call close()."""

    def __init__(
        self,
        path: Path,
        n_ctx: int = 1024,
        logits_all: bool = False,
        n_threads: int | None = None,
        lora: Path | None = None,
        vocab_only: bool = False,
    ):
        """`lora`: a LoRA GGUF (convert_lora_to_gguf.py) applied at scale 1, as `llama-cli --lora`;
        `vocab_only`: tokenize and render templates without touching the weights (a 7B f16 file
        would otherwise be paged in)."""
        llama_cpp = bindings()
        for f in (path, lora):
            if f is not None and not f.is_file():
                raise StageError(f"GGUF {f} not found; run the convert/quantize stages first")
        self.path = path
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            lora_path=str(lora) if lora else None,
            n_ctx=n_ctx,
            logits_all=logits_all,
            n_threads=n_threads or os.cpu_count(),
            seed=DEFAULT_SEED,
            verbose=False,
            vocab_only=vocab_only,
        )
        self.metadata: dict[str, str] = dict(self.llm.metadata)
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._eos_ids: set[int] | None = None

    def __enter__(self) -> GGUFModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def eos_ids(self) -> set[int]:
        """Every end-of-generation token the vocab declares (EOS, EOT, <|im_end|>, ...)."""
        if self._eos_ids is None:
            llama_cpp = bindings()
            n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
            self._eos_ids = {t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)}
        return self._eos_ids

    def metadata_int(self, key: str) -> int | None:
        value = self.metadata.get(key)
        return int(value) if value is not None else None

    @property
    def add_bos(self) -> bool:
        """Whether llama.cpp prepends BOS when tokenizing a prompt (tokenizer.ggml.add_bos_token)."""
        return bool(bindings().llama_vocab_get_add_bos(self._vocab))

    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids as llama.cpp makes them; `special` parses "<s>", "<|im_start|>" as control tokens."""
        return self.llm.tokenize(text.encode(), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode(errors="replace")

    def token_text(self, token: int) -> str:
        """The vocab text of a (special) token, as chat templates spell it ("<s>", "<|im_end|>")."""
        if token < 0:
            return ""
        return bindings().llama_vocab_get_text(self._vocab, token).decode(errors="replace")

    def logits(self, tokens: list[int]):
        """float32 logits (len(tokens), n_vocab) for every position; needs logits_all=True."""
        import numpy as np

        if not self.llm._logits_all:
            raise ValueError("GGUFModel(..., logits_all=True) is needed for logits at every position")
        if len(tokens) > self.llm.n_ctx():
            raise ValueError(f"{len(tokens)} tokens do not fit the context of {self.llm.n_ctx()}")
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def chat_prompt(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """`messages` rendered with the chat template stored in the GGUF, in the Jinja environment
        transformers uses (the bindings' Jinja2ChatFormatter), ready for the answer."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.metadata.get("tokenizer.chat_template")
        if not template:
            raise StageError(f"{self.path.name} has no tokenizer.chat_template; use raw prompts instead")
        formatter = Jinja2ChatFormatter(
            template,
            eos_token=self.token_text(self.llm.token_eos()),
            bos_token=self.token_text(self.llm.token_bos()),
            add_generation_prompt=add_generation_prompt,
        )
        try:
            return formatter(messages=messages).prompt
        except ValueError as exc:  # the template's own raise_exception()
            raise StageError(f"chat template of {self.path.name} refused the messages: {exc}") from None

    def prompt_tokens(self, text: str) -> list[int]:
        """Tokens of a rendered prompt with exactly one BOS: llama.cpp's rule (common/chat.cpp) of
        not adding BOS when the template already wrote it."""
        bos = self.token_text(self.llm.token_bos())
        return self.tokenize(text, add_bos=self.add_bos and not (bos and text.startswith(bos)), special=True)

    def generate(self, prompt_tokens: list[int], max_tokens: int) -> Generation:
        """Greedy continuation; stops at an end-of-generation token or after `max_tokens` tokens."""
        eos = self.eos_ids
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
