"""A quantized linear weight as every algorithm returns it and every format consumes it.

The layout is the neutral one (HF orientation, unpacked integers): formats pack it their own way,
and `dequantize()` is the single definition of what the numbers mean:
``W'[n, k] = scales[n, g_idx[k]] * (codes[n, k] - zeros[n, g_idx[k]])``. Weights on a ggml block grid
(`GGMLWeight`) and on the float8 grid (`FP8Weight`) keep their own exact forms; `Quantized` is any of
the three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.errors import FormatError
from bitsmith.schemes import FP8Scheme, GGMLScheme, QuantScheme


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantizedWeight:
    """Integer codes of one linear, with per-(row, group) scales and zero points.

    codes:  uint8 [N, K], values in [0, 2^bits - 1], in the ORIGINAL column order.
    scales: float32 [N, G].
    zeros:  int32 [N, G], values in [0, 2^bits - 1] (true zeros, not GPTQ v1's zero - 1).
    g_idx:  int32 [K], the group of each input column (not monotone under act-order).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    scheme: QuantScheme

    def __post_init__(self) -> None:
        if self.codes.dim() != 2:
            raise FormatError(f"codes must be 2-D [out, in], got shape {tuple(self.codes.shape)}")
        n, k = self.codes.shape
        groups = self.scales.shape[1] if self.scales.dim() == 2 else -1
        if tuple(self.scales.shape) != (n, groups) or tuple(self.zeros.shape) != (n, groups):
            raise FormatError(
                f"scales {tuple(self.scales.shape)} / zeros {tuple(self.zeros.shape)} "
                f"do not match codes [{n}, {k}]"
            )
        if tuple(self.g_idx.shape) != (k,):
            raise FormatError(f"g_idx has shape {tuple(self.g_idx.shape)}, expected ({k},)")

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.codes.shape
        return int(n), int(k)

    def rows(self, rows: slice) -> QuantizedWeight:
        """The weight of a range of output rows (rows share nothing but the column order)."""
        return QuantizedWeight(codes=self.codes[rows], scales=self.scales[rows], zeros=self.zeros[rows],
                               g_idx=self.g_idx, scheme=self.scheme)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] these codes stand for."""
        idx = self.g_idx.long()
        scales = self.scales.float()[:, idx]
        zeros = self.zeros.float()[:, idx]
        return ((self.codes.float() - zeros) * scales).to(dtype)


@dataclass(frozen=True, slots=True, kw_only=True)
class GGMLWeight:
    """One linear quantized onto a ggml block type: its rows exactly as a GGUF file stores them.

    data: uint8 [N, row_bytes], row n = the blocks of weight row n along the input dimension (HF
    orientation; the GGUF writer applies llama.cpp's q/k row permutation, which moves whole rows).
    `dequantize()` is bitsmith's reference decoder (`bitsmith.algos.kquant`), equal to gguf-py's.
    """

    data: torch.Tensor
    scheme: GGMLScheme
    in_features: int

    def __post_init__(self) -> None:
        row_bytes = self.scheme.type.row_bytes(self.in_features)
        if self.data.dtype != torch.uint8 or self.data.dim() != 2 or self.data.shape[1] != row_bytes:
            raise FormatError(
                f"{self.scheme.type.value} data must be uint8 [rows, {row_bytes}] for {self.in_features} inputs, "
                f"got {self.data.dtype} {tuple(self.data.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.data.shape[0]), self.in_features

    def rows(self, rows: slice) -> GGMLWeight:
        """The weight of a range of output rows (rows are stored independently)."""
        return GGMLWeight(data=self.data[rows], scheme=self.scheme, in_features=self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] these blocks stand for."""
        from bitsmith.algos.kquant import dequantize

        return dequantize(self.data, self.scheme.type, self.in_features).to(dtype)


@dataclass(frozen=True, slots=True, kw_only=True)
class FP8Weight:
    """One linear on the float8 e4m3 grid: ``W'[n, k] = data[n, k] * scale[n]`` (or ``scale[0]``).

    data:        float8_e4m3fn [N, K] (HF orientation).
    scale:       float32 [N] per channel, [1] per tensor.
    input_scale: float32 [1], the calibrated activation scale of static activations; None when
                 activations are scaled per token at run time.
    """

    data: torch.Tensor
    scale: torch.Tensor
    scheme: FP8Scheme
    input_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.data.dtype != torch.float8_e4m3fn or self.data.dim() != 2:
            raise FormatError(
                f"FP8 data must be float8_e4m3fn [out, in], got {self.data.dtype} {tuple(self.data.shape)}"
            )
        scales = self.data.shape[0] if self.scheme.per_channel else 1
        if self.scale.dtype != torch.float32 or tuple(self.scale.shape) != (scales,):
            raise FormatError(f"FP8 scale must be float32 [{scales}] for {tuple(self.data.shape)} "
                              f"({self.scheme.label}), got {self.scale.dtype} {tuple(self.scale.shape)}")
        if self.scheme.static_activations != (self.input_scale is not None):
            raise FormatError(f"{self.scheme.label} takes {'an' if self.scheme.static_activations else 'no'} "
                              "input scale")
        if self.input_scale is not None and (
            self.input_scale.dtype != torch.float32 or tuple(self.input_scale.shape) != (1,)
        ):
            raise FormatError(f"FP8 input_scale must be float32 [1], got {self.input_scale.dtype} "
                              f"{tuple(self.input_scale.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.data.shape
        return int(n), int(k)

    def rows(self, rows: slice) -> FP8Weight:
        """The weight of a range of output rows; a per-tensor scale (and an input scale) is the same number
        for all of them, copied, so no two weights share a tensor (writers refuse aliased tensors)."""
        scale = self.scale[rows] if self.scheme.per_channel else self.scale.clone()
        input_scale = None if self.input_scale is None else self.input_scale.clone()
        return FP8Weight(data=self.data[rows], scale=scale, scheme=self.scheme, input_scale=input_scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] the FP8 values stand for."""
        return (self.data.float() * self.scale.float()[:, None]).to(dtype)


Quantized = QuantizedWeight | GGMLWeight | FP8Weight
"""Any solved linear: what solvers return, the store keeps and formats consume."""
