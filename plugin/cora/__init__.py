"""CoRA: LoRA whose B starts from (and in FB mode stays) a common SVD subspace of fine-tuned models.

`CoRAConfig` (config.py), the basis axis (layer.py), the provenance controller (model.py), the basis
extraction (extract.py) and `loraforge cora-extract` (commands.py, cli.py).
"""
from ..registry import register_method
from .config import CoRAConfig
from .extract import CoRAExtractError, extract_basis

__all__ = ["CoRAConfig", "extract_basis", "CoRAExtractError", "METHOD"]

METHOD = register_method(CoRAConfig, title="CoRA", commands=("cora-extract",),
                         example="{basis_path: basis.safetensors, freeze_b: true}")
