"""GPTQ solve speed on CUDA: the fast solver (Triton in-block kernel) against the column-by-column oracle.

For Llama-3-8B and Llama-3-70B linear shapes (out x in), w4 g128 asym, with a Hessian accumulated from
heavy-tailed synthetic activations (Student-t, df=3, times log-normal channel scales, plus a shared
rank-64 Student-t component; 262k tokens by default), prints per layer: seconds of the oracle, of the
fast solver, of the fast solver with the torch twin in place of the kernel (8B shapes), of the shared
preparation (factorization) alone, the speed-up, the H-weighted errors tr(dW H dW^T) of oracle, fast
and RTN, the share of codes that differ, the row noise of the error ratio (root-sum-square of the
per-row error differences over the oracle's total: the spread the ratio would have if the rows of
fast and oracle differed by independent, unbiased amounts, as tie flips cascading along a row make
them), and peak GPU memory; then one 70B-shaped block (q/k/v and gate/up solved jointly through
`solve_group`, as the pipeline does), and the widest layer solved in row shards on the same GPU (the
code path of `solve_gptq(devices=...)` for several GPUs) against one solve. Everything runs in one
process on one GPU, so the columns compare like with like.

    python bench/solver.py [--tokens 262144] [--repeats 3] [--oracle-repeats 1] [--block-repeats 2]
                            [--shards 2] [--only 8b|70b] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from bitsmith.algos import solve_gptq, solve_gptq_reference
from bitsmith.algos.gptq import prepare
from bitsmith.kernels import KernelPreference
from bitsmith.pipeline import solve_group
from bitsmith.schemes import GPTQOptions, Method, QuantScheme

SHAPES = {
    "8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
    "70b": [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)],
}
BLOCK_70B = {  # name: (out, in); linears sharing an input are solved as one problem
    "qkv": [(8192, 8192), (1024, 8192), (1024, 8192)],
    "o": [(8192, 8192)],
    "gate_up": [(28672, 8192), (28672, 8192)],
    "down": [(8192, 28672)],
}
SCHEME = QuantScheme(bits=4, group_size=128, sym=False)
OPTIONS = GPTQOptions(act_order=False, static_groups=False)  # the setup docs/benchmarks.md records


def heavy_tailed_hessian(k: int, tokens: int, seed: int, chunk: int = 8192) -> torch.Tensor:
    """2/n·XᵀX over `tokens` rows of Student-t activations with log-normal channel scales (float32).

    Accumulated chunk by chunk with TF32 products (float32 sums): 262k x 28672 activations would be
    30 GB, and the Hessian only has to look like a real one, not be exact. TF32 is switched back
    off before any solve, so the solvers run in true float32.
    """
    gen = torch.Generator(device="cuda").manual_seed(seed)
    channel = torch.exp(torch.randn(k, generator=gen, device="cuda"))
    shared = torch.randn(64, k, generator=gen, device="cuda") * channel  # correlated channels, as in real models
    student = torch.distributions.StudentT(torch.tensor(3.0, device="cuda"))
    h = torch.zeros(k, k, device="cuda")
    torch.manual_seed(seed)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for start in range(0, tokens, chunk):
            rows = min(chunk, tokens - start)
            x = student.sample((rows, k)) * channel + student.sample((rows, 64)) @ shared
            h.addmm_(x.T, x, alpha=2.0 / tokens)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return h


def weights(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(n, k, generator=gen, device="cuda") * 0.02


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, Any]:
    """Median wall seconds of `repeats` synchronized calls after `warmup` calls, and the last result."""
    for _ in range(warmup):
        fn()
    seconds, result = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), result


def layer_row(n: int, k: int, h: torch.Tensor, args: argparse.Namespace, with_twin: bool) -> dict[str, Any]:
    w = weights(n, k, seed=n + k)
    torch.cuda.reset_peak_memory_stats()
    fast_s, fast = timed(lambda: solve_gptq(w, h, SCHEME, OPTIONS), args.repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30
    factor_s, _ = timed(lambda: prepare(w, h, SCHEME, OPTIONS), 1, warmup=0)
    oracle_s, oracle = timed(lambda: solve_gptq_reference(w, h, SCHEME, OPTIONS), args.oracle_repeats, warmup=0)
    twin_s = (
        timed(lambda: solve_gptq(w, h, SCHEME, OPTIONS, kernels=KernelPreference.REFERENCE), 1, warmup=0)[0]
        if with_twin
        else float("nan")
    )
    row = {
        "shape": f"{n}x{k}",
        "oracle_s": oracle_s,
        "fast_s": fast_s,
        "twin_s": twin_s,
        "prepare_s": factor_s,
        "speedup": oracle_s / fast_s,
        "oracle_error": oracle.error,
        "fast_error": fast.error,
        "rtn_error": fast.rtn_error,
        "error_ratio": fast.error / oracle.error,
        "codes_differ": (fast.weight.codes != oracle.weight.codes).float().mean().item(),
        "error_noise": float((fast.row_errors - oracle.row_errors).square().sum().sqrt()) / oracle.error,
        "peak_gib": peak,
    }
    print(
        f"{row['shape']:>12} oracle {oracle_s:7.3f}s  fast {fast_s:7.3f}s  x{row['speedup']:6.1f}  "
        f"twin {twin_s:7.3f}s  prepare {factor_s:6.3f}s  err fast/oracle {row['error_ratio']:.6f} "
        f"(row noise {row['error_noise']:.1e})  "
        f"rtn/oracle {fast.rtn_error / oracle.error:.3f}  codes differ {row['codes_differ']:.2e}  "
        f"peak {peak:5.1f} GiB",
        flush=True,
    )
    return row


def sharded_row(n: int, k: int, h: torch.Tensor, shards: int) -> dict[str, Any]:
    """The layer solved whole and in `shards` row shards on this one GPU: seconds of each and whether
    codes and grids are bit for bit the same (they must be; several GPUs would run the shards at once)."""
    w = weights(n, k, seed=n + k)
    devices = [torch.device("cuda", torch.cuda.current_device())] * shards
    whole_s, whole = timed(lambda: solve_gptq(w, h, SCHEME, OPTIONS), 1)
    sharded_s, sharded = timed(lambda: solve_gptq(w, h, SCHEME, OPTIONS, devices=devices), 1)
    same = all(torch.equal(getattr(sharded.weight, part), getattr(whole.weight, part))
               for part in ("codes", "scales", "zeros"))
    print(f"{n}x{k} in {shards} shards on one GPU: {sharded_s:.3f}s (whole {whole_s:.3f}s), "
          f"codes and grids identical: {same}", flush=True)
    return {"shape": f"{n}x{k}", "shards": shards, "sharded_s": sharded_s, "whole_s": whole_s, "identical": same}


def block_70b(hessians: dict[int, torch.Tensor], repeats: int) -> dict[str, Any]:
    groups = {name: [weights(n, k, seed=i + n) for i, (n, k) in enumerate(shapes)]
              for name, shapes in BLOCK_70B.items()}

    def solve(name: str) -> None:
        ws = groups[name]
        solve_group(ws, hessians[ws[0].shape[1]], method=Method.GPTQ, scheme=SCHEME, options=OPTIONS, label=name)

    def solve_block() -> None:
        for name in groups:
            solve(name)

    torch.cuda.reset_peak_memory_stats()
    seconds, _ = timed(solve_block, repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30
    per_group = {name: timed(lambda name=name: solve(name), 1, warmup=0)[0] for name in groups}
    print(f"70B block (q,k,v,o,gate,up,down): solve {seconds:.3f}s  peak {peak:.1f} GiB  "
          + "  ".join(f"{n} {s:.3f}s" for n, s in per_group.items()), flush=True)
    return {"solve_s": seconds, "peak_gib": peak, "per_group_s": per_group}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=262144)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--oracle-repeats", type=int, default=1)
    parser.add_argument("--block-repeats", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2, help="row shards for the widest layer's check; 0 skips")
    parser.add_argument("--only", choices=sorted(SHAPES), default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    hardware = f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"
    print(f"{hardware}; torch {torch.__version__}; python {platform.python_version()}; "
          f"scheme w{SCHEME.bits} g{SCHEME.group_size} {'sym' if SCHEME.sym else 'asym'}; tokens {args.tokens}")
    hessians: dict[int, torch.Tensor] = {}
    results: dict[str, Any] = {"hardware": hardware, "torch": torch.__version__, "layers": []}
    for model, shapes in SHAPES.items():
        if args.only and model != args.only:
            continue
        for n, k in shapes:
            if k not in hessians:
                t0 = time.perf_counter()
                hessians[k] = heavy_tailed_hessian(k, args.tokens, seed=k)
                torch.cuda.synchronize()
                print(f"Hessian {k}x{k} from {args.tokens} tokens: {time.perf_counter() - t0:.1f}s", flush=True)
            results["layers"].append({"model": model, **layer_row(n, k, hessians[k], args, with_twin=model == "8b")})
    if args.only in (None, "70b"):
        results["block_70b"] = block_70b(hessians, args.block_repeats)
    if args.shards:
        n, k = max((shape for model, shapes in SHAPES.items() if args.only in (None, model) for shape in shapes),
                   key=lambda shape: (shape[1], shape[0]))
        results["sharded"] = sharded_row(n, k, hessians[k], args.shards)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
