"""Run any checkpoint or artifact bitsmith writes on the engine its target uses, and score it.

Artifacts are read back through their format's reader (never from in-memory tensors), so what is
measured is what was written: GPTQ, AWQ and compressed-tensors as a torch model of their dequantized
weights, ONNX through ONNX Runtime, MLX through mlx (`_RUNTIMES`, the one dispatch). The format is
recognised from the directory itself (`artifact_format`); without a quantization block the directory is
an unquantized checkpoint.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from bitsmith.errors import ConfigError, FormatError, UnsupportedError
from bitsmith.schemes import Format

if TYPE_CHECKING:
    import torch

MLX_MARKER = "quantization"


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetResult:
    """Quality of a model on one held-out file (kl / top1 / reference_ppl only with a reference)."""

    dataset: str
    ppl: float
    tokens: int
    kl: float | None = None
    top1: float | None = None
    reference_ppl: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def artifact_format(path: Path) -> Format | None:
    """The format of the artifact at `path`, or None for an unquantized checkpoint.

    GPTQ and ONNX artifacts name themselves in ``quantization_config.quant_method``; an MLX artifact
    carries mlx-lm's own marker, the top-level ``quantization`` block (its ``quantization_config`` is
    mlx-lm's copy of that block, without a method).
    """
    config_path = path / "config.json"
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise FormatError(f"{path} has no config.json") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise FormatError(f"{config_path} must hold a JSON object")
    qcfg = config.get("quantization_config")
    if isinstance(qcfg, dict) and "quant_method" in qcfg:
        method = str(qcfg["quant_method"])
    elif isinstance(config.get(MLX_MARKER), dict):
        return Format.MLX
    elif qcfg:
        method = ""
    else:
        return None
    try:
        return Format(method)
    except ValueError:
        raise UnsupportedError(
            f"{path} is quantized with {method!r}, which bitsmith cannot read; known: {[f.value for f in Format]}"
        ) from None


def load_reference(path: Path) -> torch.nn.Module:
    """A float32 transformers model of `path`: its artifact read back and dequantized, or the checkpoint.

    This is bitsmith's own view of what an artifact means, the reference a runtime's logits are held to.
    """
    from bitsmith.formats import get_format
    from bitsmith.models import build_causal_lm, load_causal_lm

    fmt = artifact_format(path)
    if fmt is None:
        return load_causal_lm(path)
    return build_causal_lm(path, get_format(fmt).read(path).dense_state_dict())


def _onnx_runtime(path: Path) -> torch.nn.Module:
    from bitsmith.formats.onnx.runtime import OnnxCausalLM

    return OnnxCausalLM(path)


def _mlx_runtime(path: Path) -> torch.nn.Module:
    from bitsmith.formats.mlx.runtime import MlxCausalLM

    return MlxCausalLM(path)


_RUNTIMES: Mapping[Format, Callable[[Path], torch.nn.Module]] = MappingProxyType({
    Format.GPTQ: load_reference,
    Format.ONNX: _onnx_runtime,
    Format.MLX: _mlx_runtime,
    Format.AWQ: load_reference,
    Format.COMPRESSED_TENSORS: load_reference,
})
"""The engine each format is executed by: GPTQ, AWQ and compressed-tensors by torch on their dequantized
weights (the target's own kernels live in runtime_nvidia), ONNX by ONNX Runtime, MLX by mlx. Every
engine answers the calling convention of a transformers causal LM
(``model(ids, past_key_values=..., use_cache=...)``)."""

def load_model(path: Path, *, formats: Collection[Format | None] | None = None) -> torch.nn.Module:
    """The model at `path` on the engine of its format; `formats` limits what the caller's target runs."""
    fmt = artifact_format(path)
    if formats is not None and fmt not in formats:
        allowed = sorted("checkpoint" if f is None else f.value for f in formats)
        raise UnsupportedError(f"{path} is {'a checkpoint' if fmt is None else fmt.value}; this runtime runs {allowed}")
    return load_reference(path) if fmt is None else _RUNTIMES[fmt](path)


@functools.lru_cache(maxsize=4)
def _reference(path: str) -> torch.nn.Module:
    return load_reference(Path(path))


def evaluate_path(path: Path, files: Sequence[Path], *, seq_len: int = 512, reference: Path | None = None,
                  formats: Collection[Format | None] | None = None) -> list[DatasetResult]:
    """Perplexity of `path` on each file; with `reference`, also KL, top-1 and the reference's ppl.

    Text is tokenized with the tokenizer stored beside the weights (artifacts carry a copy).
    """
    from bitsmith.evaluate import evaluate, tokenize_file

    if not files:
        raise ConfigError("evaluation needs at least one data file")
    model = load_model(path, formats=formats)
    ref_model = _reference(str(reference.resolve())) if reference is not None else None
    results = []
    for file in files:
        tokens = tokenize_file(path, file)
        scored = evaluate(model, tokens, seq_len=seq_len, reference=ref_model)
        results.append(DatasetResult(dataset=str(file), ppl=scored.ppl, tokens=scored.predictions,
                                     kl=scored.kl, top1=scored.top1, reference_ppl=scored.reference_ppl))
    return results


def generate_greedy(path: Path, prompt: str, max_new_tokens: int, *,
                    should_stop: Callable[[], bool] = lambda: False,
                    formats: Collection[Format | None] | None = None) -> Iterator[str]:
    """Greedy decoding from the model at `path`, yielding the text of each new token as it comes."""
    import torch
    from transformers import AutoTokenizer

    if not prompt:
        raise ConfigError("the prompt is empty")
    model = load_model(path, formats=formats)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    past = None
    step_input = ids
    emitted = ""
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if should_stop():
                return
            out = model(step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                return
            generated.append(token)
            text = str(tokenizer.decode(generated))
            yield text[len(emitted):]
            emitted = text
            step_input = torch.tensor([[token]])
