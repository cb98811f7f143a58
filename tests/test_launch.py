"""Multi-process and multi-node launch (stages/common/launch.py): the torchrun command each node runs,
where node rank and main address come from, the config checks of the launch fields, and a real
two-node run of the train stage over loopback on the CPU (gloo) that must match one process at the
same global batch."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import as_text, repeat_rows, write_jsonl

from stages.common import launch, names
from stages.common.artifacts import read_manifest
from stages.common.config import validate_config
from stages.common.errors import StageError
from stages.common.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]


def training(**fields):
    tree = {"run_name": "r", "model": {"name_or_path": "m"}, "data": {"train_files": ["d.jsonl"]}, "training": fields}
    return validate_config(tree).training


def test_one_node_is_standalone():
    plan = launch.plan(training(gpus=2), env={})
    assert plan.world_size == 2
    cmd = plan.torchrun(["-m", "stages.train", "--config", "c.yaml"], python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                   "-m", "stages.train", "--config", "c.yaml"]  # fmt: skip


def test_multi_node_static_rendezvous():
    plan = launch.plan(training(nodes=2, gpus=4, node_rank=1, main_address="10.1.2.3", main_port=29511), env={})
    assert (plan.world_size, plan.node_rank) == (8, 1)
    cmd = plan.torchrun(["train.py"], python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--nproc-per-node", "4", "--nnodes", "2", "--node-rank", "1",
                   "--master-addr", "10.1.2.3", "--master-port", "29511", "train.py"]  # fmt: skip


@pytest.mark.parametrize(
    ("env", "rank", "address"),
    [
        ({"KILN_NODE_RANK": "1", "KILN_MAIN_ADDRESS": "head"}, 1, "head"),
        ({"PET_NODE_RANK": "2", "PET_MASTER_ADDR": "job-master-0"}, 2, "job-master-0"),  # Kubeflow PyTorchJob
        ({"SLURM_NODEID": "3", "MASTER_ADDR": "node17"}, 3, "node17"),  # Slurm, MASTER_ADDR set by the script
        ({"WORLD_SIZE": "4", "RANK": "1", "MASTER_ADDR": "job-master-0"}, 1, "job-master-0"),  # PyTorchJob pod
    ],
)
def test_rank_and_address_from_the_launchers_environment(env, rank, address):
    plan = launch.plan(training(nodes=4), env=env)
    assert (plan.node_rank, plan.main_address) == (rank, address)


def test_config_beats_environment():
    plan = launch.plan(training(nodes=2, node_rank=0, main_address="a"), env={"SLURM_NODEID": "1", "MASTER_ADDR": "b"})
    assert (plan.node_rank, plan.main_address) == (0, "a")


def test_incomplete_multi_node_launch_fails_with_the_fix():
    with pytest.raises(StageError, match=r"rank is unknown; set training.node_rank \(0..1\) or one of KILN_NODE_RANK"):
        launch.plan(training(nodes=2, main_address="a"), env={})
    with pytest.raises(StageError, match="node 0's address is unknown; set training.main_address"):
        launch.plan(training(nodes=2, node_rank=1), env={})
    with pytest.raises(StageError, match=r"node rank 5 is outside 0..1"):
        launch.plan(training(nodes=2), env={"SLURM_NODEID": "5", "MASTER_ADDR": "a"})


def test_launch_fields_are_checked():
    with pytest.raises(StageError, match="training.node_rank 2 is not below training.nodes 2"):
        training(nodes=2, node_rank=2)
    with pytest.raises(StageError, match="training.nodes: Input should be greater than 0"):
        training(nodes=0)
    with pytest.raises(StageError, match="fused_lora .* needs quantization.load_in_4bit=true and lora.dropout=0"):
        validate_config(
            {
                "run_name": "r",
                "model": {"name_or_path": "m"},
                "data": {"train_files": ["d"]},
                "training": {"fused_lora": True},
            }
        )  # fmt: skip  (the reference LoRA has dropout 0.1)
    # FSDP over one GPU on each of two nodes is sharding over two GPUs: allowed.
    assert training(fsdp=True, nodes=2, optim="adamw_torch").fsdp


def test_where_a_node_is_does_not_change_the_checkpoint_digest():
    """A resubmitted Slurm job gets a new main node: its checkpoints must still resume."""
    from stages.train import training_digest

    base = {"run_name": "r", "model": {"name_or_path": "m"}, "data": {"train_files": ["d"]}}
    a = validate_config({**base, "training": {"nodes": 2, "node_rank": 0, "main_address": "n1"}})
    b = validate_config({**base, "training": {"nodes": 2, "node_rank": 1, "main_address": "n7", "main_port": 1234}})
    c = validate_config({**base, "training": {"nodes": 4}})
    assert training_digest(a, {}) == training_digest(b, {}) != training_digest(c, {})


def test_port_from_the_launchers_environment():
    assert launch.plan(training(nodes=2, node_rank=0, main_address="a"), env={}).main_port == 29500
    assert (
        launch.plan(training(nodes=2), env={"RANK": "0", "MASTER_ADDR": "m", "MASTER_PORT": "23456"}).main_port == 23456
    )
    assert launch.plan(training(nodes=2, main_port=3000), env={"RANK": "0", "MASTER_ADDR": "m"}).main_port == 3000


def test_inside_launcher():
    assert launch.inside_launcher({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})  # torchrun's child
    assert not launch.inside_launcher({"WORLD_SIZE": "2", "RANK": "1"})  # a PyTorchJob pod: relaunches
    assert not launch.inside_launcher({})
    assert launch.is_main({"RANK": "0"}) and not launch.is_main({"RANK": "1"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_config(tmp_path: Path, model: Path, batch: int) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", as_text(repeat_rows(48, seed=5)))
    cfg = {
        "run_name": "t",
        "model": {"name_or_path": str(model)},
        "data": {"train_files": [str(data)], "format": "text", "max_seq_length": 64, "eval_fraction": 0.0},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {"device": "cpu", "max_steps": 6, "batch_size": batch, "learning_rate": 5e-3,
                     "warmup_ratio": 0.0, "logging_steps": 1, "save_steps": 100, "group_by_length": True},
    }  # fmt: skip
    path = tmp_path / f"c{batch}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.e2e
def test_two_nodes_over_loopback_match_one_process(tmp_path, tiny_mistral):
    """Two one-process "nodes" at batch 4 (torchrun, static rendezvous on 127.0.0.1, gloo) train on the
    rows one process at batch 8 trains on (stages/common/sampler.py): the same loss at every step within
    1e-3 relative (float32 on the CPU; the all-reduce sums in another order). Node 0 alone writes."""
    one = tmp_path / "one"
    cmd = [sys.executable, "-m", "stages.train", "--config", str(stage_config(tmp_path, tiny_mistral, 8))]
    proc = subprocess.run([*cmd, "--run-dir", str(one)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    port, cfg4 = free_port(), stage_config(tmp_path, tiny_mistral, 4)
    nodes = []
    for rank in (0, 1):
        sets = ["training.nodes=2", f"training.node_rank={rank}", "training.main_address=127.0.0.1",
                f"training.main_port={port}"]  # fmt: skip
        node_cmd = [
            sys.executable,
            "-m",
            "stages.train",
            "--config",
            str(cfg4),
            "--run-dir",
            str(tmp_path / f"n{rank}"),
        ]
        node_cmd += [a for s in sets for a in ("--set", s)]
        nodes.append(subprocess.Popen(node_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT))
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outs[0][-3000:] + outs[1][-3000:]
    assert "--nnodes 2 --node-rank 1 --master-addr 127.0.0.1" in outs[1]

    single = read_manifest(one, names.TRAIN)["metrics"]
    multi = read_manifest(tmp_path / "n0", names.TRAIN)["metrics"]
    assert multi["steps"] == single["steps"] == 6
    assert multi["tokens_trained"] == single["tokens_trained"]
    for (_, a), (_, b) in zip(single["loss_curve"], multi["loss_curve"], strict=True):
        assert abs(a - b) / a < 1e-3, (single["loss_curve"], multi["loss_curve"])
    second = RunLayout(tmp_path / "n1", "t")
    assert not second.adapter.exists() and not second.manifest(names.TRAIN).exists()
