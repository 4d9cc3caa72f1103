"""`nn.Module`s that run a quantized linear through bitsmith's kernels, for the NVIDIA engine.

Why modules and not a patched `F.linear`: a transformers model calls its linears as modules, so
swapping each quantized `nn.Linear` for one of these runs the whole model on the kernels with no
change to its code. Each holds its weight in the kernel's own layout as buffers (moved with the
model, saved nowhere: the artifact is the source of truth) and dispatches per call through the
kernel's chooser, so the same module runs Triton / cuBLAS FP8 on a GPU and the torch twin on a CPU.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from bitsmith.kernels import KernelPreference
from bitsmith.kernels.fp8 import fp8_linear
from bitsmith.kernels.wna16 import PackedLinear, pack_for_kernel, wna16_linear
from bitsmith.quantized import FP8Weight, QuantizedWeight


class WNA16Linear(torch.nn.Module):
    """An integer-grid linear (4 or 8 bits, any group size, act-order) on the W4A16/W8A16 GEMM.

    The layout is kept whole (`_packed`, checked once) for the per-call path, and its tensors are also
    registered as buffers so `.to()` moves them; `_apply` then rebuilds the layout from the moved ones.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    perm: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, packed: PackedLinear, preference: KernelPreference = KernelPreference.AUTO) -> None:
        super().__init__()
        self.preference = preference
        for name in ("qweight", "scales", "zeros", "perm", "bias"):
            self.register_buffer(name, getattr(packed, name), persistent=False)
        self._packed = packed

    def _apply(self, fn: Any, recurse: bool = True) -> WNA16Linear:
        super()._apply(fn, recurse)
        self._packed = replace(self._packed, qweight=self.qweight, scales=self.scales, zeros=self.zeros,
                               perm=self.perm, bias=self.bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return wna16_linear(x, self._packed, self.preference)

    def extra_repr(self) -> str:
        p = self._packed
        return f"in={p.in_features}, out={p.out_features}, w{p.bits} g{p.group_size}"


class FP8Linear(torch.nn.Module):
    """A float8 linear: FP8 weights times activations cast to FP8 per token (or with a static scale)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, weight: FP8Weight, bias: torch.Tensor | None, dtype: torch.dtype,
                 device: torch.device | str, preference: KernelPreference = KernelPreference.AUTO) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.label, self.preference = weight.scheme.label, preference
        self.register_buffer("weight", weight.data.to(device), persistent=False)
        self.register_buffer("weight_scale", weight.scale.to(device), persistent=False)
        self.register_buffer("input_scale", None if weight.input_scale is None else weight.input_scale.to(device),
                             persistent=False)
        self.register_buffer("bias", None if bias is None else bias.to(device=device, dtype=dtype),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.input_scale, self.bias, self.preference)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.label}"


def kernel_linear(weight: QuantizedWeight | FP8Weight, bias: torch.Tensor | None, *, dtype: torch.dtype,
                  device: torch.device | str, preference: KernelPreference = KernelPreference.AUTO
                  ) -> torch.nn.Module:
    """The module that runs `weight` (with `bias`) on `device`, activations in `dtype`."""
    if isinstance(weight, FP8Weight):
        return FP8Linear(weight, bias, dtype, device, preference)
    return WNA16Linear(pack_for_kernel(weight, dtype, device, bias=bias), preference)
