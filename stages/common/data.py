"""Training rows: read local JSONL/Parquet files, check them, and shape them for trl.

Formats are registered classes behind one interface (`RowFormat`). Each turns a raw row into
one of the two shapes trl's SFTTrainer takes:

- language modeling, ``{"text": ...}`` (format ``text``): loss on every token; trl appends EOS;
- conversational prompt-completion, ``{"prompt": [messages], "completion": [last assistant
  message]}`` (formats ``alpaca`` and ``chat``): rendered with the tokenizer's chat template,
  loss on the completion only, which ends with the template's end-of-turn token (EOS).

Either way EOS is a label: trl masks labels by the attention mask, not by the pad token id, so
a pad token equal to EOS does not hide it (tests/test_data.py checks this).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from stages.common.config import DataConfig
from stages.common.errors import StageError


class RowFormat:
    """Turn one raw row into a trl row, or None when the row is empty or malformed."""

    name: ClassVar[str]
    required: ClassVar[tuple[str, ...]]
    registry: ClassVar[dict[str, type[RowFormat]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        RowFormat.registry[cls.name] = cls

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def required_fields(self) -> tuple[str, ...]:
        return self.required

    def convert(self, row: dict[str, Any]) -> dict[str, Any] | None:
        raise NotImplementedError

    def problem(self, row: dict[str, Any]) -> str | None:
        """Why `convert` refuses `row`, in a few words for `invoke check`; None when it takes it."""
        raise NotImplementedError


def _text_problem(row: dict[str, Any], name: str) -> str | None:
    if name not in row:
        return f"no {name!r} field"
    if not isinstance(row[name], str):
        return f"{name!r} is a {type(row[name]).__name__}, not text"
    return f"{name!r} is empty" if not row[name].strip() else None


def with_system(system_prompt: str | None, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """`messages` after the system prompt, unless there is none or they open with their own."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


class TextFormat(RowFormat):
    """One field holding the whole training text, already in the model's prompt format."""

    name = "text"
    required = ()

    def required_fields(self) -> tuple[str, ...]:
        return (self.cfg.text_field,)

    def convert(self, row):
        text = row.get(self.cfg.text_field)
        return {"text": text} if isinstance(text, str) and text.strip() else None

    def problem(self, row):
        return _text_problem(row, self.cfg.text_field)


class AlpacaFormat(RowFormat):
    """instruction / input / output rows (Stanford Alpaca)."""

    name = "alpaca"
    required = ("instruction", "output")

    def convert(self, row):
        instruction, extra, output = row.get("instruction"), row.get("input") or "", row.get("output")
        if not (isinstance(instruction, str) and instruction.strip() and isinstance(output, str) and output.strip()):
            return None
        if not isinstance(extra, str):
            return None
        user = f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() else instruction.strip()
        return {
            "prompt": with_system(self.cfg.system_prompt, [{"role": "user", "content": user}]),
            "completion": [{"role": "assistant", "content": output.strip()}],
        }

    def problem(self, row):
        for name in self.required:
            if why := _text_problem(row, name):
                return why
        extra = row.get("input")
        return f"'input' is a {type(extra).__name__}, not text" if extra and not isinstance(extra, str) else None


class ChatFormat(RowFormat):
    """`messages`: a list of {role, content}, ending with the assistant turn to learn."""

    name = "chat"
    required = ("messages",)
    roles = frozenset({"system", "user", "assistant"})

    def convert(self, row):
        messages = row.get("messages")
        if not isinstance(messages, list) or len(messages) < 2:
            return None
        for m in messages:
            if not (isinstance(m, dict) and m.get("role") in self.roles and isinstance(m.get("content"), str)):
                return None
            if not m["content"].strip():
                return None
        if messages[-1]["role"] != "assistant":
            return None
        prompt = with_system(
            self.cfg.system_prompt, [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        )
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": messages[-1]["content"]}]}

    def problem(self, row):
        messages = row.get("messages")
        if "messages" not in row:
            return "no 'messages' field"
        if not isinstance(messages, list):
            return f"'messages' is a {type(messages).__name__}, not a list of turns"
        if len(messages) < 2:
            return f"'messages' has {len(messages)} turn(s); a prompt and the assistant's answer make at least 2"
        for i, m in enumerate(messages, 1):
            if not isinstance(m, dict):
                return f"turn {i} is a {type(m).__name__}, not an object with role and content"
            if m.get("role") not in self.roles:
                return f"turn {i} has role {m.get('role')!r}; expected one of {', '.join(sorted(self.roles))}"
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                return f"turn {i} has no text content"
        last = messages[-1]["role"]
        return f"the last turn is the {last}'s, not the assistant's" if last != "assistant" else None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of one JSONL or Parquet file. A line that is not a JSON object becomes {} (counted as bad)."""
    if not path.is_file():
        raise StageError(f"data file {path} not found; check data.train_files / data.eval_files in the config")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix not in (".jsonl", ".json"):
        raise StageError(f"data file {path} is {path.suffix or 'extension-less'}; expected .jsonl or .parquet")
    rows = []
    with path.open() as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = {}
            rows.append(obj if isinstance(obj, dict) else {})
    return rows


@dataclass
class RowReport:
    """What was dropped and why; the train stage logs it and puts it in its manifest."""

    total: int = 0
    kept: int = 0
    malformed: int = 0
    too_long: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return self.malformed + self.too_long


def load_rows(files: list[str], cfg: DataConfig) -> tuple[list[dict[str, Any]], RowReport]:
    fmt = RowFormat.registry[cfg.format](cfg)
    out: list[dict[str, Any]] = []
    report = RowReport()
    for name in files:
        path = Path(name)
        rows = read_rows(path)
        fields = set().union(*(r.keys() for r in rows)) if rows else set()
        missing = [f for f in fmt.required_fields() if f not in fields]
        if missing:
            raise StageError(
                f"{path}: no {', '.join(repr(m) for m in missing)} field for data.format={cfg.format!r} "
                f"(found fields: {', '.join(sorted(fields)) or 'none'}); set data.format/data.text_field to match "
                "the file, or convert the file"
            )
        for i, row in enumerate(rows):
            report.total += 1
            converted = fmt.convert(row)
            if converted is None:
                report.malformed += 1
                if len(report.examples) < 3:
                    report.examples.append(f"{path.name}:{i + 1}")
                continue
            out.append(converted)
    report.kept = len(out)
    return out, report


def split_rows(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of the rows (seeded), for configs without eval_files."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(rows) * fraction))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def render(row: dict[str, Any], tokenizer) -> str:
    """The full training text of a trl row (for length checks and logs)."""
    if "text" in row:
        return row["text"]
    return tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)


def drop_too_long(rows: list[dict[str, Any]], tokenizer, max_len: int, report: RowReport) -> list[dict[str, Any]]:
    """Drop rows longer than max_len tokens: truncating would cut off the answer and its EOS."""
    kept = []
    for row in rows:
        n = len(tokenizer(render(row, tokenizer), add_special_tokens=False)["input_ids"])
        if n > max_len:
            report.too_long += 1
        else:
            kept.append(row)
    report.kept = len(kept)
    return kept


def check_report(report: RowReport, max_bad_fraction: float, what: str) -> None:
    if report.total == 0:
        raise StageError(f"{what}: no rows found; check the data files")
    if report.kept == 0 or report.dropped / report.total > max_bad_fraction:
        raise StageError(
            f"{what}: {report.dropped} of {report.total} rows dropped ({report.malformed} empty or malformed, "
            f"{report.too_long} over data.max_seq_length; first: {', '.join(report.examples) or 'n/a'}), "
            f"more than data.max_bad_fraction={max_bad_fraction}; fix the data or raise the limit"
        )


@dataclass
class Split:
    """The rows a run trains on and the rows it holds out, as every stage sees them."""

    train: list[dict[str, Any]]
    held_out: list[dict[str, Any]]
    train_report: RowReport
    held_out_report: RowReport | None  # None: held out from train_files by data.eval_fraction


def train_files(cfg: DataConfig) -> list[str]:
    """The files that hold the training rows: data.train_files, or for a Hub dataset (data.dataset)
    the file the prepare stage wrote under cache/ (hub_data.py)."""
    if not cfg.dataset:
        return list(cfg.train_files)
    from stages.common.hub_data import local_file

    return [str(local_file(cfg))]


def train_and_held_out(cfg: DataConfig, seed: int) -> Split:
    """The one split of a run's rows: data.eval_files when given, else data.eval_fraction of the
    training files, shuffled with `seed` (training.seed)."""
    files = train_files(cfg)
    if cfg.dataset and not Path(files[0]).is_file():
        raise StageError(
            f"data.dataset {cfg.dataset} has not been fetched ({files[0]} is missing); run the prepare stage "
            "first (invoke pipeline does)"
        )
    train, report = load_rows(files, cfg)
    if cfg.eval_files:
        held, held_report = load_rows(cfg.eval_files, cfg)
        return Split(train, held, report, held_report)
    train, held = split_rows(train, cfg.eval_fraction, seed)
    return Split(train, held, report, None)


def plain_text(rows: list[dict[str, Any]]) -> str:
    """The rows' text without any template, one row per paragraph: what llama-perplexity and
    llama-imatrix read (they tokenize without parsing control tokens, so a rendered template would
    be scored as plain text, which no model sees)."""
    parts = [r["text"] if "text" in r else "\n".join(m["content"] for m in r["prompt"] + r["completion"]) for r in rows]
    return "\n\n".join(parts) + "\n"
