"""Data formats, bad rows, and the labels the trainer really sees (EOS kept, padding masked)."""

from __future__ import annotations

import pytest
import yaml
from conftest import repeat_rows, write_jsonl

from stages.common.config import DataConfig, load_config
from stages.common.data import load_rows, split_rows
from stages.common.errors import StageError


def cfg(tmp_path, fmt, rows, **kw) -> DataConfig:
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    return DataConfig(train_files=[str(path)], format=fmt, **kw)


def test_text_format(tmp_path):
    c = cfg(tmp_path, "text", [{"text": "<s>[INST] hi [/INST] hello"}, {"text": ""}], text_field="text")
    rows, report = load_rows(c.train_files, c)
    assert rows == [{"text": "<s>[INST] hi [/INST] hello"}]
    assert (report.total, report.kept, report.malformed) == (2, 1, 1)


def test_alpaca_format(tmp_path):
    c = cfg(
        tmp_path,
        "alpaca",
        [
            {"instruction": "Add", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
        ],
        system_prompt="Be brief.",
    )
    rows, _ = load_rows(c.train_files, c)
    assert rows[0]["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add\n\n2 and 3"},
    ]
    assert rows[0]["completion"] == [{"role": "assistant", "content": "5"}]
    assert rows[1]["prompt"][-1]["content"] == "Say hi"


def test_chat_format_learns_the_last_assistant_turn(tmp_path):
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    c = cfg(tmp_path, "chat", [{"messages": msgs}, {"messages": msgs[:1]}, {"messages": "oops"}])
    rows, report = load_rows(c.train_files, c)
    assert rows == [{"prompt": msgs[:3], "completion": msgs[3:]}]
    assert report.malformed == 2


def test_missing_field_names_file_and_fields(tmp_path):
    c = cfg(tmp_path, "text", [{"content": "x"}], text_field="text")
    with pytest.raises(
        StageError, match=r"d\.jsonl: no 'text' field for data\.format='text' \(found fields: content\)"
    ):
        load_rows(c.train_files, c)


def test_split_is_seeded_and_disjoint():
    rows = [{"text": str(i)} for i in range(100)]
    a_train, a_eval = split_rows(rows, 0.1, seed=3)
    _, b_eval = split_rows(rows, 0.1, seed=3)
    assert a_eval == b_eval and len(a_eval) == 10
    assert not {r["text"] for r in a_train} & {r["text"] for r in a_eval}


def test_too_many_bad_rows_fail_the_run(tmp_path, tiny_mistral):
    from stages.common.data import check_report

    c = cfg(tmp_path, "chat", repeat_rows(5) + [{"messages": []}] * 5)
    _, report = load_rows(c.train_files, c)
    with pytest.raises(StageError, match=r"5 of 10 rows dropped \(5 empty or malformed"):
        check_report(report, 0.05, "training data")


@pytest.mark.parametrize("fmt", ["text", "chat"])
def test_eos_is_a_label_and_padding_is_not(tmp_path, tiny_mistral, fmt):
    """The batches the trainer builds: every row ends with EOS as a label, even though pad == EOS."""
    from stages.train import build_trainer, load_tokenizer

    rows = repeat_rows(8)
    if fmt == "text":
        rows = [{"text": f"[INST] {r['messages'][0]['content']} [/INST] {r['messages'][1]['content']}"} for r in rows]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "run_name": "t",
                "model": {"name_or_path": str(tiny_mistral)},
                "data": {"train_files": [str(data)], "format": fmt, "max_seq_length": 64},
                "training": {"device": "cpu", "max_steps": 1, "batch_size": 8, "group_by_length": False},
                "lora": {"r": 4, "target_modules": ["q_proj"]},
            }
        )
    )
    c = load_config(cfg_path)
    tok = load_tokenizer(tiny_mistral, c)
    assert tok.pad_token_id == tok.eos_token_id  # the hard case: pad and EOS share an id
    train_rows, _ = load_rows(c.data.train_files, c.data)
    trainer = build_trainer(c, tiny_mistral, tok, train_rows, [], tmp_path / "ck", "cpu")
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    lengths = {int(m.sum()) for m in mask}
    assert len(lengths) > 1 or fmt == "chat", "rows of different lengths, so some are padded"
    for row_ids, row_labels, row_mask in zip(ids, labels, mask, strict=True):
        last = int(row_mask.sum()) - 1
        assert int(row_ids[last]) == tok.eos_token_id
        assert int(row_labels[last]) == tok.eos_token_id, "EOS must be a label: the model learns to stop"
        assert (row_labels[last + 1 :] == -100).all(), "padding is never a label"
        if fmt == "chat":
            # prompt-completion: only the answer (and its EOS) is learned
            n_labels = int((row_labels != -100).sum())
            assert 2 <= n_labels < last
