"""What a stage's build key sees of its code and of the files it reads.

- Code: the stage's module and every project module it imports, transitively (import statements
  anywhere in a module, read with ``ast``, so a lazy import inside a function counts), and
  nothing else: a change to the orchestrator or to the Docker code rebuilds no stage that does
  not import it.
- Files outside the run (the base model folder, data files): by content. Each file's sha256 is
  cached in cache/file-hashes.json under its path, size and modification time, so an unchanged
  15 GB checkpoint costs a few stat calls after the first run, while an edited config.json or a
  replaced shard changes the key.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from functools import cache
from pathlib import Path

from stages.common import names
from stages.common.artifacts import sha256_file
from stages.common.layout import cache_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "stages"
HASH_CACHE = "file-hashes.json"


def _module_file(module: str) -> Path | None:
    base = REPO_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Project modules named by import statements in `path` (absolute imports of `stages.*`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            found.add(node.module)
            # `from stages.common import names` imports the module stages.common.names
            found.update(f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}"))
    return found


@cache
def code_files(module: str) -> tuple[Path, ...]:
    """`module`'s file and the files of every project module it imports, transitively, sorted."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        todo.extend(_imports(path) - seen.keys())
    return tuple(sorted(set(seen.values())))


def code_digest(module: str) -> dict[str, str]:
    """sha256 of each file `module` runs, keyed by its path in the repository."""
    return {p.relative_to(REPO_ROOT).as_posix(): sha256_file(p) for p in code_files(module)}


# --- Files outside the run ------------------------------------------------------------------------


class FileHashes:
    """sha256 of files, remembered under (size, mtime_ns, inode) so that unchanged files are not reread."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / HASH_CACHE
        try:
            self.known: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.dirty = False

    def sha256(self, path: Path) -> str:
        st = path.stat()
        # The path as given (relative to the project, as configs write it) and the inode: the same in
        # a stage's container, where the project is mounted elsewhere, as on the host.
        key = str(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = self.known.get(key)
        if hit and hit[:3] == stamp:
            return hit[3]
        digest = sha256_file(path)
        self.known[key] = [*stamp, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{names.TMP_PREFIX}{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(self.known, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache only costs rehashing next time
        self.dirty = False


def fingerprint(paths: list[Path], hashes: FileHashes) -> dict[str, object]:
    """Content of each path: a file's sha256, a folder's files' sha256 (dotfiles and staging
    folders left out), or what it is when it is neither (a Hub id, a missing file)."""
    out: dict[str, object] = {}
    for path in paths:
        if path.is_file():
            out[str(path)] = hashes.sha256(path)
        elif path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            out[str(path)] = {p.relative_to(path).as_posix(): hashes.sha256(p) for p in files}
        else:
            out[str(path)] = "not a local file or folder"
    return out


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
