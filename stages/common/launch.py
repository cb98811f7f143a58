"""The train stage on several processes: one per GPU, on one machine or on several (torchrun).

    python -m stages.train --config C --set training.gpus=2                           # 1 node, 2 GPUs
    python -m stages.train --config C --set training.nodes=2 --set training.node_rank=0 \\
        --set training.main_address=10.0.0.1                                            # on node 0
    python -m stages.train --config C --set training.nodes=2 --set training.node_rank=1 \\
        --set training.main_address=10.0.0.1                                            # on node 1
    invoke stage train --nodes 2 --node-rank 1 --main-address 10.0.0.1 --config C      # the same

A stage started as one plain process re-runs itself under torchrun when training.gpus x
training.nodes > 1: `torch.distributed.run` starts training.gpus processes on this machine and
meets the other machines at main_address:main_port (static rendezvous; node 0 hosts the store). A
process that a per-process launcher started (torchrun, accelerate launch: LOCAL_RANK is set) trains
directly. node_rank, main_address and main_port default to what the usual launchers export
(NODE_RANK_ENV, MAIN_ADDRESS_ENV, MAIN_PORT_ENV below: Kubeflow's PyTorchJob, Slurm), so one config
file serves every node. deploy/ has a PyTorchJob and a Slurm script.

Only global rank 0 writes the stage's outputs (adapter, manifest, checkpoints); a resume across nodes
therefore needs runs/ on storage every node sees. docs/multi-gpu.md says when to use which.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from stages.common.errors import StageError

# Where launchers say which node this is and where node 0 listens: kiln's own, torchrun's (a Kubeflow
# PyTorchJob with nprocPerNode), Slurm's, and a PyTorchJob pod's (RANK is the pod's index there).
NODE_RANK_ENV = ("KILN_NODE_RANK", "PET_NODE_RANK", "SLURM_NODEID", "RANK")
MAIN_ADDRESS_ENV = ("KILN_MAIN_ADDRESS", "PET_MASTER_ADDR", "MASTER_ADDR")
MAIN_PORT_ENV = ("KILN_MAIN_PORT", "PET_MASTER_PORT", "MASTER_PORT")
DEFAULT_PORT = 29500
# Where this node is and how it finds the others: not part of what is trained, so not part of the
# checkpoint digest (a Slurm job gets a new main node at every resubmission).
LAUNCH_ONLY_FIELDS = ("node_rank", "main_address", "main_port")


@dataclass(frozen=True)
class Launch:
    nodes: int
    gpus: int  # processes on this node
    node_rank: int
    main_address: str
    main_port: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus

    def torchrun(self, program: list[str], python: str = sys.executable) -> list[str]:
        """The command that starts this node's processes, each running `python *program`
        (["-m", "stages.train", ...] or [script, ...])."""
        cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(self.gpus)]
        if self.nodes == 1:
            cmd += ["--standalone"]  # a free local port: two single-node jobs on one host do not collide
        else:
            cmd += ["--nnodes", str(self.nodes), "--node-rank", str(self.node_rank)]
            cmd += ["--master-addr", self.main_address, "--master-port", str(self.main_port)]
        return [*cmd, *program]


def _from_env(env: Mapping[str, str], keys: tuple[str, ...]) -> str | None:
    return next((env[k] for k in keys if env.get(k)), None)


def plan(training, env: Mapping[str, str] = os.environ) -> Launch:
    """The launch `training` (a TrainingConfig) asks for on this node; StageError when it is incomplete."""
    nodes, gpus = training.nodes, training.gpus
    rank_text = None if training.node_rank is not None else _from_env(env, NODE_RANK_ENV)
    address = training.main_address or _from_env(env, MAIN_ADDRESS_ENV)
    port = training.main_port or int(_from_env(env, MAIN_PORT_ENV) or DEFAULT_PORT)
    if nodes == 1:
        return Launch(1, gpus, 0, address or "127.0.0.1", port)
    if training.node_rank is None and rank_text is None:
        raise StageError(
            f"training.nodes is {nodes} but this node's rank is unknown; set training.node_rank (0..{nodes - 1}) "
            f"or one of {', '.join(NODE_RANK_ENV)}"
        )
    node_rank = training.node_rank if training.node_rank is not None else int(rank_text)
    if not 0 <= node_rank < nodes:
        raise StageError(f"node rank {node_rank} is outside 0..{nodes - 1} (training.nodes is {nodes})")
    if not address:
        raise StageError(
            f"training.nodes is {nodes} but node 0's address is unknown; set training.main_address "
            f"or one of {', '.join(MAIN_ADDRESS_ENV)}"
        )
    return Launch(nodes, gpus, node_rank, address, port)


def inside_launcher(env: Mapping[str, str] = os.environ) -> bool:
    """Whether a per-process launcher (torchrun, accelerate launch) started this process as one rank.
    A PyTorchJob pod has WORLD_SIZE and RANK too, but one per pod, not per GPU: no LOCAL_RANK."""
    return all(k in env for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))


def rank(env: Mapping[str, str] = os.environ) -> int:
    return int(env.get("RANK", "0"))


def local_rank(env: Mapping[str, str] = os.environ) -> int:
    return int(env.get("LOCAL_RANK", "0"))


def is_main(env: Mapping[str, str] = os.environ) -> bool:
    """Global rank 0: the one process that writes the stage's outputs."""
    return rank(env) == 0


def relaunch(launch: Launch, module: str, args: list[str]) -> int:
    """Run this node's share of `python -m module args` under torchrun; non-zero when a rank failed."""
    cmd = launch.torchrun(["-m", module, *args])
    print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=False).returncode
