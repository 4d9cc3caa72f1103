"""Architecture adapters (data) and the block-by-block checkpoint they open.

Each architecture module registers itself on import; importing them here, by name, is the registry.
"""

from __future__ import annotations

from bitsmith.models import llama, qwen2
from bitsmith.models.base import (
    ArchAdapter,
    CheckpointModel,
    build_causal_lm,
    get_adapter,
    load_causal_lm,
    load_checkpoint,
    meta_causal_lm,
    preload,
    read_config,
    supported_architectures,
)

__all__ = [
    "ArchAdapter",
    "CheckpointModel",
    "build_causal_lm",
    "get_adapter",
    "llama",
    "load_causal_lm",
    "load_checkpoint",
    "meta_causal_lm",
    "preload",
    "qwen2",
    "read_config",
    "supported_architectures",
]
