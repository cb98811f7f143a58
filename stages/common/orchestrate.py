"""What the tasks in tasks.py do behind the menu: load the config, pick the runtime, check, run, report.

    invoke pipeline          # tasks.pipeline -> run_pipeline
    invoke status            # tasks.status   -> status_table

Each function takes the invoke context `c` where it runs commands or reads the `kiln` settings, and
ends a failure with `invoke.Exit` and one line. Only tasks.py imports this module; no stage does, so
no stage's code key covers it.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from invoke import Exit

from stages.common import names, specs

PY = sys.executable
DEFAULT_LAUNCH = {("gpus", 1), ("nodes", 1)}  # left to the config file unless given


def console():
    from rich.console import Console

    return Console(highlight=False)


@contextmanager
def exit_on_error() -> Iterator[None]:
    """A StageError becomes `error: ...` and exit code 2, without a traceback."""
    from stages.common.errors import StageError

    try:
        yield
    except StageError as exc:
        raise Exit(f"error: {exc}", code=2) from None


def load(c, config: str | None, overrides: list[str], profile: str | None = None):
    """The pipeline config: `config` (default kiln.config), the profile's values, then `overrides`."""
    from stages.common.config import load_config
    from stages.common.profiles import profile_overrides

    path = config or c.kiln.config
    with exit_on_error():
        return load_config(path, [*profile_overrides(pick_profile(path, overrides, profile)), *overrides])


def pick_profile(path: str, overrides: list[str], profile: str | None) -> str | None:
    """`profile`, or for `auto` the fastest measured one that fits the visible GPU (said out loud)."""
    from stages.common.config import load_config
    from stages.common.profiles import AUTO, profile_overrides

    if profile != AUTO:
        return profile
    from stages.common.gpu_fit import auto_profile

    picked, said = auto_profile(lambda p: load_config(path, [*profile_overrides(p), *overrides]))
    console().print(said)
    return picked


def run_dir_of(cfg, run_dir: str | None) -> Path:
    return Path(run_dir) if run_dir else Path(names.RUNS_DIR) / cfg.run_name


def check(cfg, run_dir: Path, runtime_name: str, start_at: str | None = None) -> None:
    """Run every up-front check; print each finding on one line; Exit(2) when any is an error."""
    from stages.common.checks import ERROR, OK, run_checks

    findings = run_checks(cfg, run_dir, start_at=start_at, runtime=runtime_name)
    out = console()
    for f in findings:
        if f.level != ERROR:
            out.print(f"{'ok' if f.level == OK else 'note'}: {f.line()}", markup=False, soft_wrap=True)
    errors = [f for f in findings if f.level == ERROR]
    for f in errors:
        print(f"error: {f.line()}", file=sys.stderr)
    if errors:
        raise Exit(f"{len(errors)} problem(s) found before any stage started; fix them and run again", code=2)


def runtime(c, name: str | None, memory=None, cpus=None):
    """The runtime asked for, or docker when an engine answers and local otherwise. memory and cpus: the
    containers' limits, added to kiln.docker.memory and .cpus ('16g' for every stage, 'merge=24g' for one)."""
    from stages.common.containers import parse_limits
    from stages.common.runtime import get_runtime

    register_docker()
    choice = name or c.kiln.runtime
    if choice == "auto":
        docker = docker_runtime_or_none()
        choice = "docker" if docker is not None and docker.available() else "local"
    if choice != "docker" and (memory or cpus):
        raise Exit("error: --memory and --cpus limit containers; they go with --runtime docker", code=2)
    with exit_on_error():
        try:
            options = {}
            if choice == "docker":
                d = c.kiln.docker
                limits = parse_limits([*listed(d.memory), *(memory or [])], [*listed(d.cpus), *(cpus or [])])
                options = {"limits": limits, "gpus": d.gpus}
            rt = get_runtime(choice, **options)
        except ValueError as exc:
            raise Exit(f"error: --runtime: {exc}", code=2) from None
    if not rt.available():
        raise Exit(f"error: the {choice} runtime is not available here ({rt.describe()}); try --runtime local", 2)
    return rt


def listed(value) -> list[str]:
    """An invoke setting given as one value or a list of them."""
    return [] if value is None else [str(value)] if isinstance(value, str | int | float) else [str(v) for v in value]


def register_docker() -> None:
    import stages.common.docker_runtime  # noqa: F401  (registers the "docker" runtime)


def docker_runtime_or_none():
    from stages.common.runtime import Runtime

    cls = Runtime.registry.get("docker")
    return cls() if cls else None


def ensure_llama_cpp(c) -> None:
    from stages.common import llamacpp

    if not llamacpp.is_built():
        c.run(f"{PY} -m stages.common.llamacpp build", echo=True)


# --- pipeline, status, stage -----------------------------------------------------------------------


def run_pipeline(c, cfg, rt, run: Path, force, from_: str | None, adapter: str | None) -> None:
    """Check, then run the build graph on `rt`; print the summary; Exit(1) when a stage failed."""
    from stages.common import pipeline as graph
    from stages.common.errors import StageError

    out = console()
    out.print(f"[bold]run[/bold] {run}  [bold]runtime[/bold] {rt.describe()}")
    check(cfg, run, rt.name, start_at=names.MERGE if adapter else from_)
    try:
        with exit_on_error():
            if adapter:
                if from_ not in (None, names.MERGE):
                    raise StageError("--adapter goes with --from merge (the adapter replaces the train stage)")
                from_ = names.MERGE
                graph.import_adapter(run, Path(adapter))
                out.print(f"= train: adapter imported from {adapter}")
            if rt.name == "local" and any(s.llama_cpp for s in specs.enabled(cfg)):
                ensure_llama_cpp(c)
            results = graph.run_pipeline(cfg, run, rt, force=set(force or []), start_at=from_, announce=out.print)
    except KeyboardInterrupt as exc:  # the docker runtime has removed the stage's container by now
        import signal

        signame = str(exc) if str(exc) in signal.Signals.__members__ else "SIGINT"
        code = 128 + signal.Signals[signame]  # as the shell reports a process killed by it
        raise Exit(f"error: interrupted ({signame}); `invoke pipeline` again goes on from here", code=code) from None
    print_summary(out, graph.summarize(cfg, run, results))
    if any(r.status == "failed" for r in results):
        raise Exit(code=1)


def print_summary(out, summary) -> None:
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


def print_status(c, config, overrides: list[str], run: str | None, runtime_name: str | None, profile) -> None:
    """One row per enabled stage: up to date, stale (and why), missing or failed. A run folder's
    frozen config is the default config."""
    from rich.table import Table

    from stages.common import pipeline as graph

    run_dir = Path(run) if run else None
    if run_dir is not None and (run_dir / names.RUN_CONFIG).is_file() and config is None:
        config = str(run_dir / names.RUN_CONFIG)
    cfg = load(c, config, overrides, profile)
    run_dir = run_dir or Path(names.RUNS_DIR) / cfg.run_name
    rt = runtime(c, runtime_name)
    table = Table(title=f"{run_dir} ({rt.name} runtime)")
    for col in ("stage", "state", "why"):
        table.add_column(col)
    for spec in specs.enabled(cfg):
        st = graph.stage_state(spec, cfg, run_dir, rt)
        table.add_row(st.stage, st.state, st.why)
    console().print(table)


def stage_command(c, stage: str, config: str | None, overrides: list[str], profile, launch: dict) -> str:
    """The `python -m stages.<stage>` command line, with the profile's values and, for train, the
    launch options (gpus, nodes, ...) as --set flags."""
    from stages.common.profiles import profile_overrides

    try:
        stage = specs.spec(stage).name
    except ValueError as exc:
        raise Exit(f"error: {exc}", code=2) from None
    cfg_path = config or c.kiln.config
    with exit_on_error():
        overrides = [*profile_overrides(pick_profile(cfg_path, overrides, profile)), *overrides]
    if stage == names.TRAIN:
        overrides += [f"training.{k}={v}" for k, v in launch.items() if v is not None and (k, v) not in DEFAULT_LAUNCH]
    elif int(launch["gpus"]) > 1 or int(launch["nodes"]) > 1:
        raise Exit(f"error: --gpus/--nodes apply to the train stage only, not {stage}", code=2)
    sets = " ".join(f"--set {s}" for s in overrides)
    return f"{PY} -m stages.{stage} --config {cfg_path} {sets}"


# --- images ----------------------------------------------------------------------------------------


def build_images(c, stage, base, torch_index_url, torch_wheels, ca_bundle, client, compose: bool) -> None:
    """Build `stage`'s image (or all three) with the kiln.docker settings as defaults; print each id."""
    from stages.common import docker_build as b

    cfg = c.kiln.docker
    if torch_wheels:
        b.WHEELS.mkdir(parents=True, exist_ok=True)
        for whl in Path(torch_wheels).glob("*.whl"):
            if not (b.WHEELS / whl.name).exists() or not whl.samefile(b.WHEELS / whl.name):
                shutil.copy2(whl, b.WHEELS / whl.name)
    options = {
        "client": client or cfg.client,
        "base": base or cfg.base,
        "torch_index_url": cfg.torch_index_url if torch_index_url is None else torch_index_url,
        "ca_bundle": Path(ca_bundle or cfg.ca_bundle) if (ca_bundle or cfg.ca_bundle) else None,
    }
    images = [stage] if stage else list(specs.IMAGES)
    with exit_on_error():
        if compose:
            b.compose_build(images, **options)
        for image in images:
            image_id = b.image_meta(b.IMAGES[image])["Id"] if compose else b.build_image(image, **options)
            print(f"{b.IMAGES[image]}: {image_id}")


def write_compose(path: Path, check_only: bool) -> None:
    """Write compose.yaml from containers.py; with `check_only`, Exit(1) when it differs instead."""
    from stages.common.containers import compose_text

    text = compose_text()
    if check_only:
        if not path.is_file() or path.read_text() != text:
            raise Exit(f"error: {path.name} differs from stages/common/containers.py; run `invoke compose`", code=1)
        print(f"{path.name} is up to date")
        return
    path.write_text(text)
    print(f"wrote {path.name}")


# --- lock, CI and release --------------------------------------------------------------------------


def uv() -> list[str]:
    """How to run uv: as a module of this Python, else from PATH."""
    import importlib.util

    if importlib.util.find_spec("uv") is not None:
        return [PY, "-m", "uv"]
    if shutil.which("uv"):
        return ["uv"]
    raise Exit("error: `invoke lock` runs uv, which is not installed; pip install -e '.[dev]' (or pip install uv)", 2)


def lock(c, root: Path, index_url: str, output: str | None) -> None:
    """Re-resolve with uv into a scratch folder, rewrite the constraints file, print what moved."""
    import os
    import shlex
    import tempfile

    from stages.common import lockfile

    env = lockfile.uv_env(dict(os.environ))
    uv_cmd = uv()
    with tempfile.TemporaryDirectory() as work:
        current, pins, request = lockfile.lock(
            root,
            Path(output) if output else root / lockfile.CONSTRAINTS,
            Path(work),
            index_url,
            lambda cmd: c.run(shlex.join(cmd), echo=True, env=env, replace_env=True),
            uv_cmd,
        )
    print(lockfile.summary(output or lockfile.CONSTRAINTS, current, pins, request))


def ci_report(c, run: str | None, out: str) -> None:
    """Collect a run (and, where an engine answers, the image sizes) into `out`; add the summary to
    the workflow page."""
    from stages.common import ci

    run_dir = Path(run) if run else Path(names.RUNS_DIR) / load(c, None, []).run_name
    if not run_dir.is_dir():
        raise Exit(f"error: no run folder {run_dir} (did the pipeline start?)", code=1)
    register_docker()
    docker = docker_runtime_or_none()
    images = None
    if docker is not None and docker.available():
        from stages.common.docker_runtime import image_report

        images = image_report()
    dest = Path(out)
    ci.append_github_file("GITHUB_STEP_SUMMARY", ci.collect_run(run_dir, dest, images))
    print(f"collected {run_dir} into {dest}: {', '.join(sorted(p.name for p in dest.iterdir()))}")


def registry_refs(registry: str) -> dict[str, str]:
    from stages.common import ci
    from stages.common.docker_runtime import IMAGES

    return ci.registry_refs(registry, IMAGES)


def release_notes(c, registry: str, tag: str, repo: str | None, out: str, publish: bool) -> None:
    """Read each image's digest from the registry, write the notes to `out`, and with `publish`
    create the GitHub release."""
    import json
    import os

    from stages.common import ci

    version = tag.removeprefix("v")
    refs = registry_refs(registry)
    digests = {}
    for key, ref in refs.items():
        probe = c.run(
            f"docker buildx imagetools inspect {ref}:{version} --format '{{{{json .Manifest}}}}'", hide=True, warn=True
        )
        if not probe.ok:
            raise Exit(f"error: cannot read {ref}:{version} from the registry: {probe.stderr.strip()}", code=1)
        digests[key] = json.loads(probe.stdout)["digest"]
    commit = os.environ.get("GITHUB_SHA") or c.run("git rev-parse HEAD", hide=True).stdout.strip()
    repo = repo or os.environ.get("GITHUB_REPOSITORY", "OWNER/NAME")
    notes = ci.release_notes(refs, digests, version, commit, repo)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(notes)
    print(notes)
    if publish:
        prerelease = " --prerelease" if "-" in version else ""
        c.run(f"gh release create {tag} --verify-tag --generate-notes --notes-file {out}{prerelease}", echo=True)
