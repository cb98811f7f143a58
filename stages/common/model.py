"""Where the base model comes from: a local folder or a Hub id, safetensors only.

Pickled weights (``*.bin``, ``*.pt``) are refused without being opened: unpickling runs code.
Remote code runs only when the config opts in, with a warning. A Hub revision can be pinned to
a commit; the commit actually resolved is returned for the manifest.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from stages.common.config import ModelConfig
from stages.common.errors import StageError, console

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HF_ALLOW = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
HF_ALLOW_CODE = ["*.py"]  # a model's own code (auto_map), fetched only when it may run


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    source: str  # "local" or "hub"
    revision: str | None  # resolved commit for hub models


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_weights(path: Path) -> None:
    """A checkpoint folder must hold safetensors weights; pickles are refused, never loaded."""
    if not path.is_dir():
        raise StageError(f"model path {path} does not exist; set model.name_or_path to a checkpoint folder or Hub id")
    if not (path / "config.json").is_file():
        raise StageError(f"{path} has no config.json: not an HF checkpoint; point model.name_or_path at one")
    if not list(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise StageError(
                f"{path} holds only pickled weights ({', '.join(pickles[:3])}), which can run code when loaded; "
                "refusing them. Convert them to safetensors once, in a sandbox you trust"
            )
        raise StageError(f"{path} has no *.safetensors weights; point model.name_or_path at a complete checkpoint")


def resolve(cfg: ModelConfig) -> ResolvedModel:
    if cfg.trust_remote_code:
        console.print("[yellow]warning[/yellow]: model.trust_remote_code is on: code shipped with the model will run")
    local = Path(cfg.name_or_path).expanduser()
    if local.exists() or not HUB_ID.match(cfg.name_or_path):
        check_weights(local)
        return ResolvedModel(local, "local", None)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with transformers
        raise StageError(f"huggingface_hub is missing ({exc}); install the project's requirements") from None
    try:
        token = os.environ.get("HF_TOKEN")  # only ever from the environment at run time
        allow = HF_ALLOW + (HF_ALLOW_CODE if cfg.trust_remote_code else [])
        snap = Path(snapshot_download(cfg.name_or_path, revision=cfg.revision, allow_patterns=allow, token=token))
    except LocalEntryNotFoundError:
        raise StageError(
            f"model {cfg.name_or_path!r} is neither a local folder nor reachable on the Hub (offline?); "
            "download it once and set model.name_or_path to the folder"
        ) from None
    except HfHubHTTPError as exc:
        first = str(exc).splitlines()[0]
        raise StageError(f"Hub refused {cfg.name_or_path!r}: {first}; check HF_TOKEN and model access") from None
    check_weights(snap)
    return ResolvedModel(snap, "hub", snap.name)
