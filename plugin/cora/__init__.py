"""CoRA: LoRA whose B starts from (and in FB mode stays) a common SVD subspace of fine-tuned models."""
from .config import CoRAConfig
from .extract import CoRAExtractError, extract_basis

__all__ = ["CoRAConfig", "extract_basis", "CoRAExtractError"]
