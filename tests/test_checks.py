"""Up-front checks (`invoke check`, and `invoke pipeline` before its first stage): bad inputs found in
seconds, one line each (what, where, fix), non-zero exit, and no stage started. Real files, a real
tiny model folder, the real `invoke` entry point."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import repeat_rows, write_jsonl

from stages.common import disk, specs
from stages.common.checks import ERROR, NOTE, OK, run_checks
from stages.common.config import load_config
from stages.common.errors import StageError
from stages.common.vram import GiB, Gpu

ROOT = Path(__file__).resolve().parents[1]


def config(tmp_path: Path, model: Path, train: list[str], **data) -> Path:
    tree = {
        "run_name": "checked",
        "model": {"name_or_path": str(model)},
        "data": {"train_files": train, "format": "chat", **data},
        "training": {"device": "cpu"},
    }
    path = tmp_path / "checked.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def errors(cfg_path: Path, **kw) -> list[str]:
    cfg = load_config(cfg_path)
    return [f.line() for f in run_checks(cfg, cfg_path.parent / "runs" / "checked", **kw) if f.level == ERROR]


@pytest.fixture
def good(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", repeat_rows(40))


def test_good_inputs_pass(tmp_path, tiny_mistral, good):
    cfg = load_config(config(tmp_path, tiny_mistral, [str(good)]))
    found = run_checks(cfg, tmp_path / "runs" / "checked")
    assert [f.line() for f in found if f.level == ERROR] == []
    oks = " ".join(f.line() for f in found if f.level == OK)
    assert "1 file(s), 40 rows fit data.format=chat" in oks and "tokenizer present" in oks and "GiB free" in oks


def test_truncated_last_jsonl_line(tmp_path, tiny_mistral, good):
    raw = good.read_bytes()
    good.write_bytes(raw[: len(raw) - 20])  # cut inside the last row, as an interrupted download leaves it
    (line,) = errors(config(tmp_path, tiny_mistral, [str(good)]))
    assert line.startswith(f"{good}:40: cut short") and "download or copy it again" in line


def test_gzip_file_named_jsonl(tmp_path, tiny_mistral, good):
    packed = tmp_path / "packed.jsonl"
    packed.write_bytes(gzip.compress(good.read_bytes()))
    (line,) = errors(config(tmp_path, tiny_mistral, [str(packed)]))
    assert line.startswith(f"{packed}: is gzip-compressed, but named .jsonl") and "gzip -dc" in line


def test_chat_row_ending_with_the_user_turn(tmp_path, tiny_mistral):
    rows = repeat_rows(10)
    for row in rows[3:6]:  # 3 of 10: above data.max_bad_fraction (0.05)
        row["messages"].append({"role": "user", "content": "and again?"})
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    (line,) = errors(config(tmp_path, tiny_mistral, [str(path)]))
    assert line.startswith(f"{path}:4: the last turn is the user's, not the assistant's (3 of 10 rows")
    assert "lines 4, 5, 6" in line and "max_bad_fraction" in line
    # Under the limit it is a note: the train stage drops those rows.
    cfg = load_config(config(tmp_path, tiny_mistral, [str(path)], max_bad_fraction=0.5))
    notes = [f.line() for f in run_checks(cfg, tmp_path / "runs") if f.level == NOTE]
    assert any("the train stage drops them" in n for n in notes)


def test_model_folder_without_tokenizer(tmp_path, tiny_mistral, good):
    model = tmp_path / "model"
    shutil.copytree(tiny_mistral, model)
    for f in ("tokenizer.model", "tokenizer.json"):
        (model / f).unlink(missing_ok=True)
    (line,) = errors(config(tmp_path, model, [str(good)]))
    assert line.startswith(f"{model}: has no tokenizer") and "save_pretrained" in line


def test_chat_data_needs_a_chat_template(tmp_path, tiny_mistral, good):
    model = tmp_path / "model"
    shutil.copytree(tiny_mistral, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tok = json.loads((model / "tokenizer_config.json").read_text())
    tok.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tok))
    (line,) = errors(config(tmp_path, model, [str(good)]))
    assert "has no chat template, and data.format=chat renders every row with one" in line


def test_quant_type_typo_fails_at_config_load(tmp_path, tiny_mistral, good):
    path = config(tmp_path, tiny_mistral, [str(good)])
    with pytest.raises(StageError, match=r"gguf.quant_types: 'Q6_X' is not a quant type .*did you mean 'Q6_K'"):
        load_config(path, ["gguf.quant_types=[Q4_K_M,Q6_X]"])
    with pytest.raises(StageError, match=r"smoke.quant_type 'Q8' is not among .*did you mean 'Q8_0'"):
        load_config(path, ["smoke.quant_type=Q8"])


def test_data_path_that_is_a_directory(tmp_path, tiny_mistral, good):
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(good, folder / "part-0.jsonl")
    (line,) = errors(config(tmp_path, tiny_mistral, [str(folder)]))
    assert line == f"{folder}: is a directory, not a data file (data.train_files); list its files instead: part-0.jsonl"


def test_missing_file_wrong_field_and_pickled_model(tmp_path, tiny_mistral, good):
    text_rows = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "a", "answer": "b"}] * 3)
    path = config(tmp_path, tiny_mistral, [str(tmp_path / "nope.jsonl"), str(text_rows)], format="text")
    first, second = errors(path)
    missing = tmp_path / "nope.jsonl"
    assert first == f"{missing}: not found (data.train_files); fix the path in data.train_files, or create the file"
    assert "no 'text' field in any row for data.format=text (found fields: answer, prompt)" in second
    model = tmp_path / "pickled"
    shutil.copytree(tiny_mistral, model)
    for f in model.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    assert any("only pickled weights" in e for e in errors(config(tmp_path, model, [str(good)])))


def test_cuda_config_without_a_visible_gpu(tmp_path, tiny_mistral, good):
    path = config(tmp_path, tiny_mistral, [str(good)])
    cfg = load_config(path, ["training.device=cuda"])
    (finding,) = [f for f in run_checks(cfg, tmp_path / "runs", gpus=[]) if f.level == ERROR]
    assert finding.line().startswith("training.device=cuda: no NVIDIA GPU is visible")
    # A card too small for the estimate: both numbers and the profile that fits.
    card = Gpu(0, "Tiny GPU", 1 * GiB, int(0.2 * GiB))
    (finding,) = [f for f in run_checks(cfg, tmp_path / "runs", gpus=[card]) if f.level == ERROR]
    assert "the train stage needs about" in finding.what and "Tiny GPU has 0.2 GiB free" in finding.what


def test_disk_estimate_follows_pruning():
    cfg = load_config(ROOT / "configs" / "mistral-7b-guanaco.yaml")
    size = disk.ModelSize(params=7_241_732_096, vocab=32_000, lora_params=92_274_688)
    plan = disk.run_disk(cfg, size, specs.enabled(cfg))
    # The merged weights' one reader is convert, so they are gone by quantize; at report the f16
    # GGUF (13.5 GiB), its saved logits (2 chunks of 512 at 7B: 0.06 GiB) and the three quantized
    # types (17.7 GiB) are there; after report the f16 file and the logits go too.
    assert 31 * GiB < plan.run_peak < 33 * GiB
    kept = disk.run_disk(cfg, size, specs.enabled(cfg), pruned=())  # merged weights and f16 kept
    assert kept.run_peak - plan.run_peak == 2 * size.params
    keep = load_config(ROOT / "configs" / "mistral-7b-guanaco.yaml", ["keep.merged=true"])
    assert disk.run_disk(keep, size, specs.enabled(keep)).run_peak == kept.run_peak


def _invoke(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=cwd, capture_output=True, text=True)


def test_invoke_check_and_pipeline_stop_before_any_stage(tmp_path, tiny_mistral, good):
    raw = good.read_bytes()
    good.write_bytes(raw[:-20])
    folder = tmp_path / "data"
    folder.mkdir()
    path = config(tmp_path, tiny_mistral, [str(good)], eval_files=[str(folder)])
    for task in ("check", "pipeline"):
        run_dir = tmp_path / "runs" / task
        proc = _invoke(task, "--config", str(path), "--runtime", "local", "--run-dir", str(run_dir))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 2 and "cut short" in lines[0] and "is a directory" in lines[1], proc.stderr
        assert "2 problem(s) found before any stage started" in proc.stderr
        assert not run_dir.exists(), "no stage started"


def test_invoke_check_on_the_demo_config_takes_seconds():
    t0 = time.monotonic()
    proc = _invoke("check", "--runtime", "local")
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert "all checks passed" in proc.stdout
    assert took <= 5.0, f"invoke check took {took:.1f} s"
