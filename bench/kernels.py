"""Inference kernels on CUDA: W4A16 g128, W8A16 and FP8 W8A8 linears against bf16 `F.linear` (cuBLAS).

For Llama-3-8B / 70B linear shapes (KxN: 4096x14336, 8192x28672, 4096x4096, 4096x1024, 14336x4096)
and M ∈ {1, 4, 16, 64, 256, 1024, 4096} tokens, prints per (shape, M): microseconds of bf16 cuBLAS
and of each kernel (CUDA events, median of `--iters` calls after warm-up; the first call of a shape
class autotunes and is not timed), the speed-up over bf16, and the achieved weight bandwidth — the
bytes each kernel must read for its weight (packed codes, scales, zeros; bf16's 2 bytes a weight)
over its time — as a share of the device's copy bandwidth, measured here with a large
device-to-device copy. W4A16 is asymmetric g128 (GPTQ/AWQ's common grid), W8A16 symmetric per
channel, FP8 per-channel weights with dynamic per-token activations (`torch._scaled_mm`). Every
kernel is checked against its torch twin on the same random data before it is timed. Everything runs
in one process on one GPU, so the columns compare like with like.

Without CUDA it runs a small CPU correctness pass of the twins and exits 0: the timings need a GPU.

    python bench/kernels.py [--iters 200] [--shapes 4096x14336,...] [--ms 1,16,...] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from bitsmith.algos.rtn import quantize_rtn
from bitsmith.kernels import KernelPreference
from bitsmith.kernels.fp8 import fp8_linear, fp8_linear_reference, quantize_fp8_weight
from bitsmith.kernels.wna16 import PackedLinear, pack_for_kernel, wna16_linear, wna16_linear_reference
from bitsmith.schemes import QuantScheme

SHAPES = [(4096, 14336), (8192, 28672), (4096, 4096), (4096, 1024), (14336, 4096)]  # (K, N)
MS = [1, 4, 16, 64, 256, 1024, 4096]
W4 = QuantScheme(bits=4, group_size=128, sym=False)
W8 = QuantScheme(bits=8, group_size=-1, sym=True)
KERNELS = ("w4a16", "w8a16", "fp8")


ROTATION_BYTES = 256 * 2**20
"""Bytes a kernel reads between two uses of one weight copy: several times any Hopper L2 (50-60 MB)."""


def cuda_us(fn: Callable[[], Any], iters: int, warmup: int = 10) -> float:
    """Median microseconds of `iters` calls, each between its own pair of CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs) * 1e3


def graph_us(fns: list[Callable[[], Any]], iters: int) -> float:
    """Median microseconds per call of `fns` (cycled), captured as one CUDA graph of a whole number of cycles
    and timed over replays: the GPU's time for the calls without Python's launch gaps."""
    calls = len(fns) * max(1, 64 // len(fns))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()  # warm-up off the default stream, as capture requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    return cuda_us(graph.replay, max(5, iters // 10), warmup=2) / calls


def copy_bandwidth(iters: int) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write), the roofline's denominator."""
    src = torch.empty(2**29, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    us = cuda_us(lambda: dst.copy_(src), max(10, iters // 10), warmup=3)
    return 2 * src.numel() * src.element_size() / (us * 1e-6)


def check(name: str, got: torch.Tensor, ref: torch.Tensor, steps: float) -> None:
    """Fail loudly (before any timing) when a kernel leaves its twin by more than `steps` output rounding
    steps at the output's scale."""
    step = torch.finfo(got.dtype).eps * ref.float().abs().max()
    err = (got.float() - ref.float()).abs().max()
    if not bool(err <= steps * step):
        raise SystemExit(f"{name}: max error {float(err):.3e} exceeds {steps} steps of {float(step):.3e}")


class Layer:
    """One linear in every representation the bench times, from one random float weight."""

    def __init__(self, k: int, n: int, seed: int) -> None:
        gen = torch.Generator(device="cuda").manual_seed(seed)
        w = torch.randn(n, k, generator=gen, device="cuda") * 0.02
        self.bf16 = w.to(torch.bfloat16)
        self.w4: PackedLinear = pack_for_kernel(quantize_rtn(w, W4), torch.bfloat16, "cuda")
        self.w8: PackedLinear = pack_for_kernel(quantize_rtn(w, W8), torch.bfloat16, "cuda")
        self.fp8, self.fp8_scale = quantize_fp8_weight(w, per_channel=True)
        self.bytes = {
            "bf16": self.bf16.numel() * 2,
            "w4a16": self.w4.weight_bytes(),
            "w8a16": self.w8.weight_bytes(),
            "fp8": self.fp8.numel() + self.fp8_scale.numel() * 4,
        }
        self.copies = {name: -(-ROTATION_BYTES // size) for name, size in self.bytes.items()}
        self.bf16_copies = [self.bf16.clone() for _ in range(self.copies["bf16"])]
        self.w4_copies = [_clone(self.w4) for _ in range(self.copies["w4a16"])]
        self.w8_copies = [_clone(self.w8) for _ in range(self.copies["w8a16"])]
        self.fp8_copies = [(self.fp8.clone(), self.fp8_scale.clone()) for _ in range(self.copies["fp8"])]

    def runners(self, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
        """One call of each kernel on the original weight (what `verify` checks)."""
        return {name: fns[0] for name, fns in self.rotations(x, [self.bf16], [self.w4], [self.w8],
                                                             [(self.fp8, self.fp8_scale)]).items()}

    def rotating_runners(self, x: torch.Tensor) -> dict[str, list[Callable[[], torch.Tensor]]]:
        """Each kernel's calls over its weight copies, to be cycled so the weight comes from memory."""
        return self.rotations(x, self.bf16_copies, self.w4_copies, self.w8_copies, self.fp8_copies)

    @staticmethod
    def rotations(x: torch.Tensor, bf16: list[torch.Tensor], w4: list[PackedLinear], w8: list[PackedLinear],
                  fp8: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, list[Callable[[], torch.Tensor]]]:
        return {
            "bf16": [partial(F.linear, x, w) for w in bf16],
            "w4a16": [partial(wna16_linear, x, w, KernelPreference.TRITON) for w in w4],
            "w8a16": [partial(wna16_linear, x, w, KernelPreference.TRITON) for w in w8],
            "fp8": [partial(fp8_linear, x, q, scale, preference=KernelPreference.TRITON) for q, scale in fp8],
        }

    def verify(self, x: torch.Tensor) -> None:
        runs = self.runners(x)
        check("w4a16", runs["w4a16"](), wna16_linear_reference(x, self.w4), steps=8)
        check("w8a16", runs["w8a16"](), wna16_linear_reference(x, self.w8), steps=8)
        check("fp8", runs["fp8"](), fp8_linear_reference(x, self.fp8, self.fp8_scale), steps=4)


def _clone(packed: PackedLinear) -> PackedLinear:
    return replace(packed, qweight=packed.qweight.clone(), scales=packed.scales.clone(), zeros=packed.zeros.clone())


def time_calls(fns: list[Callable[[], Any]], iters: int, eager: bool) -> float:
    if eager:
        calls = iter(fns * (iters // len(fns) + 12))
        return cuda_us(lambda: next(calls)(), iters)
    return graph_us(fns, iters)


def bench_shape(k: int, n: int, ms: list[int], iters: int, copy_bps: float, eager: bool) -> list[dict[str, Any]]:
    layer = Layer(k, n, seed=k + n)
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        layer.verify(x)  # also the autotuning call of this shape class, kept out of the timings
        us = {name: time_calls(fns, iters, eager) for name, fns in layer.rotating_runners(x).items()}
        row: dict[str, Any] = {"k": k, "n": n, "m": m, "us": us}
        row["speedup"] = {name: us["bf16"] / us[name] for name in KERNELS}
        row["weight_bw_pct"] = {name: 100 * layer.bytes[name] / (us[name] * 1e-6) / copy_bps for name in us}
        print(f"{k:>6}x{n:<6} M={m:<5} bf16 {us['bf16']:9.1f}us ({row['weight_bw_pct']['bf16']:5.1f}% bw)  "
              + "  ".join(f"{name} {us[name]:9.1f}us x{row['speedup'][name]:5.2f} "
                          f"({row['weight_bw_pct'][name]:5.1f}% bw)" for name in KERNELS), flush=True)
        rows.append(row)
    return rows


def cpu_pass() -> None:
    """The twins on small random data: the bench's correctness half, where no GPU is available."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen) * 0.02
    x = torch.randn(3, 256, generator=gen)
    for scheme in (W4, W8):
        qw = quantize_rtn(w, scheme)
        y = wna16_linear(x, pack_for_kernel(qw, torch.float32, "cpu"))
        torch.testing.assert_close(y, x @ qw.dequantize().T, rtol=1e-5, atol=1e-5)
    q, scale = quantize_fp8_weight(w, per_channel=True)
    y = fp8_linear(x, q, scale)
    torch.testing.assert_close(y, x @ (q.float() * scale[:, None]).T, rtol=0.1, atol=0.05)  # x's own FP8 cast
    print("CPU correctness pass: W4A16, W8A16 and FP8 twins OK; the timings need a CUDA GPU.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--shapes", default=None, help="comma-separated KxN, default the five Llama shapes")
    parser.add_argument("--ms", default=None, help="comma-separated token counts, default 1,4,16,64,256,1024,4096")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--eager", action="store_true", help="time each call from Python, not graph replays")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        cpu_pass()
        sys.exit(0)
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES)
    ms = [int(v) for v in args.ms.split(",")] if args.ms else MS
    props = torch.cuda.get_device_properties(0)
    copy_bps = copy_bandwidth(args.iters)
    hardware = f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"
    print(f"{hardware}; copy bandwidth {copy_bps / 1e12:.2f} TB/s; torch {torch.__version__}; "
          f"python {platform.python_version()}; W4A16 {W4.label}, W8A16 {W8.label}, FP8 channel dynamic; "
          f"activations bf16; weights rotated over {ROTATION_BYTES >> 20} MiB; "
          f"{'eager calls' if args.eager else 'CUDA graph replays'}")
    results: dict[str, Any] = {"hardware": hardware, "torch": torch.__version__, "copy_bytes_per_s": copy_bps,
                               "timing": "eager" if args.eager else "graph", "rows": []}
    for k, n in shapes:
        results["rows"].extend(bench_shape(k, n, ms, args.iters, copy_bps, args.eager))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
