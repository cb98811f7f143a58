"""The deployment examples (docs/deploy/): the Kubernetes manifests pass their schemas (check-jsonschema
with the reduced Kubernetes and PyTorchJob schemas vendored in docs/deploy/schemas, offline), the schemas
refuse what the API server or the operator would, and every command in them is a valid stage command
whose launch matches the resources asked for."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.common import launch
from stages.common.cli import stage_parser
from stages.common.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "docs" / "deploy"
SCHEMAS = {
    "train-pytorchjob.yaml": "pytorchjob-kubeflow-v1.json",
    "merge-job.yaml": "job-batch-v1.json",
    "gguf-job.yaml": "job-batch-v1.json",
}
RECIPE = ROOT / "configs" / "mistral-7b-guanaco.yaml"


def worker(manifest: dict) -> dict:
    return manifest["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]


def check(schema: str, manifest: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "check_jsonschema", "--schemafile", str(DEPLOY / "schemas" / schema), str(manifest)]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_manifest_passes_its_schema(name):
    proc = check(SCHEMAS[name], DEPLOY / "kubernetes" / name)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_manifest_is_checked():
    assert sorted(p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")) == sorted(SCHEMAS)


@pytest.mark.parametrize(
    ("name", "edit", "complaint"),
    [
        ("merge-job.yaml", lambda m: m["spec"]["template"]["spec"]["containers"][0].update(volumeMount=[]),
         "'volumeMount' was unexpected"),
        ("merge-job.yaml", lambda m: m["spec"]["template"]["spec"].update(restartPolicy="Always"),
         "'Always' is not one of"),
        ("train-pytorchjob.yaml", lambda m: worker(m)["containers"][0].update(name="trainer"),
         "are valid under the given schema"),  # the operator wires up the container named 'pytorch'
        ("train-pytorchjob.yaml", lambda m: m["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2),
         "2 is greater than the maximum of 1"),
        ("train-pytorchjob.yaml", lambda m: m["spec"].update(pytorchReplicaSpec={}),
         "'pytorchReplicaSpec' was unexpected"),
    ],
)  # fmt: skip
def test_schemas_refuse_broken_manifests(tmp_path, name, edit, complaint):
    manifest = yaml.safe_load((DEPLOY / "kubernetes" / name).read_text())
    edit(manifest)
    broken = tmp_path / name
    broken.write_text(yaml.safe_dump(manifest))
    proc = check(SCHEMAS[name], broken)
    assert proc.returncode != 0 and complaint in proc.stdout, proc.stdout


def stage_args(container: dict) -> list[list[str]]:
    """The `python -m stages.X ARGS` commands a container runs (directly or in its sh -c loop)."""
    words = [*container["command"], *container["args"]]
    if words[:2] == ["sh", "-ec"]:
        script = " ".join(words[2:])
        stages = script.split(" in ", 1)[1].split(";", 1)[0].split()
        template = shlex.split(script.split("do", 1)[1].rsplit(";", 1)[0])
        return [[w.replace("$stage", s) for w in template] for s in stages]
    return [words]


def parse(words: list[str]):
    assert words[:2] == ["python", "-m"] and words[2].startswith("stages."), words
    args = stage_parser(words[2], "").parse_args(words[3:])
    assert str(args.config).startswith("runs/") and str(args.config).endswith("/config.yaml")
    return words[2], load_config(RECIPE, args.overrides)  # the recipe stands in for the run's config


def test_train_job_launch_matches_its_pods():
    job = yaml.safe_load((DEPLOY / "kubernetes" / "train-pytorchjob.yaml").read_text())
    replicas = job["spec"]["pytorchReplicaSpecs"]
    pods = sum(r.get("replicas", 1) for r in replicas.values())
    for index, role in enumerate(("Master", "Worker")):
        (container,) = replicas[role]["template"]["spec"]["containers"]
        (words,) = stage_args(container)
        module, cfg = parse(words)
        assert module == "stages.train"
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        pod_env = {
            "WORLD_SIZE": str(pods),
            "RANK": str(index),
            "MASTER_ADDR": "kiln-train-master-0",
            "MASTER_PORT": "23456",
        }
        plan = launch.plan(cfg.training, env=pod_env)
        assert not launch.inside_launcher(pod_env)  # so the stage starts torchrun itself
        assert (plan.nodes, plan.gpus, plan.node_rank, plan.main_port) == (pods, gpus, index, 23456)


def test_cpu_jobs_run_stage_commands():
    seen = []
    for name in ("merge-job.yaml", "gguf-job.yaml"):
        job = yaml.safe_load((DEPLOY / "kubernetes" / name).read_text())
        for container in job["spec"]["template"]["spec"]["containers"]:
            seen += [parse(words)[0] for words in stage_args(container)]
    assert seen == [
        "stages.merge",
        "stages.convert",
        "stages.quantize",
        "stages.report",
        "stages.smoke",
        "stages.evaluate",
    ]


def test_slurm_script_runs_torchrun_as_the_stage_would():
    script = (DEPLOY / "slurm" / "train.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(DEPLOY / "slurm" / "train.sbatch")]).returncode == 0
    flags = [w for w in launch.Launch(2, 8, 1, "a", 1).torchrun([], python="py") if w.startswith("--")]
    assert all(flag in script for flag in flags), flags
    assert "#SBATCH --ntasks-per-node=1" in script and "-m stages.train" in script
