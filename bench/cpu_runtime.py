"""Tokens/s on CPU: torch fp32 (the unquantized checkpoint) vs ONNX Runtime (MatMulNBits artifact).

Both run in this process, one after the other, on the same machine and thread count, through the same
calling convention (`bitsmith.runtimes.load_model`): prefill = one forward over a `--prompt`-token
window (tokens/s), decode = greedy steps with the KV cache, one token at a time (tokens/s). The ONNX
artifact is written from RTN codes of the demo model (the codes do not change the speed). llama.cpp rows
come with the GGUF issue. Prints the hardware first.

    python bench/cpu_runtime.py [--bits 4] [--group-size 128] [--prompt 512] [--decode 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from machine import hardware


def best_of(repeats: int, fn: Callable[[], int]) -> float:
    """Tokens/s of the fastest of `repeats` runs of `fn` (which returns the tokens it processed)."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        rates.append(tokens / (time.perf_counter() - start))
    return max(rates) if repeats > 1 else statistics.fmean(rates)


def measure(model: Any, prompt: int, decode: int, repeats: int) -> tuple[float, float]:
    import torch

    ids = torch.randint(0, 4096, (1, prompt), generator=torch.Generator().manual_seed(0))

    def prefill() -> int:
        with torch.no_grad():
            model(ids)
        return prompt

    def greedy() -> int:
        with torch.no_grad():
            out = model(ids[:, :16], use_cache=True)
            for _ in range(decode):
                token = out.logits[:, -1:].argmax(-1)
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
        return decode

    prefill()  # warm-up (ORT's first run plans memory; torch's allocates)
    return best_of(repeats, prefill), best_of(repeats, greedy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import onnxruntime
    import torch
    from bitsmith.demo import CALIB_FILES, DEMO_MODEL
    from bitsmith.formats import get_format
    from bitsmith.manifest import build_artifact
    from bitsmith.pipeline import quantize_in_process
    from bitsmith.recipes import Recipe
    from bitsmith.runtimes import load_model
    from bitsmith.schemes import Format, GPTQOptions, Method, QuantScheme

    print(f"hardware: {hardware()}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}")
    scheme = QuantScheme(bits=args.bits, group_size=args.group_size)
    quantized = quantize_in_process(DEMO_MODEL, calib_files=CALIB_FILES, samples=1, seq_len=16,
                                    recipe=Recipe(scheme=scheme, method=Method.RTN)).quantized
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "onnx"
        build_artifact(artifact, lambda d: get_format(Format.ONNX).write(
            d, source_model_dir=DEMO_MODEL, quantized=quantized, options=GPTQOptions()), format=Format.ONNX, recipe={})
        rows = [
            ("torch fp32 (checkpoint)", load_model(DEMO_MODEL)),
            (f"onnxruntime MatMulNBits int{args.bits} g{args.group_size}", load_model(artifact)),
        ]
        print(f"demo model ref-llama-4m; prefill {args.prompt} tokens, decode {args.decode} tokens, best of "
              f"{args.repeats}")
        print(f"{'runtime':<40} {'prefill tok/s':>14} {'decode tok/s':>13}")
        for name, model in rows:
            prefill, decode = measure(model, args.prompt, args.decode, args.repeats)
            print(f"{name:<40} {prefill:>14.0f} {decode:>13.1f}")


if __name__ == "__main__":
    main()
