"""Shipped weights: ``manifest.json`` beside this file lists each network.

Each entry names the weights file (a ``state_dict`` saved with ``torch.save``), its SHA-256, its
parameter count and its model card (a Markdown file: data, steps, time, losses, benchmark).
Weights are only ever loaded with ``torch.load(..., weights_only=True)`` after the hash matches,
so a weights file can never execute code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import DeepMMRegError

WEIGHTS_DIR = Path(__file__).resolve().parent
MANIFEST = WEIGHTS_DIR / "manifest.json"


class WeightsError(DeepMMRegError):
    """A weights file is missing, corrupt or does not match its manifest entry."""


@dataclass
class ModelEntry:
    name: str
    method: str
    file: str
    sha256: str
    parameters: int
    card: str
    description: str = ""
    #: known limits a user must see before relying on the network (shown by ``deepmmreg models`` and
    #: recorded in the results of the methods that use it); "" when its card states no such limit
    status: str = ""

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.file

    @property
    def card_path(self) -> Path:
        return WEIGHTS_DIR / self.card

    def as_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["card_path"] = str(self.card_path)
        return d


def load_manifest(path: Path | None = None) -> list[ModelEntry]:
    path = MANIFEST if path is None else path  # looked up at call time (tests point it elsewhere)
    if not path.exists():
        return []
    with open(path) as f:
        data = json.load(f)
    return [ModelEntry(**entry) for entry in data.get("models", [])]


def model_status(name: str) -> str:
    """The manifest's ``status`` of the shipped network ``name`` ("" when none or not shipped)."""
    return next((e.status for e in load_manifest() if e.name == name), "")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_weights(entry: ModelEntry) -> None:
    if not entry.path.exists():
        raise WeightsError(f"weights of {entry.name} not found at {entry.path}; reinstall the package")
    digest = sha256_of(entry.path)
    if digest != entry.sha256:
        raise WeightsError(f"weights file {entry.path} of {entry.name} is corrupt or was replaced (SHA-256 "
                           f"{digest[:12]}… does not match the manifest's {entry.sha256[:12]}…); reinstall the package")


def load_state_dict(name: str, map_location="cpu") -> dict:
    """The verified ``state_dict`` of the shipped network ``name``."""
    import torch

    entries = {e.name: e for e in load_manifest()}
    if name not in entries:
        raise WeightsError(f"no shipped network named {name!r}; `deepmmreg models` lists them")
    entry = entries[name]
    verify_weights(entry)
    return torch.load(entry.path, map_location=map_location, weights_only=True)
