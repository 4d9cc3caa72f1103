"""FP8 W8A8 quality on the demo model, scored on the NVIDIA engine against the unquantized model there.

Quantizes the shipped demo model (ref-llama-4m) with `--method fp8` in this process, in each variant
(per-channel weights with dynamic per-token activations; per-tensor weights with static activation
scales calibrated on the calibration text), writes each as compressed-tensors (`float-quantized`) and as
a ModelOpt checkpoint, and scores every artifact and the unquantized checkpoint on the held-out prose
and code through `bitsmith.nvidia` — on a GPU bf16 activations, cuBLAS FP8 GEMMs; without one the
kernels' torch twins, float32 activations cast to FP8 exactly as on the GPU. Prints perplexity, its
increase over the unquantized model on the same engine, KL and top-1 agreement, with the hardware.

Target (issue): FP8 artifact perplexity within 1% of bf16 on the shared eval sets.

    python bench/fp8_quality.py [--samples 128] [--seq-len 512] [--json PATH] [--work DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bitsmith.demo import CALIB_FILES, DEMO_MODEL, EVAL_FILES
from bitsmith.formats import get_format
from bitsmith.manifest import build_artifact
from bitsmith.nvidia import default_device
from bitsmith.pipeline import quantize_in_process
from bitsmith.recipes import Recipe
from bitsmith.runtimes import Target, evaluate_path
from bitsmith.schemes import Format, FP8Scheme, GPTQOptions, Method
from machine import hardware, run_bench

VARIANTS = {
    "channel, dynamic": FP8Scheme(per_channel=True, static_activations=False),
    "tensor, static": FP8Scheme(per_channel=False, static_activations=True),
}
FORMATS = (Format.COMPRESSED_TENSORS, Format.MODELOPT)


def _scores(path: Path, seq_len: int) -> list[dict[str, Any]]:
    results = evaluate_path(path, list(EVAL_FILES), seq_len=seq_len, reference=DEMO_MODEL, target=Target.NVIDIA)
    return [r.as_dict() for r in results]


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"hardware": hardware(), "device": str(default_device()), "baseline": _scores(
        DEMO_MODEL, args.seq_len), "artifacts": {}}
    for name, scheme in VARIANTS.items():
        recipe = Recipe(method=Method.FP8, fp8=scheme)
        quantized = quantize_in_process(DEMO_MODEL, calib_files=CALIB_FILES, samples=args.samples,
                                        seq_len=args.seq_len, recipe=recipe).quantized
        for fmt in FORMATS:
            path = work / f"{fmt.value}-{scheme.label.replace(' ', '-')}"
            writer = get_format(fmt).write
            build_artifact(path, lambda d, w=writer, q=quantized: w(d, source_model_dir=DEMO_MODEL, quantized=q,
                                                                    options=GPTQOptions()),
                           format=fmt, recipe=recipe.to_dict())
            out["artifacts"][f"{fmt.value} ({name})"] = _scores(path, args.seq_len)
    return out


def report(results: dict[str, Any]) -> None:
    print(f"{results['hardware']}; engine device {results['device']}")
    base = {r["dataset"]: r["ppl"] for r in results["baseline"]}
    print(f"{'model':44} {'dataset':16} {'ppl':>9} {'increase':>9} {'KL':>9} {'top-1':>7}")
    for name, rows in {"unquantized": results["baseline"], **results["artifacts"]}.items():
        for r in rows:
            dataset = Path(r["dataset"]).name
            increase = 100 * (r["ppl"] / base[r["dataset"]] - 1)
            print(f"{name:44} {dataset:16} {r['ppl']:9.4f} {increase:8.3f}% {r.get('kl', 0):9.5f} "
                  f"{r.get('top1', 1):7.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    run_bench(parser, run, report)


if __name__ == "__main__":
    main()
