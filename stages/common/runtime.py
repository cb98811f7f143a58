"""Where a stage runs: as a process on this host, or in its own container.

Both runtimes run the same entry point, ``python -m stages.<name> ARGS``, from the repository
root with ``runs/`` and ``cache/`` at the same relative paths, so manifests written by one are
valid for the other. This module imports no ML library: the orchestrator stays fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

from stages.common.artifacts import package_versions
from stages.common.specs import StageSpec


class Runtime:
    """One way of running a stage. Subclasses register themselves by `name`."""

    name: ClassVar[str]
    registry: ClassVar[dict[str, type[Runtime]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Runtime.registry[cls.name] = cls

    def available(self) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def identity(self, spec: StageSpec) -> str:
        """What, besides code and config, decides the stage's output (for cache keys)."""
        raise NotImplementedError

    def command(self, spec: StageSpec, args: list[str]) -> list[str]:
        raise NotImplementedError

    def run_stage(self, spec: StageSpec, args: list[str], log_path: Path) -> int:
        """Run the stage, streaming its output to the console and to `log_path`."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command(spec, args)
        with log_path.open("w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            # Unbuffered: a stage's progress lines reach the console as they are printed, not in blocks.
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            return proc.wait()


class LocalRuntime(Runtime):
    """Each stage is a Python process on this host, in this interpreter's environment."""

    name = "local"

    def available(self) -> bool:
        return True

    def describe(self) -> str:
        return f"local ({sys.executable})"

    def identity(self, spec: StageSpec) -> str:
        return ",".join(f"{k}={v}" for k, v in package_versions().items())

    def command(self, spec: StageSpec, args: list[str]) -> list[str]:
        return [sys.executable, "-m", spec.module, *args]


def get_runtime(name: str, **options) -> Runtime:
    """The runtime registered as `name`, made with `options` (the docker runtime's limits, GPUs)."""
    try:
        cls = Runtime.registry[name]
    except KeyError:
        known = ", ".join(sorted(Runtime.registry))
        raise ValueError(f"unknown runtime {name!r}; expected one of: {known}") from None
    return cls(**options)
