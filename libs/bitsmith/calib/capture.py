"""Run one block with forward hooks on chosen linears and turn their inputs into Hessians.

This is the only place hooks live: algorithms get plain tensors. Samples go through the block in
chunks so activation memory stays bounded whatever the calibration set size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from bitsmith.calib.stats import HessianAccumulator
from bitsmith.errors import ConfigError
from bitsmith.models.base import CheckpointModel

DEFAULT_CHUNK = 16


def chunks(total: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` covering range(total)."""
    if size <= 0:
        raise ConfigError(f"chunk size must be positive, got {size}")
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def forward_block(
    model: CheckpointModel,
    bid: int,
    inputs: torch.Tensor,
    overrides: Mapping[str, torch.Tensor] | None = None,
    *,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Block `bid`'s output for all samples, computed `chunk` samples at a time."""
    return torch.cat([model.block_forward(bid, inputs[part], overrides) for part in chunks(len(inputs), chunk)])


def capture_hessians(
    model: CheckpointModel,
    bid: int,
    inputs: torch.Tensor,
    names: Sequence[str],
    overrides: Mapping[str, torch.Tensor] | None = None,
    *,
    chunk: int = DEFAULT_CHUNK,
) -> dict[str, tuple[torch.Tensor, int]]:
    """Hessian and token count of the input of each linear in `names` while block `bid` runs `inputs`.

    `overrides` (block-local parameter name -> value) lets earlier groups' quantized weights shape the
    activations that later groups see (true-sequential quantization).
    """
    layer = model.block_module(bid)
    accumulators: dict[str, HessianAccumulator] = {}
    handles = []

    def hook_for(acc: HessianAccumulator) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            acc.add(args[0])

        return hook

    try:
        for name in names:
            module = layer.get_submodule(name)
            if not isinstance(module, torch.nn.Linear):
                raise ConfigError(f"{model.full_name(bid, name)} is not a linear layer")
            acc = HessianAccumulator(module.in_features, device=model.device, name=model.full_name(bid, name))
            accumulators[name] = acc
            handles.append(module.register_forward_pre_hook(hook_for(acc)))
        for part in chunks(len(inputs), chunk):
            model.block_forward(bid, inputs[part], overrides)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (acc.hessian(), acc.count) for name, acc in accumulators.items()}
