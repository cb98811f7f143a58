"""What benchmarks record about the host, and the memory of a stage measured from outside.

    from host import hardware, ProcessWatch
    with ProcessWatch(match=lambda cmd: "-m stages." in cmd) as watch:   # polls in a thread
        subprocess.run(...)
    watch.peaks  # {"stages.merge": {"rss": bytes, "anon": bytes}, ...}

ProcessWatch reads /proc for every process whose command line matches, and its descendants (the
llama.cpp tools a stage starts), every `interval` seconds, and keeps per stage module the peak
of the tree's summed RSS and RssAnon (memory that no file backs: what a memory limit cannot
reclaim, unlike the page cache of mmapped model files). Containers' processes are in the host's
/proc too, so the same watch serves both runtimes.
"""

from __future__ import annotations

import json
import os
import platform
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

STAGE = re.compile(r"-m (stages\.\w+)")


def stamp(when: datetime | None = None) -> str:
    """The UTC time stamp that results' file names end with."""
    return (when or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def write_result(folder: Path, stem: str, result: dict, when: str | None = None) -> Path:
    """`result` as `folder/<stem>-<stamp>.json`, the form every file in benchmarks/results takes."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{stem}-{when or stamp()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def hardware() -> dict:
    import psutil

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class ProcessWatch:
    """Peak RSS and anonymous RSS of matching process trees, keyed by `-m stages.<name>`."""

    def __init__(self, match: Callable[[str], bool] = lambda cmd: STAGE.search(cmd) is not None, interval=0.25):
        self.match, self.interval = match, interval
        self.peaks: dict[str, dict[str, int]] = {}
        self.loads: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        ticks = 0
        while not self._stop.is_set():
            for proc in psutil.process_iter(["cmdline"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                m = STAGE.search(cmd)
                if not (m and self.match(cmd)):
                    continue
                try:
                    tree = [proc, *proc.children(recursive=True)]
                except psutil.Error:
                    continue
                rss = anon = 0
                for p in tree:
                    st = _status(p.pid)
                    rss += st.get("VmRSS", 0)
                    anon += st.get("RssAnon", 0)
                peak = self.peaks.setdefault(m[1], {"rss": 0, "anon": 0})
                peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)
            ticks += 1
            if ticks % int(10 / self.interval) == 0:
                self.loads.append(os.getloadavg()[0])
            self._stop.wait(self.interval)


def disk_usage(paths: list[Path]) -> int:
    """Bytes allocated on disk under `paths` (files and folders; missing ones count 0)."""
    total = 0
    for root in paths:
        if root.is_file():
            total += root.stat().st_blocks * 512
            continue
        for dirpath, _, files in os.walk(root):
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
                except OSError:
                    pass
    return total


class DiskWatch:
    """The peak of disk_usage(paths), polled every `interval` seconds in a thread."""

    def __init__(self, paths: list[Path], interval: float = 2.0):
        self.paths, self.interval = paths, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DiskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, disk_usage(self.paths))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, disk_usage(self.paths))
            self._stop.wait(self.interval)


def wait_quiet(max_load: float, timeout: float, log=print) -> float:
    """Wait (up to `timeout` s) until the 1-minute load average is under `max_load`; returns it."""
    t0 = time.monotonic()
    while os.getloadavg()[0] > max_load and time.monotonic() - t0 < timeout:
        time.sleep(15)
    load = os.getloadavg()[0]
    log(f"load average {load:.2f} after {time.monotonic() - t0:.0f} s")
    return load
