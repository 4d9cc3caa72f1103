"""Does a real consumer (GPTQModel, CPU) load what `write_gptq` writes, and compute the same model?

Not a pytest module (gptqmodel needs a newer torch than the project pins): run it in its own venv
through `run_gptqmodel.sh`. For each case it quantizes every decoder linear of the demo model with
RTN, writes a GPTQ artifact with our writer (staged, with manifest), then compares on the same
eval-text windows:

  ours    — `read_gptq(dir).dense_state_dict()` loaded into a float32 LlamaForCausalLM
  theirs  — `GPTQModel.load(dir, device="cpu")` (its own unpacking and kernels)

and prints max |logit difference|, top-1 agreement and both perplexities. Exit status 1 if any case
fails to load or top-1 agreement is below --min-top1. A case that GPTQModel refuses by design is
reported as such (`expect_refusal`), and counts as a failure if it loads after all.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from bitsmith.algos.rtn import quantize_rtn
from bitsmith.demo import DEMO_MODEL, EVAL_FILES
from bitsmith.formats.gptq import GPTQCheckpoint, read_gptq, write_gptq
from bitsmith.formats.safetensors_io import load_tensors, scan_checkpoint
from bitsmith.manifest import build_artifact, verify_manifest
from bitsmith.quantized import QuantizedWeight
from bitsmith.schemes import Format, GPTQOptions, QuantScheme


@dataclass(frozen=True)
class Case:
    label: str
    scheme: QuantScheme
    checkpoint_format: str
    act_order: bool = False
    expect_refusal: str = ""
    """Substring of the error GPTQModel raises on purpose for this case ("" = must load)."""


CASES = (
    Case("4bit-sym-g128-v1", QuantScheme(bits=4, group_size=128, sym=True), "gptq"),
    Case("4bit-asym-g128-v2", QuantScheme(bits=4, group_size=128, sym=False), "gptq_v2"),
    Case("4bit-sym-g64-actorder-v1", QuantScheme(bits=4, group_size=64, sym=True), "gptq", act_order=True),
    Case("3bit-asym-g128-v2", QuantScheme(bits=3, group_size=128, sym=False), "gptq_v2"),
    Case("2bit-asym-g32-v2", QuantScheme(bits=2, group_size=32, sym=False), "gptq_v2"),
    Case("8bit-sym-perchannel-v1", QuantScheme(bits=8, group_size=-1, sym=True), "gptq"),
    Case(
        "4bit-asym-g128-v1",
        QuantScheme(bits=4, group_size=128, sym=False, min_zero=1),
        "gptq",
        expect_refusal="only supported if produced by gptqmodel",
    ),
)


def rtn_act_order(weight: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """RTN in a permuted column order, stored GPTQ act-order style (original order + permuted g_idx).

    The permutation (columns by descending norm) stands in for GPTQ's diag(H) order: what matters to
    the format is that g_idx is not monotone and codes stay in the original column order.
    """
    perm = torch.argsort(weight.float().norm(dim=0), descending=True)
    inv = torch.argsort(perm)
    qw = quantize_rtn(weight[:, perm], scheme)
    return QuantizedWeight(
        codes=qw.codes[:, inv].contiguous(),
        scales=qw.scales,
        zeros=qw.zeros,
        g_idx=qw.g_idx[inv].contiguous(),
        scheme=scheme,
    )


def quantize_demo(case: Case) -> dict[str, QuantizedWeight]:
    infos = scan_checkpoint(DEMO_MODEL)
    names = sorted(
        n.removesuffix(".weight")
        for n in infos
        if n.startswith("model.layers.") and n.endswith("_proj.weight")
    )
    weights = load_tensors(infos[f"{n}.weight"] for n in names)
    quantize = rtn_act_order if case.act_order else quantize_rtn
    return {n: quantize(weights[f"{n}.weight"].float(), case.scheme) for n in names}


def eval_windows(tokens: int, window: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    ids: list[int] = []
    for path in EVAL_FILES:
        ids += tok(path.read_text(encoding="utf-8")[: tokens * 8]).input_ids[: tokens // len(EVAL_FILES)]
    usable = len(ids) // window * window
    return torch.tensor(ids[:usable]).reshape(-1, window)


def our_logits(artifact: Path, batch: torch.Tensor) -> torch.Tensor:
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = read_gptq(artifact)
    fields = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    config = AutoConfig.for_model(**fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(ckpt.dense_state_dict(torch.float32), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"dense state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    with torch.no_grad():
        return model(batch).logits.float()


KERNELS = (("GPTQ_TORCH", "float16"), ("AUTO", "bfloat16"), ("GPTQ_TORCH_FUSED", "float16"))
"""(backend, dtype) pairs GPTQModel runs on CPU. GPTQ_TORCH is its reference unpack+dequant kernel and
gates the check; the others are reported (AUTO is what a user gets by default)."""


REFERENCE_BACKEND = KERNELS[0][0]


def load_gptqmodel(artifact: Path, backend: str, dtype: str) -> torch.nn.Module:
    from gptqmodel import BACKEND, GPTQModel

    loaded = GPTQModel.load(
        str(artifact), device="cpu", dtype=getattr(torch, dtype), backend=BACKEND[backend]
    )
    return loaded.model


def weight_mismatches(model: torch.nn.Module, ckpt: GPTQCheckpoint) -> tuple[int, int, float]:
    """(layers compared, layers not bit-identical, worst |diff|) of GPTQModel's own unpack + dequant
    (`dequantize_weight`, float16) against our reader's `dequantize(float16)`.

    fp16 scale x small-integer products are exact in float32, so both sides round once: any
    difference at all is a packing or zero-offset disagreement, not arithmetic.
    """
    compared = bad = 0
    worst = 0.0
    for name, module in model.named_modules():
        if name not in ckpt.quantized:
            continue
        theirs = module.dequantize_weight().t().float()
        ours = ckpt.quantized[name].dequantize(torch.float16).float()
        diff = (theirs - ours).abs().max().item()
        compared += 1
        bad += diff != 0.0
        worst = max(worst, diff)
    if compared != len(ckpt.quantized):
        raise RuntimeError(f"GPTQModel exposed {compared} of {len(ckpt.quantized)} quantized layers")
    return compared, bad, worst


def compare(ours: torch.Tensor, theirs: torch.Tensor, batch: torch.Tensor) -> dict[str, float]:
    diff = (ours - theirs).abs()
    return {
        "max_abs_diff": round(diff.max().item(), 5),
        "mean_abs_diff": round(diff.mean().item(), 6),
        "top1_agreement": round((ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(), 5),
        "ppl": round(perplexity(theirs, batch), 4),
    }


def perplexity(logits: torch.Tensor, batch: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    )
    return math.exp(nll.item())


def run_case(case: Case, workdir: Path, batch: torch.Tensor) -> dict[str, object]:
    artifact = workdir / case.label
    quantized = quantize_demo(case)
    options = GPTQOptions(act_order=case.act_order)
    build_artifact(
        artifact,
        lambda d: write_gptq(
            d,
            source_model_dir=DEMO_MODEL,
            quantized=quantized,
            options=options,
            variant=case.checkpoint_format,
        ),
        format=Format.GPTQ,
        recipe={"scheme": case.scheme.to_dict(), "options": options.to_dict(), "method": "rtn"},
    )
    verify_manifest(artifact)
    ours = our_logits(artifact, batch)
    result: dict[str, object] = {"case": case.label, "ppl_ours_fp32": round(perplexity(ours, batch), 4)}
    for backend, dtype in KERNELS:
        key = f"{backend}/{dtype}"
        try:
            model = load_gptqmodel(artifact, backend, dtype)
        except Exception as e:  # a consumer's refusal is the result we report, whatever its type
            error = f"{type(e).__name__}: {e}"
            if backend != REFERENCE_BACKEND:  # informational kernel (e.g. fused is 4-bit only)
                result[key] = {"error": error}
                continue
            refused = bool(case.expect_refusal) and case.expect_refusal in str(e)
            result.update(loaded=False, refused_as_expected=refused, error=error)
            if not refused:
                traceback.print_exc()
            return result
        kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
        with torch.no_grad():
            theirs = model(batch).logits.float()
        result[key] = {"kernels": kernels, **compare(ours, theirs, batch)}
        if backend == REFERENCE_BACKEND:
            compared, mismatched, worst = weight_mismatches(model, read_gptq(artifact))
            result.update(weights_compared=compared, weights_not_bit_identical=mismatched, worst=worst)
    result.update(loaded=True, unexpected_load=bool(case.expect_refusal))
    return result


def reference_top1(result: dict[str, object]) -> float:
    reference = result[f"{KERNELS[0][0]}/{KERNELS[0][1]}"]
    assert isinstance(reference, dict)
    return float(reference["top1_agreement"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where artifacts go (default: temp)")
    parser.add_argument("--tokens", type=int, default=512, help="eval tokens (split over prose/code)")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--min-top1", type=float, default=0.98)
    parser.add_argument("--cases", nargs="*", default=None, help="labels to run (default: all)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bitsmith-gptq-compat-"))
    workdir.mkdir(parents=True, exist_ok=True)
    batch = eval_windows(args.tokens, args.window)
    print(f"eval batch {tuple(batch.shape)}, artifacts in {workdir}")
    ok = True
    for case in CASES:
        if args.cases and case.label not in args.cases:
            continue
        start = time.time()
        result = run_case(case, workdir, batch)
        result["seconds"] = round(time.time() - start, 1)
        print(json.dumps(result), flush=True)
        if result["loaded"]:
            ok &= (
                not result["unexpected_load"]
                and result["weights_not_bit_identical"] == 0
                and reference_top1(result) >= args.min_top1
            )
        else:
            ok &= bool(result["refused_as_expected"])
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
