"""What the calibrator's compute dtype is worth: one 8B-shaped decoder block over a calibration set.

Times, in one process on one GPU, the block forward over `--samples` x `--seq-len` tokens in chunks of
`--chunk` samples, in float32 with TensorFloat-32 (`--matmul-precision high`) and in bfloat16
(`--matmul-precision bfloat16`): with the activations already on the GPU, with host -> GPU -> host copies
in line (as `bitsmith.calib.forward_block` does), and with the copies on side streams; and the Hessian of a
4096- and a 14336-wide input over the same rows, as TF32 float32 products and as bfloat16 products into
float32. Random weights and activations; needs CUDA.

    python bench/calibration_dtype.py [--samples 128] [--seq-len 2048] [--chunk 8]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from machine import hardware


def seconds(fn: Callable[[], None], repeats: int = 2) -> float:
    """Mean seconds of `fn` after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def forwards(dtype: torch.dtype, args: argparse.Namespace) -> dict[str, float]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         num_hidden_layers=1, max_position_embeddings=args.seq_len, attn_implementation="sdpa")
    layer = LlamaDecoderLayer(config, 0).to("cuda", dtype).eval()
    for p in layer.parameters():
        p.data.normal_(0, 0.02)
    n, size = args.samples, args.chunk
    host = torch.randn(n, args.seq_len, 4096, dtype=dtype).pin_memory()
    out = torch.empty_like(host).pin_memory()
    resident = host[:size].cuda()
    cos, sin = LlamaRotaryEmbedding(config).to("cuda")(resident, torch.arange(args.seq_len, device="cuda")[None])
    rotary = (cos.to(dtype), sin.to(dtype))

    def run(x: torch.Tensor) -> torch.Tensor:
        y = layer(x, position_embeddings=rotary)
        return y[0] if isinstance(y, tuple) else y

    def compute() -> None:
        for _ in range(0, n, size):
            run(resident)

    def in_line() -> None:
        for i in range(0, n, size):
            out[i : i + size].copy_(run(host[i : i + size].cuda()))

    copy_in, copy_out = torch.cuda.Stream(), torch.cuda.Stream()

    def overlapped() -> None:
        main = torch.cuda.current_stream()
        with torch.cuda.stream(copy_in):
            ahead = host[:size].to("cuda", non_blocking=True)
        for i in range(0, n, size):
            main.wait_stream(copy_in)
            x = ahead
            x.record_stream(main)
            if i + size < n:
                with torch.cuda.stream(copy_in):
                    ahead = host[i + size : i + 2 * size].to("cuda", non_blocking=True)
            y = run(x)
            copy_out.wait_stream(main)
            with torch.cuda.stream(copy_out):
                out[i : i + size].copy_(y, non_blocking=True)
            y.record_stream(copy_out)
        main.wait_stream(copy_out)

    with torch.no_grad():
        return {"forward, on the GPU": seconds(compute), "forward, copies in line": seconds(in_line),
                "forward, copies overlapped": seconds(overlapped)}


def hessians(args: argparse.Namespace) -> dict[str, float]:
    rows, steps = args.chunk * args.seq_len, args.samples // args.chunk
    result = {}
    for k in (4096, 14336):
        x = torch.randn(rows, k, device="cuda")
        xb = x.bfloat16()
        acc = torch.zeros(k, k, device="cuda")

        def tf32(x: torch.Tensor = x, acc: torch.Tensor = acc) -> None:
            for _ in range(steps):
                acc.addmm_(x.T, x)

        def bf16(xb: torch.Tensor = xb, acc: torch.Tensor = acc) -> None:
            for _ in range(steps):
                acc.add_(torch.mm(xb.T, xb, out_dtype=torch.float32))

        result[f"Hessian K={k}, TF32"] = seconds(tf32, 1)
        result[f"Hessian K={k}, bfloat16 -> float32"] = seconds(bf16, 1)
        del x, xb, acc, tf32, bf16
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    print(hardware(), flush=True)
    torch.set_float32_matmul_precision("high")
    for dtype in (torch.float32, torch.bfloat16):
        for what, s in forwards(dtype, args).items():
            print(f"{str(dtype).removeprefix('torch.'):9} {what:28} {s:.3f} s", flush=True)
        torch.cuda.empty_cache()
    for what, s in hessians(args).items():
        print(f"{what:36} {s:.3f} s", flush=True)


if __name__ == "__main__":
    main()
