"""Shared fixtures: tiny real models built here, and the pinned llama.cpp when it is built."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tiny_models import build_tiny_mistral

from stages.common import llamacpp


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> Path:
    return build_tiny_mistral(tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="session")
def llama_cpp_built() -> Path:
    if not llamacpp.is_built():
        pytest.skip("pinned llama.cpp (this version and patch) not built; run `invoke llama-cpp` (the CI builds it)")
    return llamacpp.home()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def repeat_rows(n: int, seed: int = 0) -> list[dict]:
    """A chat task a tiny model learns in a few dozen steps: echo a letter four times."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = rng.choice("abcdefgh")
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"repeat {a}"},
                    {"role": "assistant", "content": f"{a} {a} {a} {a}"},
                ]
            }
        )
    return rows


def as_text(rows: list[dict]) -> list[dict]:
    """The same rows in the reference recipe's `text` format (Llama-2 [INST] prompts, as guanaco-llama2-1k)."""
    return [{"text": f"[INST] {r['messages'][0]['content']} [/INST] {r['messages'][1]['content']}"} for r in rows]
