"""Which solves a job's output formats need, so that several artifacts share one calibration.

The integer formats (GPTQ, AWQ, compressed-tensors, ONNX, MLX) all take the job's recipe as it is:
one solve serves them all. A GGUF variant fixes every tensor's ggml type the way llama-quantize's
named mix does (`bitsmith.formats.gguf.mixes`), so it is its own target: the job's method and
options with a ggml grid per linear. The first target is the primary one, whose quantized linears
the block loop applies as it moves on; the others are solved on the same statistics
(`bitsmith.pipeline.Plan.extra`).

>>> from bitsmith.recipes import Recipe
>>> targets = job_targets(Recipe(), [(Format.GPTQ, None), (Format.AWQ, None)], Path("unused"))
>>> targets.primary_key, targets.extra, targets.key_of(Format.AWQ, None)
('', (), '')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bitsmith.errors import ConfigError
from bitsmith.recipes import Recipe
from bitsmith.schemes import Format, GGMLScheme, Method

INTEGER_KEY = ""
"""The key of the target every integer-grid format shares."""


@dataclass(frozen=True, slots=True, kw_only=True)
class JobTargets:
    """The recipes a job solves, by key; `primary_key` names the one the block loop applies.

    `recipes` is empty when no format needs a solve (only float GGUF variants such as F16).
    """

    primary_key: str
    recipes: dict[str, Recipe]

    @property
    def primary(self) -> Recipe | None:
        return self.recipes.get(self.primary_key)

    @property
    def extra(self) -> tuple[tuple[str, Recipe], ...]:
        return tuple((key, recipe) for key, recipe in self.recipes.items() if key != self.primary_key)

    @staticmethod
    def key_of(fmt: Format, variant: str | None) -> str:
        """The target whose results format `fmt` (with `variant`) is written from."""
        return f"{Format.GGUF.value}:{gguf_variant(variant)}" if fmt is Format.GGUF else INTEGER_KEY


def gguf_variant(variant: str | None) -> str:
    """The mix a GGUF output writes: its variant, F16 when none is given (as llama.cpp's converter)."""
    return (variant or "F16").upper()


def job_targets(recipe: Recipe, outputs: Sequence[tuple[Format, str | None]], model_dir: Path) -> JobTargets:
    """The targets behind `outputs` (format, variant) of a job on the model at `model_dir`.

    A GGUF mix takes the recipe's method and options; its overrides (per-module schemes or skips)
    belong to the integer grids, and a mix that keeps every linear in float needs no solve at all.
    """
    recipes: dict[str, Recipe] = {}
    for fmt, variant in outputs:
        key = JobTargets.key_of(fmt, variant)
        if key in recipes:
            continue
        if fmt is not Format.GGUF:
            recipes[key] = recipe
            continue
        from bitsmith.formats.gguf.mixes import linear_types

        types = linear_types(gguf_variant(variant), model_dir)
        if all(t is None for t in types.values()):
            continue
        if recipe.method.scales_activations or recipe.method is Method.FP8:
            raise ConfigError(f"{recipe.method.value} quantizes onto its own grids and cannot target the GGUF mix "
                              f"{gguf_variant(variant)}; use rtn or gptq for GGUF")
        recipes[key] = recipe.with_schemes(
            {name: None if t is None else GGMLScheme(type=t) for name, t in types.items()}
        )
    primary = INTEGER_KEY if INTEGER_KEY in recipes else next(iter(recipes), INTEGER_KEY)
    return JobTargets(primary_key=primary, recipes=recipes)
