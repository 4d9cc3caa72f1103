"""W4A16 / W8A16 linears: the kernel layout `pack_for_kernel` builds from every format's neutral
weight, the torch twin that defines the product, the refusals, the chooser, and (where Triton is
installed) the Triton kernel run by Triton's CPU interpreter against the twin."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from bitsmith.algos.rtn import quantize_rtn
from bitsmith.errors import ConfigError, FormatError, UnsupportedError
from bitsmith.kernels import KernelPreference
from bitsmith.kernels.wna16 import (
    PackedLinear,
    WNA16Spec,
    choose_wna16,
    pack_codes,
    pack_for_kernel,
    unpack_codes,
    wna16_linear,
    wna16_linear_reference,
)
from bitsmith.quantized import QuantizedWeight
from bitsmith.schemes import QuantScheme

N, K = 40, 256


def _weight(bits: int, group: int, sym: bool, *, act_order: bool = False, seed: int = 0) -> QuantizedWeight:
    """An RTN-quantized random layer; with `act_order`, its columns shuffled together with g_idx, which
    gives the non-monotone g_idx a GPTQ act-order checkpoint carries (same product, other column order)."""
    gen = torch.Generator().manual_seed(seed)
    qw = quantize_rtn(torch.randn(N, K, generator=gen), QuantScheme(bits=bits, group_size=group, sym=sym))
    if not act_order:
        return qw
    order = torch.randperm(K, generator=gen)
    return QuantizedWeight(codes=qw.codes[:, order], scales=qw.scales, zeros=qw.zeros, g_idx=qw.g_idx[order],
                           scheme=qw.scheme)


GRIDS = [(bits, group, sym) for bits in (4, 8) for group in (32, 64, 128, -1) for sym in (True, False)]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"w{g[0]}-g{g[1]}-{'sym' if g[2] else 'asym'}")
def test_twin_equals_the_neutral_dequantized_product(grid: tuple[int, int, bool]) -> None:
    bits, group, sym = grid
    qw = _weight(bits, group, sym, seed=bits + group)
    packed = pack_for_kernel(qw, torch.float32, "cpu")
    assert packed.perm is None and packed.group_size == (K if group == -1 else group)
    assert tuple(packed.qweight.shape) == (K * bits // 32, N) and packed.qweight.dtype == torch.int32
    assert torch.equal(unpack_codes(packed.qweight, bits), qw.codes.T.int())
    x = torch.randn(5, K)
    torch.testing.assert_close(wna16_linear_reference(x, packed), x @ qw.dequantize().T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,group", [(4, 128), (4, 32), (8, 64)])
def test_act_order_g_idx_becomes_a_permutation_with_contiguous_groups(bits: int, group: int) -> None:
    qw = _weight(bits, group, sym=False, act_order=True, seed=7)
    assert not bool((qw.g_idx[1:] >= qw.g_idx[:-1]).all())
    packed = pack_for_kernel(qw, torch.float32, "cpu")
    assert packed.perm is not None and packed.perm.dtype == torch.int64
    sorted_groups = qw.g_idx.long()[packed.perm]
    assert torch.equal(sorted_groups, torch.arange(K) // group)
    assert torch.equal(unpack_codes(packed.qweight, bits), qw.codes[:, packed.perm].T.int())
    x = torch.randn(2, 3, K)
    torch.testing.assert_close(wna16_linear_reference(x, packed), x @ qw.dequantize().T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scales_and_bias(dtype: torch.dtype) -> None:
    qw = _weight(4, 128, sym=False, act_order=True, seed=3)
    bias = torch.randn(N)
    packed = pack_for_kernel(qw, dtype, "cpu", bias=bias)
    assert packed.scales.dtype == packed.zeros.dtype == packed.bias.dtype == dtype  # type: ignore[union-attr]
    assert torch.equal(packed.zeros.float(), qw.zeros.T.float())  # integer zeros are exact in fp16/bf16
    x = torch.randn(4, K).to(dtype)
    y = wna16_linear(x, packed)
    assert y.dtype == dtype
    expected = x.float() @ qw.dequantize().T + bias.to(dtype).float()
    # Only the scales' rounding to `dtype` and the final cast separate the two.
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=0.15)


def test_packing_is_lsb_first_along_k() -> None:
    codes = torch.arange(8, dtype=torch.uint8).reshape(8, 1)  # inputs 0..7 of one output column
    assert pack_codes(codes, 4).item() == 0x76543210
    top = torch.tensor([[0], [0], [0], [0], [0], [0], [0], [15]], dtype=torch.uint8)
    word = pack_codes(top, 4)
    assert word.dtype == torch.int32 and word.item() == -(2**31) + 7 * 2**28  # 0xF0000000 as int32
    assert torch.equal(unpack_codes(word, 4), top.int())
    assert pack_codes(torch.tensor([[1], [2], [3], [255]], dtype=torch.uint8), 8).item() == 0xFF030201 - 2**32


def test_refuses_what_the_layout_cannot_hold() -> None:
    for bits in (2, 3):
        with pytest.raises(UnsupportedError, match=f"W{bits}A16"):
            pack_for_kernel(_weight(bits, 32, sym=True), torch.float16, "cpu")
    odd_k = quantize_rtn(torch.randn(4, 36), QuantScheme(bits=4, group_size=-1))
    with pytest.raises(UnsupportedError, match=r"K = 36 is not a multiple of 8"):
        pack_for_kernel(odd_k, torch.float16, "cpu")
    qw = _weight(4, 64, sym=False)
    uneven = qw.g_idx.clone()
    uneven[0] = 1  # group 0 gets 63 columns, group 1 gets 65
    bad = QuantizedWeight(codes=qw.codes, scales=qw.scales, zeros=qw.zeros, g_idx=uneven, scheme=qw.scheme)
    with pytest.raises(UnsupportedError, match=r"\[40, 256\].*group 0 has 63 columns, expected 64"):
        pack_for_kernel(bad, torch.float16, "cpu")
    beyond = qw.g_idx.clone()
    beyond[0] = 4
    bad = QuantizedWeight(codes=qw.codes, scales=qw.scales, zeros=qw.zeros, g_idx=beyond, scheme=qw.scheme)
    with pytest.raises(FormatError, match=r"g_idx must lie in \[0, 4\)"):
        pack_for_kernel(bad, torch.float16, "cpu")
    with pytest.raises(ConfigError, match="scales dtype"):
        pack_for_kernel(qw, torch.int8, "cpu")
    packed = pack_for_kernel(qw, torch.float32, "cpu")
    with pytest.raises(ConfigError, match=r"input \[..., 128\] does not match"):
        wna16_linear(torch.randn(2, 128), packed)
    with pytest.raises(FormatError, match="qweight must be"):
        PackedLinear(qweight=packed.qweight[:-1], scales=packed.scales, zeros=packed.zeros, perm=None, bits=4,
                     group_size=64, bias=None, in_features=K, out_features=N)


def test_chooser_says_why_and_honours_preferences() -> None:
    packed = pack_for_kernel(_weight(4, 128, sym=True), torch.float16, "cpu")
    x = torch.randn(1, K).half()
    spec = WNA16Spec.of(x, packed)
    choice = choose_wna16(spec)
    assert (choice.name, choice.reason) == ("reference", "triton: needs a CUDA device, got cpu")
    assert choose_wna16(spec, KernelPreference.REFERENCE).reason == "reference forced by preference"
    with pytest.raises(UnsupportedError, match="needs a CUDA device"):
        choose_wna16(spec, KernelPreference.TRITON)
    from bitsmith.kernels.wna16 import can_implement_triton

    cuda = WNA16Spec(device_type="cuda", capability=(9, 0), x_dtype=torch.bfloat16, packed_dtype=torch.float16,
                     bits=4, group_size=128, in_features=K)
    assert "scales are torch.float16 but activations torch.bfloat16" in can_implement_triton(cuda)[1]
    odd = WNA16Spec(device_type="cuda", capability=(9, 0), x_dtype=torch.float16, packed_dtype=torch.float16,
                    bits=4, group_size=48, in_features=96)
    assert "group size 48" in can_implement_triton(odd)[1]
    old = WNA16Spec(device_type="cuda", capability=(7, 5), x_dtype=torch.float16, packed_dtype=torch.float16,
                    bits=4, group_size=128, in_features=K)
    assert "compute capability" in can_implement_triton(old)[1]


INTERPRETER_CHECK = textwrap.dedent(
    """
    import torch
    from bitsmith.algos.rtn import quantize_rtn
    from bitsmith.kernels import wna16_triton
    from bitsmith.kernels.wna16 import pack_for_kernel, wna16_linear_reference
    from bitsmith.quantized import QuantizedWeight
    from bitsmith.schemes import QuantScheme

    # (bits, group, sym, act_order, dtype, M, config). Triton 3.9's interpreter mis-evaluates tl.dot on
    # bfloat16 (it multiplies the raw bits), so bfloat16 runs the M = 1 multiply-and-sum path only.
    cases = [
        (4, 32, False, False, torch.float16, 1, dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=32, SPLIT=2)),
        (4, 128, False, True, torch.bfloat16, 1, dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=64, SPLIT=3)),
        (4, 64, True, True, torch.float16, 5, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT=3)),
        (8, 128, False, False, torch.float16, 20, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT=0)),
        (8, -1, True, True, torch.float16, 33, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, SPLIT=1)),
        (8, 64, False, False, torch.bfloat16, 1, dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=32, SPLIT=0)),
        (4, 64, False, False, torch.float16, 3, dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=64, SPLIT=2)),
        # Both code widths on every launch shape, bfloat16 at M = 1 (see above), odd M through BLOCK_M = 1.
        (8, 32, True, True, torch.bfloat16, 1, dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=32, SPLIT=4)),
        (4, -1, False, False, torch.float16, 40, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, SPLIT=0)),
    ]
    torch.manual_seed(0)
    for bits, group, sym, act, dtype, m, config in cases:
        n, k = 48, 256
        qw = quantize_rtn(torch.randn(n, k), QuantScheme(bits=bits, group_size=group, sym=sym))
        if act:
            order = torch.randperm(k)
            qw = QuantizedWeight(codes=qw.codes[:, order], scales=qw.scales, zeros=qw.zeros,
                                 g_idx=qw.g_idx[order], scheme=qw.scheme)
        packed = pack_for_kernel(qw, dtype, "cpu", bias=torch.randn(n))
        x = torch.randn(m, k).to(dtype)
        gathered = x if packed.perm is None else x[:, packed.perm]
        y = wna16_triton.matmul(gathered.contiguous(), packed, config=config)
        ref = wna16_linear_reference(x, packed).float()
        # In units of the output's largest rounding step: the kernel rounds the dequantized weight to
        # x's dtype for tl.dot (or sums in another order), the twin rounds only once at the end.
        step = torch.finfo(dtype).eps * ref.abs().max()
        print(float((y.float() - ref).abs().max() / step))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_matches_twin_in_interpreter() -> None:
    """The kernel itself, run by Triton's interpreter on CPU tensors (in a fresh process, because
    TRITON_INTERPRET is read when the kernel is defined)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for ulps in map(float, out.stdout.split()):
        assert ulps <= 2.0
