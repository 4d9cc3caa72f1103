"""Load any checkpoint or artifact bitsmith understands as a float model, and score it.

Artifacts are read back through their format's reader (never from in-memory tensors), so what is
measured is what was written. The format is recognised from the directory itself: a
`quantization_config` in config.json names it; without one the directory is an unquantized checkpoint.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitsmith.errors import ConfigError, FormatError, UnsupportedError
from bitsmith.schemes import Format

if TYPE_CHECKING:
    import torch


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
    """The format of the artifact at `path`, or None for an unquantized checkpoint."""
    config_path = path / "config.json"
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise FormatError(f"{path} has no config.json") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{config_path} is not valid JSON: {exc}") from exc
    qcfg = config.get("quantization_config") if isinstance(config, dict) else None
    if not qcfg:
        return None
    method = str(qcfg.get("quant_method", ""))
    try:
        return Format(method)
    except ValueError:
        raise UnsupportedError(
            f"{path} is quantized with {method!r}, which bitsmith cannot read; known: {[f.value for f in Format]}"
        ) from None


def load_model(path: Path) -> torch.nn.Module:
    """A float32 eval-mode model from a checkpoint or an artifact directory."""
    from bitsmith.formats import get_format
    from bitsmith.models import build_causal_lm, load_causal_lm

    fmt = artifact_format(path)
    if fmt is None:
        return load_causal_lm(path)
    checkpoint = get_format(fmt).read(path)
    return build_causal_lm(path, checkpoint.dense_state_dict())


@functools.lru_cache(maxsize=4)
def _reference(path: str) -> torch.nn.Module:
    return load_model(Path(path))


def evaluate_path(path: Path, files: Sequence[Path], *, seq_len: int = 512, reference: Path | None = None
                  ) -> list[DatasetResult]:
    """Perplexity of `path` on each file; with `reference`, also KL, top-1 and the reference's ppl.

    Text is tokenized with the tokenizer stored beside the weights (artifacts carry a copy).
    """
    from bitsmith.evaluate import evaluate, tokenize_file

    if not files:
        raise ConfigError("evaluation needs at least one data file")
    model = load_model(path)
    ref_model = _reference(str(reference.resolve())) if reference is not None else None
    results = []
    for file in files:
        tokens = tokenize_file(path, file)
        scored = evaluate(model, tokens, seq_len=seq_len, reference=ref_model)
        ref_ppl = evaluate(ref_model, tokens, seq_len=seq_len).ppl if ref_model is not None else None
        results.append(DatasetResult(dataset=str(file), ppl=scored.ppl, tokens=scored.predictions,
                                     kl=scored.kl, top1=scored.top1, reference_ppl=ref_ppl))
    return results


def generate_greedy(path: Path, prompt: str, max_new_tokens: int, *,
                    should_stop: Callable[[], bool] = lambda: False) -> Iterator[str]:
    """Greedy decoding from the model at `path`, yielding the text of each new token as it comes."""
    import torch
    from transformers import AutoTokenizer

    if not prompt:
        raise ConfigError("the prompt is empty")
    model = load_model(path)
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
