"""The llm-compressor side of `bench/llmcompressor_compare.py`; runs INSIDE the llm-compressor venv.

That venv (`.cache/llmcompressor-venv`, from `bench/llmcompressor-requirements.txt`) has llm-compressor
and its own torch/transformers; bitsmith is not importable there and this file imports nothing of it.
Two commands, one job per process so every run starts from a fresh llm-compressor session:

  quantize    load the model, run llm-compressor's `oneshot` with GPTQModifier or AWQModifier (+ its
              QuantizationModifier) on the token ids of `--tokens` exactly as given (no shuffling, no
              re-tokenization, batch size 1), save the compressed-tensors "pack-quantized" checkpoint
              (plus the source's tokenizer files, copied byte for byte) to `--out`, and write a JSON
              result: seconds of load / oneshot / save, the resolved recipe and the versions;
  decompress  the cross-check: dequantize a compressed-tensors checkpoint with compressed-tensors' own
              `PackedQuantizationCompressor.decompress` and write it as an unquantized float32
              checkpoint that any loader (bitsmith's evaluator included) reads.

Scheme: int weights, `--bits` (4 or 3), one (scale, zero) per `--group-size` inputs, asymmetric, static
(W4A16_ASYM with `num_bits` set), on every Linear but lm_head. Everything else is llm-compressor's
default (GPTQ: dampening 0.01, block 128, actorder "static"; AWQ: Llama mappings, duo scaling, grid 20;
weights observer: memoryless min-max; `--actorder` and `--observer` change the last two); `--dtype` is
the dtype the model is calibrated in. Without an accelerator one llm-compressor call that needs one is
patched out (`cpu_only_workarounds`, recorded in the result).

    python bench/llmcompressor_run.py quantize --model DIR --tokens ids.safetensors --method gptq --bits 4 \
        --out DIR --result result.json
    python bench/llmcompressor_run.py decompress --checkpoint DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
VERSIONED = ("llmcompressor", "compressed-tensors", "torch", "transformers", "accelerate", "safetensors")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def copy_tokenizer(source: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)


def weight_scheme(bits: int, group_size: int, observer: str | None) -> dict[str, Any]:
    """W4A16_ASYM's weights with `bits` bits: one config group, every Linear (lm_head ignored by the caller)."""
    weights: dict[str, Any] = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group",
                               "group_size": group_size, "dynamic": False}
    if observer:
        weights["observer"] = observer
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def recipe_for(args: argparse.Namespace) -> list[Any]:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY

    method = args.method
    groups = weight_scheme(args.bits, args.group_size, args.observer)
    if method == "gptq":
        gptq: dict[str, Any] = {}
        if args.actorder is not None:
            gptq["actorder"] = None if args.actorder == "none" else args.actorder
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"], **gptq)]
    if method == "awq":
        return [AWQModifier(mappings=AWQ_MAPPING_REGISTRY["LlamaForCausalLM"]),
                QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    raise SystemExit(f"unknown method {method!r}")


def describe(recipe: list[Any]) -> list[dict[str, Any]]:
    """Each modifier's settings as llm-compressor resolved them (for the record)."""
    described = []
    for modifier in recipe:
        fields = modifier.model_dump(mode="json", exclude_none=True)
        fields = {k: v for k, v in fields.items() if not k.startswith("_") and not k.endswith("_")
                  and k not in ("index", "group", "start", "end", "update")}
        described.append({"modifier": type(modifier).__name__, **fields})
    return described


def cpu_only_workarounds() -> list[str]:
    """Make llm-compressor run without an accelerator; what was patched (nothing where one is present).

    llm-compressor 0.14's AWQModifier pins its cached activations (`IntermediatesCache.pin_memory`) before
    every mapping's grid search, unconditionally; pinning needs an accelerator and raises without one.
    Pinning only speeds host-to-device copies, of which a CPU-only run has none, so it becomes a no-op.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        return []

    def no_pin(self: Any, batch_index: int, input_names: list[str] | None = None) -> None:
        return None

    IntermediatesCache.pin_memory = no_pin
    return ["IntermediatesCache.pin_memory is a no-op (no accelerator to pin memory for)"]


def cmd_quantize(args: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty")
    ids = load_file(args.tokens)["input_ids"]
    samples, seq_len = ids.shape
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    dtype = getattr(torch, args.dtype)

    patches = cpu_only_workarounds()
    t_start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    t_loaded = time.perf_counter()
    recipe = recipe_for(args)
    oneshot(model=model, tokenizer=args.model, dataset=dataset, recipe=recipe, num_calibration_samples=samples,
            max_seq_length=seq_len, shuffle_calibration_samples=False, batch_size=1)
    t_solved = time.perf_counter()
    model.save_pretrained(out, save_compressed=True)
    copy_tokenizer(Path(args.model), out)
    t_saved = time.perf_counter()

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    result = {
        "method": args.method, "bits": args.bits, "group_size": args.group_size, "dtype": args.dtype,
        "samples": samples, "seq_len": seq_len, "out": str(out),
        "seconds": {"load": t_loaded - t_start, "oneshot": t_solved - t_loaded, "save": t_saved - t_solved,
                    "total": t_saved - t_start},
        "recipe": describe(recipe), "format": qcfg.get("format"), "quant_method": qcfg.get("quant_method"),
        "torch_threads": torch.get_num_threads(), "patches": patches, "versions": versions(),
    }
    Path(args.result).write_text(json.dumps(result, indent=1))


def cmd_decompress(args: argparse.Namespace) -> None:
    import torch
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(args.checkpoint), Path(args.out)
    config = json.loads((src / "config.json").read_text())
    qcfg = QuantizationConfig.model_validate(config.pop("quantization_config"))
    if qcfg.format != "pack-quantized" or len(qcfg.config_groups) != 1:
        raise SystemExit(f"{src}: expected one pack-quantized config group, got {qcfg.format} "
                         f"with {len(qcfg.config_groups)} groups")
    scheme = next(iter(qcfg.config_groups.values()))
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = f.get_tensor(key)
    dense: dict[str, torch.Tensor] = {}
    modules = {key.removesuffix(".weight_packed") for key in tensors if key.endswith(".weight_packed")}
    for key, value in tensors.items():
        if key.rpartition(".")[0] not in modules:
            dense[key] = value.to(torch.float32) if value.is_floating_point() else value
    for module in sorted(modules):
        names = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
        local = {name: tensors[f"{module}.{name}"] for name in names if f"{module}.{name}" in tensors}
        dense[f"{module}.weight"] = PackedQuantizationCompressor.decompress(local, scheme)["weight"].to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in dense.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    print(json.dumps({"modules": len(modules), "tensors": len(dense), "out": str(out)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="one llm-compressor oneshot job, saved compressed")
    q.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    q.add_argument("--tokens", required=True, help="safetensors file holding input_ids [samples, seq_len]")
    q.add_argument("--method", choices=["gptq", "awq"], required=True)
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128)
    q.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype the model is loaded and calibrated in (bitsmith calibrates in float32)")
    q.add_argument("--actorder", choices=["static", "none"],
                   help="GPTQ column order (default: llm-compressor's, static = by the Hessian diagonal)")
    q.add_argument("--observer", help="weights observer, e.g. memoryless_mse (default: llm-compressor's, min-max)")
    q.add_argument("--out", required=True)
    q.add_argument("--result", required=True, help="where the JSON result goes")
    q.set_defaults(func=cmd_quantize)
    d = sub.add_parser("decompress", help="dequantize a pack-quantized checkpoint with compressed-tensors")
    d.add_argument("--checkpoint", required=True)
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_decompress)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.func(args)


if __name__ == "__main__":
    main()
