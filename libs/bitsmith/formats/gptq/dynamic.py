"""GPTQModel's per-module `dynamic` overrides: mixed precision and kept-float linears in one GPTQ checkpoint.

The GPTQ config has one global bits/group_size/sym. GPTQModel (and vLLM, which reads the same key)
lets `quantization_config.dynamic` override it per module: keys are regexes matched with ``re.match``
against the full module name, tried in order, first match wins; ``"-:REGEX"`` means the module is
not quantized, ``"+:REGEX"`` (or a bare regex) maps to the fields that differ from the global ones.

We write exact names (escaped, anchored at the end) rather than clever regexes, grouped into one
alternation per scheme, and add vLLM's fused name (``qkv_proj``, ``gate_up_proj``) where every member
of a fused set in a block shares the scheme, because vLLM looks the fused layer up by that name.

>>> from bitsmith.schemes import QuantScheme
>>> names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
>>> pattern_for(names)
'model\\\\.layers\\\\.0\\\\.self_attn\\\\.(?:k_proj|q_proj)$'
>>> resolve({"-:.*k_proj$": {}, "+:.*q_proj$": {"bits": 8}}, names[0], QuantScheme()).bits
8
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import replace
from typing import Any

from bitsmith.errors import ConfigError, FormatError
from bitsmith.quantized import QuantizedWeight
from bitsmith.schemes import QuantScheme

SKIP = "-:"
APPLY = "+:"
FUSED: Mapping[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
"""vLLM's merged linears and their members: the name it looks a merged layer up by."""

LAYOUT_KEYS = ("bits", "group_size", "sym")
"""The override fields that change how a layer is stored; others (damping, ...) only describe the solve."""


def _layout(scheme: QuantScheme) -> tuple[int, int, bool]:
    return scheme.bits, scheme.group_size, scheme.sym


def default_scheme(quantized: Mapping[str, QuantizedWeight]) -> QuantScheme:
    """The global scheme: the one most linears use (ties broken by name order), so `dynamic` stays short."""
    counts = Counter(qw.scheme for _, qw in sorted(quantized.items()))
    return counts.most_common(1)[0][0]


def pattern_for(names: Iterable[str]) -> str:
    """One regex matching exactly `names` (plus vLLM's fused names where a whole fused set is there)."""
    by_parent: dict[str, set[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault(parent, set()).add(leaf)
    alternatives = []
    for parent, leaves in sorted(by_parent.items()):
        leaves = leaves | {fused for fused, members in FUSED.items() if set(members) <= leaves}
        alternatives.append(f"{re.escape(parent)}\\.(?:{'|'.join(sorted(leaves))})$")
    return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"


def dynamic_config(
    quantized: Mapping[str, QuantizedWeight], skipped: Collection[str], default: QuantScheme
) -> dict[str, dict[str, Any]]:
    """The `dynamic` block: kept-float linears first, then one entry per scheme other than `default`."""
    dynamic: dict[str, dict[str, Any]] = {}
    if skipped:
        dynamic[SKIP + pattern_for(skipped)] = {}
    by_layout: dict[tuple[int, int, bool], list[str]] = {}
    for name, qw in sorted(quantized.items()):
        if _layout(qw.scheme) != _layout(default):
            by_layout.setdefault(_layout(qw.scheme), []).append(name)
    for layout, names in sorted(by_layout.items()):
        dynamic[APPLY + pattern_for(names)] = dict(zip(LAYOUT_KEYS, layout, strict=True))
    return dynamic


def resolve(dynamic: Mapping[str, Any], module: str, default: QuantScheme, *, where: str = "dynamic"
            ) -> QuantScheme | None:
    """The scheme of `module` under `dynamic` (None: kept in float), with GPTQModel's and vLLM's rules."""
    for key, override in dynamic.items():
        skip = key.startswith(SKIP)
        pattern = key[len(SKIP):] if skip else key.removeprefix(APPLY)
        try:
            matched = re.match(pattern, module) is not None
        except re.error as exc:
            raise FormatError(f"{where}: key {key!r} is not a valid regex: {exc}") from None
        if not matched:
            continue
        if skip:
            return None
        if not isinstance(override, Mapping):
            raise FormatError(f"{where}: the value of {key!r} must be an object, got {override!r}")
        fields = {k: override[k] for k in LAYOUT_KEYS if k in override}
        for k, v in fields.items():
            if type(v) is not (bool if k == "sym" else int):
                raise FormatError(f"{where}: {key!r} sets {k} to {v!r}")
        try:
            return replace(default, **fields)
        except ConfigError as exc:
            raise FormatError(f"{where}: {key!r}: {exc}") from None
    return default
