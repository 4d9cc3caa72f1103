"""Weight-only quantized linears (W4A16 / W8A16): the layout a kernel reads, its torch twin, dispatch.

Every checkpoint reader (GPTQ, AWQ, compressed-tensors) returns the neutral `QuantizedWeight`, whose
codes sit in the original column order with a per-column group index (`g_idx`) that act-order makes
non-monotone. A GEMM wants the opposite: the codes of one group contiguous along K, so one (scale,
zero) row serves a whole K-tile. `pack_for_kernel` does that repack once, at load: it sorts the input
columns by group (`perm`), packs the permuted codes along K into int32 words (GPTQ's LSB-first
layout, so a 4-bit word is 8 consecutive inputs of one output column) and keeps scales and float zero
points as [G, N] rows in the activation dtype. One layout therefore serves every format, and the
kernel needs no format-specific branches (AWQ's interleaved nibbles and GPTQ v1's ``zero - 1`` are
the readers' business, already undone in `QuantizedWeight`).

The layer computes ``y = x[..., perm] @ W_p + bias`` where ``W_p[k, n] = (q[k, n] - z[k // gs, n]) ·
s[k // gs, n]`` for the permuted input k; `wna16_linear_reference` is the definition (float32
throughout, one cast at the end) and the Triton kernel (`wna16_triton`) is tested against it.

>>> import torch
>>> from bitsmith.algos.rtn import quantize_rtn
>>> from bitsmith.schemes import QuantScheme
>>> qw = quantize_rtn(torch.randn(64, 128), QuantScheme(bits=4, group_size=32))
>>> packed = pack_for_kernel(qw, torch.float32, "cpu")
>>> tuple(packed.qweight.shape), tuple(packed.scales.shape), packed.perm is None
((16, 64), (4, 64), True)
>>> x = torch.randn(3, 128)
>>> torch.allclose(wna16_linear(x, packed), x @ qw.dequantize().T, atol=1e-4)
True
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from bitsmith.errors import ConfigError, FormatError, UnsupportedError
from bitsmith.kernels import Candidate, Choice, KernelPreference, choose
from bitsmith.quantized import QuantizedWeight

log = logging.getLogger(__name__)

KERNEL_BITS = (4, 8)
"""Code widths the layout holds: both divide 32, so a word never straddles two inputs (GPTQ's 3-bit
layout does, and 2-bit has no runtime demand worth a kernel)."""

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)
"""Activation dtypes the Triton kernel computes in (tensor cores take either)."""

MIN_CAPABILITY = (8, 0)
"""Oldest CUDA compute capability the kernel is built for: bf16 tensor cores arrive with Ampere."""

K_TILE_QUANTUM = 32
"""The kernel's smallest K-tile: every group (and so K) must be a multiple of it, because one K-tile
reads exactly one row of scales and zeros."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PackedLinear:
    """A W4A16/W8A16 linear as the kernel reads it (see the module docstring for the math).

    qweight: int32 [K // (32 // bits), N]: word [r, n] holds permuted inputs r·pf … r·pf + pf - 1 of
             output n, input r·pf + j in bits [j·bits, (j + 1)·bits) (LSB first, unsigned codes).
    scales:  [G, N] in the activation dtype.
    zeros:   [G, N] in the activation dtype: the zero point as a float (integers for every format
             bitsmith reads, exact in fp16 and bf16 up to 256).
    perm:    int64 [K] or None: the kernel reads x[..., perm]; None when the groups are already
             contiguous in the original order (no act-order, or act-order with static groups).
    group_size: inputs per group after the permutation (K for per-channel grids); G = K // group_size.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    perm: torch.Tensor | None
    bits: int
    group_size: int
    bias: torch.Tensor | None
    in_features: int
    out_features: int

    def __post_init__(self) -> None:
        k, n = self.in_features, self.out_features
        if self.bits not in KERNEL_BITS:
            raise UnsupportedError(f"packed linear [{n}, {k}]: bits must be one of {KERNEL_BITS}, got {self.bits}")
        pack = 32 // self.bits
        if self.group_size <= 0 or k % self.group_size:
            raise FormatError(f"packed linear [{n}, {k}]: group_size {self.group_size} does not divide K")
        groups = k // self.group_size
        expected = {
            "qweight": ((k // pack, n), torch.int32),
            "scales": ((groups, n), self.scales.dtype),
            "zeros": ((groups, n), self.scales.dtype),
        }
        for name, (shape, dtype) in expected.items():
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise FormatError(
                    f"packed linear [{n}, {k}]: {name} must be {dtype} {shape}, "
                    f"got {tensor.dtype} {tuple(tensor.shape)}"
                )
        if self.perm is not None and (tuple(self.perm.shape) != (k,) or self.perm.dtype != torch.int64):
            raise FormatError(f"packed linear [{n}, {k}]: perm must be int64 ({k},), got {self.perm.dtype} "
                              f"{tuple(self.perm.shape)}")
        if self.bias is not None and tuple(self.bias.shape) != (n,):
            raise FormatError(f"packed linear [{n}, {k}]: bias must be ({n},), got {tuple(self.bias.shape)}")

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype the scales were stored in (and the kernel expects)."""
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def pack_factor(self) -> int:
        """Codes per int32 word."""
        return 32 // self.bits

    def weight_bytes(self) -> int:
        """Bytes a matmul must read for the weight: packed codes, scales and zeros (the roofline's
        numerator; `perm` and bias are O(K + N) and left out)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [K, N] in PERMUTED input order (what the kernel multiplies x[..., perm] by)."""
        codes = unpack_codes(self.qweight, self.bits).float()
        rows = torch.arange(self.in_features, device=codes.device) // self.group_size
        return (codes - self.zeros.float()[rows]) * self.scales.float()[rows]


def pack_codes(codes_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes [K, N] (K a multiple of 32 // bits) along K into int32 words [K·bits/32, N]."""
    pack = 32 // bits
    k, n = codes_kn.shape
    fields = codes_kn.to(torch.int64).reshape(k // pack, pack, n)
    shifts = (torch.arange(pack, device=codes_kn.device, dtype=torch.int64) * bits).view(1, pack, 1)
    words = (fields << shifts).sum(dim=1)
    # The top field sets bit 31: fold the unsigned 32-bit pattern into int32's range explicitly rather
    # than rely on how a narrowing cast treats out-of-range values.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_codes`: int32 words [K·bits/32, N] to codes [K, N] (int32, unsigned values)."""
    pack = 32 // bits
    shifts = (torch.arange(pack, device=qweight.device, dtype=torch.int32) * bits).view(1, pack, 1)
    fields = (qweight.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(qweight.shape[0] * pack, qweight.shape[1])


def pack_for_kernel(
    qw: QuantizedWeight,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    bias: torch.Tensor | None = None,
) -> PackedLinear:
    """Repack a neutral quantized weight into the kernel layout on `device`, scales in `dtype`.

    Refuses (`UnsupportedError`) bit widths other than 4 and 8, K not a multiple of the packing, and
    groups that do not become contiguous runs of one size once the columns are sorted by group;
    `FormatError` for a g_idx naming a group that has no scale.
    """
    n, k = qw.shape
    bits = qw.scheme.bits
    where = f"quantized weight [{n}, {k}] ({qw.scheme.label})"
    if bits not in KERNEL_BITS:
        raise UnsupportedError(f"{where}: the W{bits}A16 kernel layout holds {KERNEL_BITS}-bit codes only")
    if dtype not in (*ACTIVATION_DTYPES, torch.float32):
        raise ConfigError(f"{where}: scales dtype must be float16, bfloat16 or float32, got {dtype}")
    pack = 32 // bits
    if k % pack:
        raise UnsupportedError(f"{where}: K = {k} is not a multiple of {pack} codes per int32 word")
    groups = int(qw.scales.shape[1])
    if k % groups:
        raise UnsupportedError(f"{where}: {groups} groups cannot split K = {k} into equal groups")
    group_size = k // groups
    g_idx = qw.g_idx.to(device="cpu", dtype=torch.int64)
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise FormatError(f"{where}: g_idx must lie in [0, {groups}), got [{int(g_idx.min())}, {int(g_idx.max())}]")
    counts = torch.bincount(g_idx, minlength=groups)
    if not bool((counts == group_size).all()):
        bad = int(torch.nonzero(counts != group_size)[0, 0])
        raise UnsupportedError(
            f"{where}: group {bad} has {int(counts[bad])} columns, expected {group_size} in every group "
            "(the kernel needs equal groups, contiguous once the columns are sorted by group)"
        )
    monotone = bool((g_idx[1:] >= g_idx[:-1]).all())
    perm = None if monotone else torch.argsort(g_idx, stable=True)
    if qw.codes.numel() and int(qw.codes.max()) > qw.scheme.maxq:
        raise FormatError(f"{where}: codes exceed {qw.scheme.maxq}")
    codes = qw.codes if perm is None else qw.codes[:, perm.to(qw.codes.device)]
    qweight = pack_codes(codes.to(device).T, bits)
    target = torch.device(device)
    return PackedLinear(
        qweight=qweight.contiguous(),
        scales=qw.scales.T.to(device=target, dtype=dtype).contiguous(),
        zeros=qw.zeros.T.to(device=target, dtype=dtype).contiguous(),
        perm=None if perm is None else perm.to(target),
        bits=bits,
        group_size=group_size,
        bias=None if bias is None else bias.to(device=target, dtype=dtype).contiguous(),
        in_features=k,
        out_features=n,
    )


def _check_input(x: torch.Tensor, packed: PackedLinear) -> None:
    if x.shape[-1] != packed.in_features:
        raise ConfigError(
            f"input [..., {x.shape[-1]}] does not match linear [{packed.out_features}, {packed.in_features}]"
        )
    if not x.is_floating_point():
        raise ConfigError(f"input must be floating point, got {x.dtype}")


def wna16_linear_reference(x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
    """The torch twin (any device): dequantize, multiply and add the bias in float32, cast to x.dtype.

    It unpacks `qweight` itself rather than trusting the `QuantizedWeight` it came from, so it also
    checks the packing: equal to ``x @ qw.dequantize().T`` up to the scales' rounding to `packed.dtype`.
    """
    _check_input(x, packed)
    lead = x.shape[:-1]
    xf = x.reshape(-1, packed.in_features).float()
    if packed.perm is not None:
        xf = xf[:, packed.perm.to(xf.device)]
    y = xf @ packed.dequantize().to(xf.device)
    if packed.bias is not None:
        y = y + packed.bias.float().to(xf.device)
    return y.to(x.dtype).reshape(*lead, packed.out_features)


@dataclass(frozen=True, slots=True, kw_only=True)
class WNA16Spec:
    """What an implementation must support: the device, the input and scale dtypes, the grid."""

    device_type: str
    capability: tuple[int, int] | None
    """CUDA compute capability; None off CUDA."""
    x_dtype: torch.dtype
    packed_dtype: torch.dtype
    bits: int
    group_size: int
    in_features: int

    @classmethod
    def of(cls, x: torch.Tensor, packed: PackedLinear) -> WNA16Spec:
        device = x.device
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        return cls(
            device_type=device.type,
            capability=capability,
            x_dtype=x.dtype,
            packed_dtype=packed.dtype,
            bits=packed.bits,
            group_size=packed.group_size,
            in_features=packed.in_features,
        )


def can_implement_triton(spec: WNA16Spec) -> tuple[bool, str]:
    """Whether the Triton kernel can compute `spec`, and if not, why (for the chooser's report)."""
    if spec.device_type != "cuda" or spec.capability is None:
        return False, f"triton: needs a CUDA device, got {spec.device_type}"
    if spec.capability < MIN_CAPABILITY:
        return False, f"triton: needs compute capability >= {MIN_CAPABILITY}, got {spec.capability}"
    if spec.x_dtype not in ACTIVATION_DTYPES:
        return False, f"triton: computes with float16/bfloat16 activations, got {spec.x_dtype}"
    if spec.packed_dtype != spec.x_dtype:
        return False, f"triton: scales are {spec.packed_dtype} but activations {spec.x_dtype} (repack for the dtype)"
    if spec.group_size % K_TILE_QUANTUM:
        return False, f"triton: group size {spec.group_size} is not a multiple of the {K_TILE_QUANTUM}-input K-tile"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton: not installed"
    return True, f"triton: CUDA {spec.x_dtype} W{spec.bits}A16 g{spec.group_size}"


def wna16_linear_triton(x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
    """`wna16_linear_reference` computed by the Triton kernel (arguments checked by the chooser)."""
    from bitsmith.kernels import wna16_triton

    _check_input(x, packed)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, packed.in_features)
    # Gather the input columns once here, not inside the kernel: MxK elements are a rounding error
    # next to the KxN weight at decode sizes, the gathered copy lets every program load contiguous,
    # vectorised x tiles (an in-kernel gather would repeat for each of the N/BLOCK_N column tiles),
    # and the kernel stays one code path with or without act-order.
    if packed.perm is not None:
        x2 = x2.index_select(1, packed.perm)
    y = wna16_triton.matmul(x2.contiguous(), packed)
    return y.reshape(*lead, packed.out_features)


Linear = Callable[[torch.Tensor, PackedLinear], torch.Tensor]


WNA16Choice = Choice[Linear]


def choose_wna16(spec: WNA16Spec, preference: KernelPreference = KernelPreference.AUTO) -> WNA16Choice:
    """The implementation for `spec` under `preference`; `UnsupportedError` if TRITON cannot run."""
    return choose(spec, preference, [Candidate("triton", wna16_linear_triton, can_implement_triton)],
                  wna16_linear_reference, problem=f"W{spec.bits}A16 kernel", log=log, slow_path="W·A16 linear")


def wna16_linear(
    x: torch.Tensor, packed: PackedLinear, preference: KernelPreference = KernelPreference.AUTO
) -> torch.Tensor:
    """``x[..., perm] @ W_p + bias`` in x.dtype: the Triton kernel on CUDA, else the twin."""
    return _cached_choice(WNA16Spec.of(x, packed), preference).run(x, packed)


_cached_choice = cache(choose_wna16)
"""Per-call dispatch at decode speed: a spec's choice never changes within a process."""


__all__ = [
    "PackedLinear",
    "WNA16Choice",
    "WNA16Spec",
    "can_implement_triton",
    "choose_wna16",
    "pack_codes",
    "pack_for_kernel",
    "unpack_codes",
    "wna16_linear",
    "wna16_linear_reference",
    "wna16_linear_triton",
]
