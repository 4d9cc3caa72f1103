"""runtime_nvidia end to end: decode tokens/s of a W4A16 (and an FP8) artifact against the bf16 model.

Writes a random-weight checkpoint of the chosen shape (`bench/quantize_model.py`'s writer: bf16, a
word-level tokenizer whose words are token ids), quantizes it in this process with RTN (w4 g128 sym,
as a GPTQ v2 checkpoint; and FP8 per channel with dynamic activations, as compressed-tensors: the
solve does not change a kernel's speed, so RTN keeps the bench short), starts `bitsmith serve
runtime_nvidia` as its own process and calls its Generate over gRPC on the checkpoint and on each
artifact, one after another, the same prompt and token count each (after one short warm-up request per
model, which loads it, autotunes its kernels and captures its decode graph). Printed per model: prompt and
decode tokens/s as the service timed them, the decode speed-up over the unquantized model (bf16 on a
GPU, float32 on a CPU), and the service's peak GPU memory after the model's calls (from Evaluate's usage
report on a short file), with the hardware.

Target (issue): the W4A16 artifact decodes at >= 2.5x the bf16 model's tokens/s at batch 1 on an H100.

    python bench/nvidia_runtime.py [--shape 8b|tiny] [--layers N] [--prompt-tokens 128] [--new-tokens 128]
                                   [--json PATH] [--work DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from bitsmith.formats import get_format
from bitsmith.manifest import build_artifact
from bitsmith.pipeline import quantize_in_process
from bitsmith.recipes import Recipe
from bitsmith.schemes import Format, FP8Scheme, GPTQOptions, Method, QuantScheme
from machine import hardware, run_bench
from quantize_model import SHAPES, write_calibration_text, write_checkpoint, write_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def _artifact(model: Path, out: Path, fmt: Format, recipe: Recipe, variant: str | None) -> Path:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quantized = quantize_in_process(model, calib_files=[], samples=0, seq_len=0, recipe=recipe, device=device)
    writer = get_format(fmt).write
    build_artifact(out, lambda d: writer(d, source_model_dir=model, quantized=quantized.quantized,
                                         options=GPTQOptions(), variant=variant), format=fmt, recipe=recipe.to_dict())
    return out


def _serve(work: Path) -> tuple[subprocess.Popen[str], str]:
    log = work / "runtime_nvidia.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "bitsmith_services.cli", "serve", "runtime_nvidia", "--port", "0",
         "--store", str(work / "store")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def _generate(address: str, path: Path, prompt: str, new_tokens: int) -> dict[str, Any]:
    """Prompt and decode tokens/s of the second of two Generate calls on `path`."""
    import grpc
    from bitsmith.v1 import runtime_pb2, runtime_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = runtime_pb2_grpc.RuntimeServiceStub(channel)
        stats = None
        # The first request loads the model, autotunes the kernels and captures the decode graph; the
        # second is timed: what a loaded service's decode costs.
        for tokens in (4, new_tokens):
            for chunk in stub.Generate(runtime_pb2.GenerateRequest(artifact_path=str(path), prompt=prompt,
                                                                   max_new_tokens=tokens), timeout=3600):
                if chunk.HasField("stats"):
                    stats = chunk.stats
    assert stats is not None, "the runtime sent no stats"
    return {"prompt_tokens_per_s": stats.prompt_tokens / stats.prompt_seconds,
            "decode_tokens_per_s": stats.decode_tokens / stats.decode_seconds, "decode_tokens": stats.decode_tokens}


def _usage(address: str, path: Path, sample: Path) -> dict[str, Any]:
    """The service's peak GPU memory so far and its device, from an Evaluate of `path` on a short file (which
    autotunes the kernels for its prompt-sized shapes: minutes on a GPU for a quantized 8B model)."""
    import grpc
    from bitsmith.v1 import runtime_pb2, runtime_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        usage = runtime_pb2_grpc.RuntimeServiceStub(channel).Evaluate(runtime_pb2.EvaluateRequest(
            artifact_path=str(path), data_files=[str(sample)], seq_len=128), timeout=3600).usage
    return {"peak_gpu_bytes": usage.peak_device_bytes, "device": usage.device}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    shape = SHAPES[args.shape]
    model = work / "model"
    write_checkpoint(model, shape, args.layers or shape.layers)
    write_tokenizer(model, shape.vocab)
    sample = work / "sample.txt"
    write_calibration_text(sample, shape.vocab, 300)
    models = {
        "unquantized": model,
        "w4a16 g128 sym (gptq)": _artifact(model, work / "w4", Format.GPTQ, Recipe(
            method=Method.RTN, scheme=QuantScheme(bits=4, group_size=128, sym=True)), "gptq_v2"),
        "fp8 channel dynamic (compressed-tensors)": _artifact(model, work / "fp8", Format.COMPRESSED_TENSORS,
                                                              Recipe(method=Method.FP8, fp8=FP8Scheme()), None),
    }
    prompt = " ".join(f"t{i % shape.vocab}" for i in range(1, args.prompt_tokens + 1))
    results: dict[str, Any] = {"hardware": hardware(), "shape": args.shape, "layers": args.layers or shape.layers,
                               "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "models": {}}
    process, address = _serve(work)
    try:
        for name, path in models.items():
            # Peaks are the process's so far (one model loaded at a time), so the unquantized one goes first.
            results["models"][name] = entry = _generate(address, path, prompt, args.new_tokens)
            # Each model's speed as soon as it is measured, before the memory report's Evaluate: a run
            # stopped later keeps what it measured.
            print(f"{name}: decode {entry['decode_tokens_per_s']:.2f} tok/s, prompt "
                  f"{entry['prompt_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
            entry.update(_usage(address, path, sample))
    finally:
        process.terminate()
        process.wait(timeout=60)
    base = results["models"]["unquantized"]["decode_tokens_per_s"]
    for entry in results["models"].values():
        entry["decode_speedup"] = entry["decode_tokens_per_s"] / base
    return results


def report(results: dict[str, Any]) -> None:
    print(f"{results['hardware']}; {results['shape']}-shaped, {results['layers']} layers; prompt "
          f"{results['prompt_tokens']} tokens, {results['new_tokens']} new tokens, batch 1")
    print(f"{'model':44} {'prompt tok/s':>13} {'decode tok/s':>13} {'vs unq.':>8} {'peak GPU GiB':>13}")
    for name, r in results["models"].items():
        print(f"{name:44} {r['prompt_tokens_per_s']:13.1f} {r['decode_tokens_per_s']:13.2f} "
              f"{r['decode_speedup']:7.2f}x {r['peak_gpu_bytes'] / 2**30:13.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--layers", type=int, help="blocks (default: the shape's)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    run_bench(parser, run, report)


if __name__ == "__main__":
    main()
