"""The build graph: which stages a config runs, their build keys, and what is up to date.

Like make or Bazel, a stage reruns only when its key changes. The key hashes what specs.py
declares the stage depends on: the config sections it reads, the output digests of the stages it
consumes, the content of the files it reads from outside the run, its code (keys.py: its module
and the project modules it imports) and what the runtime runs it with (package versions locally,
the image's dependency layers in Docker). The parts are stored in each manifest, so that `status`
can say why a stage is stale.

Nothing here imports an ML library: deciding that nothing needs doing takes well under a second.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common import keys, names
from stages.common.artifacts import (
    prune_outputs,
    read_manifest,
    stage_output,
    sweep_leftovers,
    verify_manifest,
    write_json_atomic,
)
from stages.common.config import PipelineConfig, dump_config
from stages.common.errors import StageError
from stages.common.layout import RunLayout, manifest_path
from stages.common.runtime import Runtime
from stages.common.specs import Intermediate, StageSpec, enabled

K_KEY = "cache_key"
K_PARTS = "cache_key_parts"


def _section(cfg: PipelineConfig, dotted: str) -> Any:
    node: Any = cfg.model_dump(mode="json")
    for part in dotted.split("."):
        node = node[part]
    return node


def upstream_digest(run_dir: Path, stage: str) -> str | None:
    """What downstream keys see of `stage`: its outputs' hashes, so identical bytes cut the rebuild
    short (as in Bazel). A stage whose outputs live outside the run (prepare) is seen by its key."""
    manifest = read_manifest(run_dir, stage)
    if manifest is None:
        return None
    return keys.digest(manifest.get(names.M_OUTPUTS) or {"key": manifest.get(K_KEY)})


def key_parts(
    spec: StageSpec, cfg: PipelineConfig, run_dir: Path, runtime: Runtime, hashes: keys.FileHashes | None = None
) -> dict[str, str]:
    active = {s.name for s in enabled(cfg)}
    ups = {u: upstream_digest(run_dir, u) for u in spec.upstream if u in active}
    hashes = hashes or keys.FileHashes()
    inputs = keys.fingerprint(spec.inputs(cfg), hashes)
    hashes.save()
    return {
        "config": keys.digest({s: _section(cfg, s) for s in spec.reads}),
        "upstream": keys.digest(ups),
        "inputs": keys.digest(inputs),
        "code": keys.digest(keys.code_digest(spec.module)),
        "runtime": keys.digest(runtime.identity(spec)),
    }


@dataclass
class StageState:
    stage: str
    state: str  # "up to date" | "stale" | "missing" | "failed"
    why: str = ""


def stage_state(spec: StageSpec, cfg: PipelineConfig, run_dir: Path, runtime: Runtime) -> StageState:
    manifest = read_manifest(run_dir, spec.name)
    if manifest is None:
        log = RunLayout(run_dir, cfg.run_name).log(spec.name)
        if log.is_file():
            return StageState(spec.name, "failed", f"no complete output; see {log}")
        return StageState(spec.name, "missing")
    try:
        verify_manifest(run_dir, spec.name, deep=False, allow_pruned=True)
    except StageError as exc:
        return StageState(spec.name, "stale", str(exc))
    parts = key_parts(spec, cfg, run_dir, runtime)
    old = manifest.get(K_PARTS, {})
    changed = [k for k, v in parts.items() if old.get(k) != v]
    if changed:
        return StageState(spec.name, "stale", "changed: " + ", ".join(changed))
    return StageState(spec.name, "up to date")


def freeze_config(cfg: PipelineConfig, run_dir: Path) -> Path:
    """Write the resolved config into the run; stages read this file, whatever the runtime."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunLayout(run_dir, cfg.run_name).config
    tmp = path.with_name(f"{names.TMP_PREFIX}{path.name}")
    dump_config(cfg, tmp)
    if path.is_file() and path.read_text() == tmp.read_text():
        tmp.unlink()
    else:
        tmp.replace(path)
    return path


def record_key(run_dir: Path, stage: str, parts: dict[str, str]) -> None:
    manifest = read_manifest(run_dir, stage)
    path = manifest_path(run_dir, stage)
    if manifest is None:
        raise StageError(f"stage {stage} exited 0 but wrote no manifest at {path}")
    manifest[K_PARTS] = parts
    manifest[K_KEY] = keys.digest(parts)
    write_json_atomic(path, manifest)


ADAPTER_FILES = ("adapter_config.json",)
ADAPTER_WEIGHTS = ("adapter_model.safetensors",)


def import_adapter(run_dir: Path, adapter: Path) -> dict[str, Any]:
    """Take an adapter trained elsewhere as this run's train output (for `--from merge`)."""
    if not adapter.is_dir():
        raise StageError(f"--adapter {adapter} is not a directory; pass the folder holding adapter_config.json")
    missing = [f for f in (*ADAPTER_FILES, *ADAPTER_WEIGHTS) if not (adapter / f).is_file()]
    if missing:
        found = ", ".join(sorted(p.name for p in adapter.iterdir())[:8]) or "nothing"
        raise StageError(
            f"{adapter} is not a PEFT adapter: {', '.join(missing)} missing (found: {found}); "
            "pass the folder written by save_pretrained() of a PeftModel"
        )
    with stage_output(run_dir, names.TRAIN, owned=(names.ADAPTER_DIR,)) as out:
        dest = out.path(names.ADAPTER_DIR)
        shutil.copytree(adapter, dest, dirs_exist_ok=True)
        return out.commit(inputs={"imported_from": str(adapter.resolve())}, metrics={"imported": True})


@dataclass
class StageResult:
    stage: str
    status: str  # "ran" | "up to date" | "failed"
    seconds: float


class _Run:
    """One `invoke pipeline`: runs stages, remakes pruned intermediates a stage needs, and prunes
    intermediates once every stage that reads them has run (specs.Intermediate)."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path, runtime: Runtime, announce: Callable[[str], None]):
        self.cfg, self.run_dir, self.runtime, self.announce = cfg, run_dir, runtime, announce
        self.layout = RunLayout(run_dir, cfg.run_name)
        self.config_path = freeze_config(cfg, run_dir)
        self.active = enabled(cfg)
        self.hashes = keys.FileHashes()
        self.results: list[StageResult] = []

    def execute(self, spec: StageSpec, reason: str) -> bool:
        if not self.remake_inputs(spec):
            return False
        t0 = time.monotonic()
        self.announce(f"▶ {spec.name}: {reason}; running with the {self.runtime.name} runtime")
        parts = key_parts(spec, self.cfg, self.run_dir, self.runtime, self.hashes)
        args = ["--config", self.config_path.as_posix(), "--run-dir", self.run_dir.as_posix()]
        rc = self.runtime.run_stage(spec, args, self.layout.log(spec.name))
        took = time.monotonic() - t0
        if rc != 0:
            self.results.append(StageResult(spec.name, "failed", took))
            self.announce(f"✗ {spec.name} failed (exit {rc}) after {took:.1f} s; log: {self.layout.log(spec.name)}")
            return False
        record_key(self.run_dir, spec.name, parts)
        self.results.append(StageResult(spec.name, "ran", took))
        return True

    def pruned(self, producer: StageSpec, item: Intermediate) -> list[str]:
        manifest = read_manifest(self.run_dir, producer.name) or {}
        return [r for r in manifest.get(names.M_PRUNED, []) if item.files(r, self.cfg, self.layout)]

    def remake_inputs(self, spec: StageSpec) -> bool:
        """Rerun the producer of any pruned intermediate `spec` reads (its outputs come back the same)."""
        for producer in self.active:
            for item in producer.intermediates:
                needed = spec.name in item.consumers and self.pruned(producer, item)
                if needed and not self.execute(producer, f"remaking its {item.name} output for {spec.name}"):
                    return False
        return True

    def prune(self) -> None:
        done = {r.stage for r in self.results if r.status != "failed"}
        for producer in self.active:
            manifest = read_manifest(self.run_dir, producer.name)
            for item in producer.intermediates if manifest else ():
                consumers = [c for c in item.consumers if c in {s.name for s in self.active}]
                if getattr(self.cfg.keep, item.name) or not set(consumers) <= done:
                    continue
                pruned = set(manifest.get(names.M_PRUNED, []))
                rels = [
                    r for r in manifest[names.M_OUTPUTS] if item.files(r, self.cfg, self.layout) and r not in pruned
                ]
                if rels:
                    freed = prune_outputs(self.run_dir, producer.name, rels)
                    self.announce(
                        f"- removed {producer.name}'s {item.name} output ({human_size(freed)}): "
                        f"{', '.join(consumers)} read it; keep.{item.name}=true keeps it"
                    )


def run_pipeline(
    cfg: PipelineConfig,
    run_dir: Path,
    runtime: Runtime,
    *,
    force: set[str] | None = None,
    start_at: str | None = None,
    announce: Callable[[str], None] = print,
) -> list[StageResult]:
    """Run every enabled stage whose key changed; stop at the first failure."""
    run = _Run(cfg, run_dir, runtime, announce)
    for name in sweep_leftovers(run_dir):
        announce(f"removed {name}: the staging folder of a stage that was killed")
    force = force or set()
    stages = run.active
    if start_at:
        order = [s.name for s in stages]
        if start_at not in order:
            raise StageError(f"--from {start_at}: not a stage of this config; expected one of {', '.join(order)}")
        stages = stages[order.index(start_at) :]
    for spec in stages:
        t0 = time.monotonic()
        state = stage_state(spec, cfg, run_dir, runtime)
        forced = spec.name in force or "all" in force
        if state.state == "up to date" and not forced:
            announce(f"= {spec.name}: up to date")
            run.results.append(StageResult(spec.name, "up to date", time.monotonic() - t0))
        elif not run.execute(spec, "forced" if forced else state.state + (f" ({state.why})" if state.why else "")):
            break
        run.prune()
    return run.results


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def summarize(cfg: PipelineConfig, run_dir: Path, results: list[StageResult]) -> dict[str, Any]:
    """Collect every stage's artifacts and metrics into summary.json and summary.md."""
    rows = []
    for res in results:
        manifest = read_manifest(run_dir, res.stage) or {}
        outputs = manifest.get(names.M_OUTPUTS, {})
        rows.append(
            {
                "stage": res.stage,
                "status": res.status,
                "seconds": round(res.seconds, 1),
                "stage_seconds": manifest.get(names.M_DURATION),
                "outputs": {k: v[names.M_SIZE] for k, v in outputs.items()},
                "metrics": manifest.get(names.M_METRICS, {}),
            }
        )
    layout = RunLayout(run_dir, cfg.run_name)
    summary = {"run_name": cfg.run_name, "run_dir": run_dir.as_posix(), "stages": rows}
    from stages.common.monitoring import loss_curve_png  # matplotlib, imported only when summarizing

    if (png := loss_curve_png(layout)) is not None:
        summary["loss_curve"] = layout.rel(png)
    write_json_atomic(layout.summary_json, summary)
    lines = [
        f"# Run `{cfg.run_name}`",
        "",
        "| stage | status | seconds | artifacts | metrics |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        arts = "<br>".join(f"`{k}` ({human_size(v)})" for k, v in r["outputs"].items() if not k.endswith(".json"))
        mets = "<br>".join(f"{k}: {v}" for k, v in flat_metrics(r["metrics"]).items())
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']} | {arts} | {mets} |")
    if layout.report_md.is_file():
        rel = layout.rel(layout.report_md)
        lines += ["", f"GGUF quality report: [{rel}]({rel})"]
    if png is not None:
        lines += ["", f"![train and eval loss against step]({summary['loss_curve']})"]
    layout.summary_md.write_text("\n".join(lines) + "\n")
    return summary


def flat_metrics(metrics: dict[str, Any], limit: int = 6) -> dict[str, Any]:
    """The scalar metrics of a manifest, rounded, for one table cell."""
    flat = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            continue
        flat[k] = round(v, 4) if isinstance(v, float) else v
        if len(flat) == limit:
            break
    return flat
