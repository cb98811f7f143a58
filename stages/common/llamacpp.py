"""The one pinned llama.cpp: converter, gguf-py and binaries from the same source tree.

The source is the llama.cpp tree vendored in the ``llama-cpp-python`` sdist on PyPI, which every
host here can reach (GitHub is not reachable on all of them). The sdist's sha256 is pinned, so
the tree is the same everywhere. It is built once with cmake and cached; the gguf image runs the
same build in its builder stage.

    python -m stages.common.llamacpp build [--prefix DIR]   # fetch, verify, build (cached)
    python -m stages.common.llamacpp info                   # where it is, which commit
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

from stages.common import names
from stages.common.errors import StageError, fail
from stages.common.layout import cache_dir

SDIST_PACKAGE = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# From the sdist's CHANGELOG ("update llama.cpp to ggml-org/llama.cpp@0c1e57098"); the tree has no .git.
COMMIT = "0c1e57098"
TOOLS = (
    "llama-quantize",
    "llama-completion",
    "llama-perplexity",
    "llama-imatrix",
    "llama-bench",
    "llama-tokenize",
    "llama-export-lora",
)
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DBUILD_SHARED_LIBS=ON",
    f"-DLLAMA_BUILD_COMMIT={COMMIT}",
    "-DLLAMA_BUILD_NUMBER=0",
)
STAMP = ".kiln-built"
# One source patch, applied after extraction (str.replace, checked): llama.cpp's logger thread is never
# flushed at exit (common/log.cpp leaks it on purpose, upstream issue 22142), so a tool's last lines
# could be lost; the patch drains the queue at exit on every platform but Windows (the leak's reason).
PATCH_ID = "log-drain-at-exit"
_LOG_ANCHOR = (  # in common_log_main(), where the singleton is made
    "        log = new common_log;\n"
    "        // Set default to auto-detect colors\n"
    "        log->set_colors(tty_can_use_colors());\n"
)
LOG_PATCH = (
    "common/log.cpp",
    _LOG_ANCHOR,
    _LOG_ANCHOR + "#if !defined(_WIN32)\n"
    "        std::atexit([] { log->pause(); });  // kiln: drain the queue at exit\n"
    "#endif\n",
)


def home() -> Path:
    """Install prefix: $KILN_LLAMA_CPP (the gguf image sets it), else the project cache."""
    env = os.environ.get(names.ENV_LLAMA_CPP)
    if env:
        return Path(env)
    cache = cache_dir()
    return cache / "llama.cpp" / SDIST_VERSION


def src_dir(prefix: Path | None = None) -> Path:
    return (prefix or home()) / "src"


def bin_dir(prefix: Path | None = None) -> Path:
    return (prefix or home()) / "build" / "bin"


def _missing_hint() -> str:
    return (
        f"build it with `invoke llama-cpp` (or `python -m stages.common.llamacpp build`), or set {names.ENV_LLAMA_CPP}"
    )


def tool(name: str) -> Path:
    path = bin_dir() / name
    if not path.is_file():
        raise StageError(f"llama.cpp tool {name} not found at {path}; {_missing_hint()}")
    return path


def script(name: str) -> Path:
    """A converter script of the pinned tree, e.g. convert_hf_to_gguf.py."""
    path = src_dir() / name
    if not path.is_file():
        raise StageError(f"llama.cpp script {name} not found at {path}; {_missing_hint()}")
    return path


def info() -> dict[str, str]:
    return {
        "source": f"{SDIST_PACKAGE}=={SDIST_VERSION} (vendor/llama.cpp)",
        "commit": COMMIT,
        "patches": PATCH_ID,
        "home": str(home()),
    }


def tool_env() -> dict[str, str]:
    """Environment for llama.cpp binaries and converters: shared libs found, pinned gguf-py first."""
    env = dict(os.environ)
    lib = str(bin_dir())
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [lib, env.get("LD_LIBRARY_PATH")]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src_dir() / "gguf-py"), env.get("PYTHONPATH")]))
    return env


# What a tool prints as it goes, counted for the progress lines (progress.heartbeat): llama-perplexity
# writes "[1]5.4321,[2]..." as each chunk is scored.
PROGRESS_MARKS: dict[str, tuple[re.Pattern[bytes], str]] = {
    "llama-perplexity": (re.compile(rb"\[(\d+)\]\d"), "chunks scored"),
    "llama-imatrix": (re.compile(rb"\[(\d+)\]\d"), "chunks read"),
}


def run_tool(name: str, args: list[str]) -> str:
    """Run a llama.cpp tool on all cores; its output, or StageError with its last line. Off a
    terminal, a progress line every few seconds says how far it is."""
    from stages.common.progress import heartbeat

    cmd = [str(tool(name)), *args, "-t", str(os.cpu_count() or 1)]
    proc = subprocess.Popen(cmd, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}
    mark, unit = PROGRESS_MARKS.get(name, (None, ""))
    seen = [0]

    def pump(stream, sink: list[bytes]) -> None:
        while data := os.read(stream.fileno(), 65536):
            sink.append(data)
            if mark is not None and (found := mark.findall(data)):
                seen[0] = max(seen[0], *map(int, found))

    readers = [threading.Thread(target=pump, args=(s, chunks[k]), daemon=True)
               for s, k in ((proc.stdout, "out"), (proc.stderr, "err"))]  # fmt: skip
    with heartbeat(name, detail=(lambda: f"{seen[0]} {unit}") if mark else None):
        for t in readers:
            t.start()
        rc = proc.wait()
        for t in readers:
            t.join()
    out, err = (b"".join(chunks[k]).decode(errors="replace") for k in ("out", "err"))
    if rc != 0:
        lines = [ln for ln in (err + out).splitlines() if ln.strip()]
        raise StageError(f"{name} failed (exit {rc}): {lines[-1] if lines else 'no output'}")
    return out + err


def _fetch_sdist(dest: Path) -> Path:
    # --no-binary for this package only: with ":all:" pip would also build the sdist's build
    # backend (scikit-build-core, hatchling, ...) from source just to read its metadata.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", SDIST_PACKAGE]
    cmd += ["-d", str(dest), f"{SDIST_PACKAGE}=={SDIST_VERSION}"]
    # pip prepares the sdist's metadata after saving it; judge by the saved file and its hash.
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise StageError(f"could not download {SDIST_PACKAGE}=={SDIST_VERSION} from PyPI; check pip's network/CA")
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise StageError(f"{found[0].name} has sha256 {digest}, expected {SDIST_SHA256}; refusing to build it")
    return found[0]


def _extract(sdist: Path, dest: Path) -> None:
    top = f"llama_cpp_python-{SDIST_VERSION}/"
    # The "data" filter came in 3.11.4; Debian 12's python3 (3.11.2, the local base image's) lacks it.
    # The sdist's sha256 is verified before this, so the older extract is safe too.
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            for prefix, target in ((top + "vendor/llama.cpp/", ""), (top + "llama_cpp/", "python/llama_cpp/")):
                if member.name.startswith(prefix) and member.name != prefix.rstrip("/"):
                    member.name = target + member.name[len(prefix) :]
                    tar.extract(member, dest, **safe)


def _patch(src: Path) -> None:
    rel, old, new = LOG_PATCH
    path = src / rel
    text = path.read_text()
    if text.count(old) != 1:
        raise StageError(
            f"cannot apply the {PATCH_ID} patch: {rel} changed; update LOG_PATCH in stages/common/llamacpp.py"
        )
    path.write_text(text.replace(old, new))


def _built_id() -> str:
    return f"{SDIST_VERSION} {COMMIT} {PATCH_ID}"


def is_built(prefix: Path | None = None) -> bool:
    """Whether `prefix` (default: home()) holds a build of this version, commit and patch."""
    stamp = (prefix or home()) / STAMP
    return stamp.is_file() and stamp.read_text().strip() == _built_id()


def build(prefix: Path, sdist: Path | None = None, jobs: int | None = None) -> Path:
    """Fetch (or take `sdist`), verify, extract, patch and build into `prefix`; a no-op when already built."""
    if is_built(prefix):
        return prefix
    if shutil.which("cmake") is None:
        raise StageError("cmake not found; install cmake and a C++ compiler (apt-get install cmake g++)")
    prefix.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=prefix) as tmp:
        tmp_path = Path(tmp)
        sdist = sdist or _fetch_sdist(tmp_path)
        shutil.rmtree(prefix / "src", ignore_errors=True)
        _extract(sdist, prefix / "src")
        _patch(prefix / "src")
    jobs = jobs or os.cpu_count() or 2
    build_dir = prefix / "build"
    subprocess.run(["cmake", "-S", str(prefix / "src"), "-B", str(build_dir), *CMAKE_FLAGS], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), f"-j{jobs}", "--target", *TOOLS], check=True)
    (prefix / STAMP).write_text(_built_id() + "\n")
    return prefix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.common.llamacpp", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="fetch, verify and build the pinned llama.cpp (cached)")
    b.add_argument("--prefix", type=Path, default=None, help="install prefix (default: the project cache)")
    b.add_argument("--sdist", type=Path, default=None, help="a local llama-cpp-python sdist instead of PyPI")
    b.add_argument("--jobs", type=int, default=None, help="parallel compile jobs")
    sub.add_parser("info", help="print the pinned version and where it is")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "build":
            print(build(args.prefix or home(), args.sdist, args.jobs))
        else:
            for k, v in info().items():
                print(f"{k}: {v}")
    except StageError as exc:
        fail(str(exc))
    except subprocess.CalledProcessError as exc:
        fail(f"llama.cpp build failed ({' '.join(exc.cmd[:3])} ... exit {exc.returncode}); see the output above")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
