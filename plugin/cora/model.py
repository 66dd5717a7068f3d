"""CoRA's model-level parts. CoRA has no training dynamics of its own (B is frozen or trains as
plain LoRA), so its only controller records where B came from in exported adapters."""
from __future__ import annotations

import json
import os

from safetensors import safe_open

from ..core.controller import Controller

METADATA_KEY = "loraforge_cora"


def basis_metadata(path: str) -> dict:
    """The extraction record of a basis file: rank, options, sources and their config hashes."""
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
    if METADATA_KEY not in meta:
        raise ValueError(f"{path!r} is not a basis file written by `loraforge cora-extract` (no {METADATA_KEY!r} metadata)")
    return json.loads(meta[METADATA_KEY])


class CoRAProvenance(Controller):
    """Writes the CoRA mode and basis of the adapter into `loraforge_export.json` on export."""

    def export_metadata(self) -> dict:
        config = self.driver.config
        return {"cora": {"mode": "FB" if config.freeze_b else "TB", "a_init": config.a_init,
                         "basis_path": None if config.basis_path is None else os.fspath(config.basis_path)}}
