"""Demo-model solves shared by the format tests, computed once per process, and the mixed-precision recipe."""

from __future__ import annotations

import functools

from bitsmith.demo import CALIB_FILES, DEMO_MODEL
from bitsmith.pipeline import quantize_in_process
from bitsmith.quantized import QuantizedWeight
from bitsmith.recipes import ModuleOverride, Recipe
from bitsmith.schemes import Method, QuantScheme

FLOAT = "model.layers.1.mlp.down_proj"
TWO_BIT = "model.layers.3.mlp.up_proj"
MIXED = Recipe(method=Method.RTN, scheme=QuantScheme(bits=4, group_size=128), overrides=(
    ModuleOverride(pattern=r"layers\.1\.mlp\.down_proj", skip=True),
    ModuleOverride(pattern=r"layers\.3\.mlp\.up_proj", scheme=QuantScheme(bits=2, group_size=32, sym=True)),
    ModuleOverride(pattern=r"self_attn\.", scheme=QuantScheme(bits=8, group_size=64)),
))
"""Attention 8-bit groups of 64 (16 linears: the global scheme), MLP 4-bit groups of 128, one MLP linear
2-bit symmetric groups of 32, one kept in float."""


@functools.cache
def solve(recipe: Recipe) -> dict[str, QuantizedWeight]:
    return quantize_in_process(DEMO_MODEL, calib_files=CALIB_FILES, samples=1, seq_len=16, recipe=recipe).quantized


def rtn(scheme: QuantScheme) -> dict[str, QuantizedWeight]:
    return solve(Recipe(scheme=scheme, method=Method.RTN))
