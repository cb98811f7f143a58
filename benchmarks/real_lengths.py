"""Row lengths of real text, for benchmarks/train_throughput.py --lengths: a stand-in for
guanaco-llama2-1k, whose rows cannot be fetched here (no Hub access on any host).

    python benchmarks/real_lengths.py benchmarks/data/stdlib-row-lengths.json

Rows: the top-level blocks (each `def` or `class` with its docstring and body, and the text between
them) of the Python standard library's modules, in sorted order, tests excluded: real, unedited text
with a heavy-tailed length distribution. Tokens: UTF-8 bytes / 3.6, the average bytes per token of
Llama-2/Mistral's 32k SentencePiece vocabulary on English and code (an estimate: the Mistral
tokenizer cannot be fetched either). Rows under 16 or over 1024 tokens are left out, as the train
stage drops rows over data.max_seq_length. What it is not: chat turns of an instruction dataset;
guanaco's rows are one human turn plus one assistant turn.
"""

from __future__ import annotations

import json
import re
import sys
import sysconfig
from pathlib import Path

BYTES_PER_TOKEN = 3.6
BLOCK = re.compile(r"^(?=def |class |async def )", re.MULTILINE)


def lengths() -> list[int]:
    out = []
    for source in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in source.parts or "tests" in source.parts or "site-packages" in source.parts:
            continue
        for block in BLOCK.split(source.read_text(errors="replace")):
            tokens = round(len(block.encode()) / BYTES_PER_TOKEN)
            if 16 <= tokens <= 1024:
                out.append(tokens)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    values = lengths()
    Path(args[0]).write_text(json.dumps(values) + "\n")
    values.sort()
    print(f"{len(values)} rows, median {values[len(values) // 2]}, mean {sum(values) / len(values):.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
