"""The train stage's GPU-memory estimate (vram.py) against every configuration measured on an H200
with benchmarks/train_throughput.py (Mistral-7B shapes, synthetic lengths median 380 / mean 444 /
max 1024), within ±15 %; and what the fit check and `--profile auto` do with it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stages.common import vram
from stages.common.config import load_config
from stages.common.errors import StageError
from stages.common.gpu_fit import auto_profile, misfit
from stages.common.profiles import profile_overrides
from stages.common.vram import GiB, Gpu

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RECIPE = ROOT / "configs" / "mistral-7b-guanaco.yaml"
TOLERANCE = 0.15

# One line per measured point: a results file (its overrides and peak_allocated_gib are read), or
# (overrides on the recipe, measured GiB, where it was measured) for a figure sent without one.
POINTS: list[str | tuple[list[str], float, str]] = [
    "train-throughput-reference-1gpu-20261129T044510Z.json",  # the recipe as published: 30.76
    "train-throughput-24gb-nodrop-b40-1gpu-20261129T044510Z.json",  # today's 24gb profile: 21.12
    "train-throughput-12gb-1gpu-20261129T044510Z.json",  # the 12gb profile: 7.90
    "train-throughput-24gb-1gpu-20261129T043120Z.json",  # batch 32, dropout 0.1: 19.34
    "train-throughput-24gb-nodrop-1gpu-20261129T012036Z.json",  # batch 32, dropout 0: 17.71
    "train-throughput-24gb-b40-1gpu-20261129T011411Z.json",  # batch 40, dropout 0.1: 23.15
    "exploration/train-throughput-12gb-20261128T211724Z.json",  # batch 4, checkpointing, Liger: 6.01
    "exploration/train-throughput-24gb-20261128T211724Z.json",  # batch 16, checkpointing, Liger: 11.71
    "train-throughput-24gb-1gpu-new-20261130T071133Z.json",  # 24gb with fused LoRA: 21.12
    "train-throughput-24gb-1gpu-b80-20261130T071915Z.json",  # 24gb at batch 80: 38.13
    "train-throughput-vram-b16-ckpt-1gpu-vram-20261130T071915Z.json",  # batch 16, checkpointing, no Liger: 12.83
    "train-throughput-vram-b8-nockpt-1gpu-vram-20261130T071950Z.json",  # batch 8 (rows of 814), no Liger: 46.33
]


@pytest.fixture(scope="module")
def mistral_7b() -> dict:
    """The benchmark's model: MistralConfig's defaults, Mistral-7B's shapes."""
    from transformers import MistralConfig

    return MistralConfig().to_dict()


def measured(point) -> tuple[list[str], float, str]:
    """(overrides, peak GiB, source). Where the benchmark recorded its longest batch's padded length,
    the estimate is for that length (a batch of shorter rows needs less than max_seq_length's)."""
    if isinstance(point, tuple):
        return point
    result = json.loads((RESULTS / point).read_text())
    overrides = list(result["overrides"])
    if m := re.search(r"padded to ([\d,]+) tokens", result.get("longest_batch") or ""):
        overrides.append(f"data.max_seq_length={m[1].replace(',', '')}")
    return overrides, result["peak_allocated_gib"], point


@pytest.mark.parametrize("point", POINTS, ids=lambda p: p if isinstance(p, str) else p[2])
def test_estimate_within_15_percent_of_the_measured_peak(point, mistral_7b):
    overrides, gib, _ = measured(point)
    est = vram.estimate_for(load_config(RECIPE, overrides), mistral_7b)
    error = est.total / GiB / gib - 1
    assert abs(error) <= TOLERANCE, f"estimated {est.total / GiB:.2f} GiB ({est.describe()}), measured {gib}"


def test_the_three_profiles_are_among_the_points():
    seen = {tuple(measured(p)[0]) for p in POINTS}  # the profiles as they are today
    for name in (None, "24gb", "12gb"):
        assert tuple(profile_overrides(name)) in seen, name


def test_a_misfit_names_both_numbers_and_the_profile_that_fits(mistral_7b):
    cfg = load_config(RECIPE)
    est = vram.estimate_for(cfg, mistral_7b)
    free = 24 * GiB
    usable = vram.usable_bytes(free, context_counted=True)
    line = misfit(cfg, mistral_7b, est, free, usable, "RTX 4090")
    assert f"needs about {est.total / GiB:.1f} GiB of GPU memory" in line and "RTX 4090 has 24.0 GiB free" in line
    assert "--profile 24gb would need 22.0 GiB and fits" in line and "\n" not in line
    tiny = misfit(cfg, mistral_7b, est, 4 * GiB, vram.usable_bytes(4 * GiB, True), "small card")
    assert "no measured profile fits either" in tiny


@pytest.fixture
def mistral_folder(tmp_path, mistral_7b) -> Path:
    """A model folder holding only Mistral-7B's config.json: all the estimate reads."""
    (tmp_path / "config.json").write_text(json.dumps(mistral_7b))
    return tmp_path


def test_profile_auto_picks_the_fastest_that_fits(mistral_folder):
    def load(profile):
        return load_config(RECIPE, [*profile_overrides(profile), f"model.name_or_path={mistral_folder}"])

    def card(gib):
        return [Gpu(0, f"{gib} GiB card", gib * GiB, gib * GiB)]

    assert auto_profile(load, card(141))[0] == "24gb"
    name, said = auto_profile(load, card(16))
    assert (
        name == "12gb" and said.startswith("--profile auto: profile 12gb, estimated 8.0 GiB") and "16 GiB card" in said
    )
    with pytest.raises(StageError, match=r"nothing fits 8 GiB card .* estimates: 24gb 22.0, 12gb 8.0, recipe 31.5 GiB"):
        auto_profile(load, card(8))
    assert auto_profile(load, [])[0] is None


def test_invoke_check_with_profile_auto_on_a_cpu_host():
    if vram.visible_gpus():
        pytest.skip("a GPU is visible here")
    proc = subprocess.run(
        [sys.executable, "-m", "invoke", "check", "--profile", "auto", "--runtime", "local"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--profile auto: no NVIDIA GPU is visible (nvidia-smi); no profile applied" in proc.stdout


@pytest.mark.gpu
def test_the_train_stage_check_reads_the_card(mistral_folder):
    """On CUDA: the in-stage check compares with CUDA's own free memory (the whole card's worth of
    batch 4096 cannot fit)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from stages.common.gpu_fit import check_train_fits

    cfg = load_config(RECIPE, [f"model.name_or_path={mistral_folder}"])
    assert check_train_fits(cfg, mistral_folder).total > 30 * GiB
    big = load_config(RECIPE, [f"model.name_or_path={mistral_folder}", "training.batch_size=4096"])
    os.environ.pop(vram.ENV_SKIP, None)
    with pytest.raises(StageError, match=r"the train stage needs about .* GiB free .*--profile"):
        check_train_fits(big, mistral_folder)
