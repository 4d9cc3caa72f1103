"""Which config group quantizes which module: compressed-tensors' target / ignore rules, re-implemented.

Why our own: the reader must not depend on the compressed_tensors package, yet it must resolve a
module's scheme exactly as the consumer does, or it would dequantize with the wrong grid. The rules
(compressed-tensors `utils/match.py` and `apply_quantization_config`, FORMATS.md §3.1):

* a target or ignore entry matches a module by name — exactly, or by `re.match` (anchored at the start
  only) when it starts with ``re:`` — or by class: any class in the module's MRO with that name;
* a module is quantized iff some target matches it and no ignore entry does;
* several groups may match: targets are merged into one table in group order (a target named by two
  groups belongs to the later one), sorted by (``"re:" in target``, target), and the first match wins,
  name matches (exact, then regex) before class matches.

>>> groups = {"group_0": ["Linear"], "group_1": ["model.layers.0.mlp.down_proj", "re:.*q_proj$"]}
>>> lin = ("Linear", "Module")
>>> resolve_group("model.layers.0.mlp.down_proj", lin, groups, ignore=["lm_head"])
'group_1'
>>> resolve_group("model.layers.3.self_attn.q_proj", lin, groups, ignore=[])
'group_1'
>>> resolve_group("model.layers.3.mlp.up_proj", lin, groups, ignore=[])
'group_0'
>>> resolve_group("lm_head", lin, groups, ignore=["lm_head"]) is None
True
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from bitsmith.errors import FormatError
from bitsmith.formats.compressed_tensors.constants import REGEX_PREFIX


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleInfo:
    """What matching and shape checks need of one module of the model."""

    classes: tuple[str, ...]
    """Names of every `torch.nn.Module` class in the module's MRO, most derived first."""
    weight_shape: tuple[int, ...] | None
    """Shape of its own `weight` parameter, if it has one."""


def model_modules(model_dir: Path) -> dict[str, ModuleInfo]:
    """Every module of the causal LM described by `model_dir`'s config.json, built on the meta device.

    The config goes through `bitsmith.models.read_config` (validated, architecture supported,
    `quantization_config` dropped so transformers does not try to quantize the empty model).
    """
    import torch
    import transformers

    from bitsmith.models import read_config

    config, adapter = read_config(model_dir)
    with torch.device("meta"):
        model = getattr(transformers, adapter.causal_lm_class)(config)
    modules: dict[str, ModuleInfo] = {}
    for name, module in model.named_modules():
        weight = dict(module.named_parameters(recurse=False)).get("weight")
        classes = tuple(c.__name__ for c in type(module).__mro__ if issubclass(c, torch.nn.Module))
        modules[name] = ModuleInfo(classes=classes, weight_shape=tuple(weight.shape) if weight is not None else None)
    return modules


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise FormatError(f"compressed-tensors target {REGEX_PREFIX}{pattern!r} is not a valid regex: {e}") from e


def match_name(name: str, target: str) -> bool:
    """`target` names the module: equal, or a ``re:`` regex matching at the start of `name`."""
    if target.startswith(REGEX_PREFIX):
        return _regex(target.removeprefix(REGEX_PREFIX)).match(name) is not None
    return target == name


def matches(name: str, classes: Sequence[str], target: str) -> bool:
    """`target` matches the module by name or by one of its class names."""
    return match_name(name, target) or target in classes


def is_ignored(name: str, classes: Sequence[str], ignore: Iterable[str]) -> bool:
    return any(matches(name, classes, entry) for entry in ignore)


def ordered_matches(name: str, classes: Sequence[str], targets: Iterable[str]) -> list[str]:
    """Matching targets, most specific first: name matches (exact, then regex), then class matches."""
    ordered = sorted(targets, key=lambda t: (REGEX_PREFIX in t, t))
    by_name = [t for t in ordered if match_name(name, t)]
    by_class = [t for t in ordered if t in classes and t not in by_name]
    return by_name + by_class


def resolve_group(
    name: str, classes: Sequence[str], groups: Mapping[str, Sequence[str]], ignore: Iterable[str]
) -> str | None:
    """The config group whose scheme applies to the module, or None if no target takes it or it is ignored.

    `groups` maps group names, in config order, to their targets.
    """
    target_to_group = {target: group for group, targets in groups.items() for target in targets}
    if is_ignored(name, classes, ignore):
        return None
    found = ordered_matches(name, classes, target_to_group)
    return target_to_group[found[0]] if found else None
