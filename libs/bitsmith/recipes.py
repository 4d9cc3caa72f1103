"""A recipe: what happens to every linear of a model — one default, ordered per-module overrides.

Users mix precision by module (attention at 8 bits, MLP at 4, a sensitive layer kept in float); the
recipe is where that choice lives, in one dataclass that the CLI loads from YAML, the wire carries as
`bitsmith.v1.Recipe`, and the pipeline asks per linear (`Recipe.assign`). Overrides are tried in
order and the first whose regex is found in the module's full name (``re.search``) wins; what an
override leaves unset (bits, method, ...) comes from the recipe's default.

>>> recipe = Recipe.from_mapping({
...     "method": "gptq", "scheme": {"bits": 4, "group_size": 128},
...     "overrides": [{"pattern": r"self_attn\\.", "bits": 8}, {"pattern": r"layers\\.0\\.mlp", "skip": True}],
... })
>>> recipe.assign("model.layers.1.self_attn.q_proj").scheme.bits
8
>>> recipe.assign("model.layers.0.mlp.up_proj") is None
True
"""

from __future__ import annotations

import math
import re
import re._parser as sre_parser  # re's own parser: the one view of a pattern as the engine will run it
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from bitsmith.errors import ConfigError, NotFoundError
from bitsmith.schemes import (
    AWQOptions,
    FP8Scheme,
    GGMLScheme,
    GPTQOptions,
    GridSearch,
    Method,
    QuantScheme,
    Scheme,
)

MAX_RECIPE_BYTES = 1 << 20
"""A recipe is a few hundred bytes; a larger file is a mistake (or hostile), refused before parsing."""

MAX_OVERRIDES = 10_000

MAX_PATTERN_CHARS = 1024
MAX_PATTERN_REPEATS = 3
"""Python's regex engine backtracks: a repetition nested in another (``(\\w+\\.?)+x$``) takes exponential
time and k repetitions in sequence (``.*.*.*.*.*.*.*.*x``) take n^k on a module name of n characters — seconds
to hours per name, in the calibrator's Plan, for one override. Patterns are refused before they run: no
repetition inside a repetition (nor an alternation or back-reference there), at most this many in all."""

MAX_GRID_STEPS = 10_000
"""GridSearch.steps and AWQ's grids: each step is a quantization of the group (AWQ: of the block), and the
search lists its steps up front, so a count from the wire must be bounded before a solve allocates it."""
MAX_CLIP_TOKENS = 1 << 20

_SCHEME_KEYS = frozenset(f.name for f in fields(QuantScheme))

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Assignment:
    """How one linear is quantized: the method that fills the grid and the grid itself."""

    method: Method
    scheme: Scheme

    @property
    def needs_calibration(self) -> bool:
        """Whether solving it needs calibration data: the method's own need, or FP8's static scales."""
        return self.method.needs_calibration or (isinstance(self.scheme, FP8Scheme) and self.scheme.static_activations)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleOverride:
    """Modules whose full name matches `pattern` (``re.search``) take this method/scheme, or stay float.

    `scheme` and `method` are None where the recipe's default applies; `skip` excludes both.
    """

    pattern: str
    scheme: Scheme | None = None
    method: Method | None = None
    skip: bool = False
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.pattern:
            raise ConfigError("an override needs a non-empty pattern")
        if len(self.pattern) > MAX_PATTERN_CHARS:
            raise ConfigError(f"override pattern {self.pattern[:64]!r}... is {len(self.pattern)} characters; "
                              f"the limit is {MAX_PATTERN_CHARS}")
        try:
            object.__setattr__(self, "_regex", re.compile(self.pattern))
        except re.error as exc:
            raise ConfigError(f"override pattern {self.pattern!r} is not a valid regex: {exc}") from None
        _check_backtracking(self.pattern)
        if self.skip and (self.scheme is not None or self.method is not None):
            raise ConfigError(f"override {self.pattern!r} skips its modules, so it cannot also set a scheme or method")
        if not self.skip and self.scheme is None and self.method is None:
            raise ConfigError(f"override {self.pattern!r} changes nothing: give a scheme field, a method or skip")

    def matches(self, module: str) -> bool:
        return self._regex.search(module) is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class Recipe:
    """The default method and scheme, the methods' options, and ordered per-module overrides.

    `scheme` is the integer grid of the integer methods; linears the fp8 method quantizes take the
    float8 grid `fp8` instead (an override naming integer-grid fields cannot apply to them).
    """

    VERSION = 1

    method: Method = Method.GPTQ
    scheme: QuantScheme = field(default_factory=QuantScheme)
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    awq: AWQOptions = field(default_factory=AWQOptions)
    fp8: FP8Scheme = field(default_factory=FP8Scheme)
    overrides: tuple[ModuleOverride, ...] = ()

    def __post_init__(self) -> None:
        if len(self.overrides) > MAX_OVERRIDES:
            raise ConfigError(f"a recipe takes at most {MAX_OVERRIDES} overrides, got {len(self.overrides)}")
        for override in self.overrides:
            if (override.method or self.method) is Method.FP8 and isinstance(override.scheme, QuantScheme):
                raise ConfigError(f"override {override.pattern!r} gives integer-grid fields to linears the fp8 "
                                  "method quantizes; the float8 grid is set by the recipe's fp8 section")
        _check_work_bounds(self)

    def assign(self, module: str) -> Assignment | None:
        """The method and scheme of the linear `module` (full name), or None when it stays float."""
        for override in self.overrides:
            if override.matches(module):
                if override.skip:
                    return None
                return self._assignment(override.method or self.method, override.scheme)
        return self._assignment(self.method, None)

    def _assignment(self, method: Method, scheme: Scheme | None) -> Assignment:
        default = self.fp8 if method is Method.FP8 else self.scheme
        return Assignment(method=method, scheme=scheme or default)

    def assignments(self, modules: Iterable[str]) -> dict[str, Assignment | None]:
        """`assign` for each module; `ConfigError` when nothing at all would be quantized."""
        out = {module: self.assign(module) for module in modules}
        if out and all(a is None for a in out.values()):
            raise ConfigError("the recipe skips every linear of the model: there is nothing to quantize")
        return out

    @property
    def methods(self) -> frozenset[Method]:
        """Every method the recipe can assign."""
        return frozenset([self.method, *(o.method for o in self.overrides if o.method is not None)])

    @property
    def calibration_needs(self) -> tuple[str, ...]:
        """What in the recipe needs calibration data, by name (``gptq``, ``fp8 static activations``);
        empty when nothing does, so jobs can refuse a missing calibration set up front."""
        needs = {m.value for m in self.methods if m.needs_calibration}
        if Method.FP8 in self.methods and self.fp8.static_activations:
            needs.add(f"{Method.FP8.value} static activations")
        return tuple(sorted(needs))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for manifests and YAML: schemes of overrides are written in full."""
        return {
            "_version": self.VERSION,
            "method": self.method.value,
            "scheme": asdict(self.scheme),
            "gptq": asdict(self.gptq),
            "awq": asdict(self.awq),
            "fp8": asdict(self.fp8),
            "overrides": [
                {"pattern": o.pattern, "skip": o.skip, "method": o.method.value if o.method else None,
                 "scheme": _scheme_dict(o.scheme) if o.scheme else None}
                for o in self.overrides
            ],
        }

    def with_schemes(self, schemes: Mapping[str, Scheme | None]) -> Recipe:
        """This recipe's method and options with the given scheme for each named module (None: kept
        float) in place of its own overrides — how a GGUF mix, which fixes every tensor's type,
        becomes a solve target. Modules not named keep this recipe's default scheme."""
        return replace(self, overrides=tuple(
            ModuleOverride(pattern=f"^{re.escape(name)}$", skip=True) if scheme is None
            else ModuleOverride(pattern=f"^{re.escape(name)}$", scheme=scheme)
            for name, scheme in schemes.items()
        ))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str = "recipe") -> Recipe:
        """Build from plain data (a parsed YAML file); unknown keys and bad values are `ConfigError`s.

        Overrides give scheme fields flat (``bits: 8``) or nested (``scheme: {bits: 8}``); either way
        they are merged onto the default scheme, so the result holds full schemes.
        """
        _check_keys(data, {"_version", "method", "scheme", "gptq", "awq", "fp8", "overrides"}, where)
        version = data.get("_version", cls.VERSION)
        if version != cls.VERSION:
            raise ConfigError(f"{where}: version {version!r} is not {cls.VERSION}")
        scheme = _scheme(QuantScheme(), _mapping(data.get("scheme", {}), f"{where}.scheme"), f"{where}.scheme")
        overrides = data.get("overrides", [])
        if not isinstance(overrides, list):
            raise ConfigError(f"{where}.overrides must be a list, got {type(overrides).__name__}")
        return cls(
            method=_method(data.get("method", Method.GPTQ.value), f"{where}.method"),
            scheme=scheme,
            gptq=_gptq(_mapping(data.get("gptq", {}), f"{where}.gptq"), f"{where}.gptq"),
            awq=_options(AWQOptions, _mapping(data.get("awq", {}), f"{where}.awq"), f"{where}.awq"),
            fp8=_fp8(_mapping(data.get("fp8", {}), f"{where}.fp8"), f"{where}.fp8"),
            overrides=tuple(
                _override(_mapping(item, f"{where}.overrides[{i}]"), scheme, f"{where}.overrides[{i}]")
                for i, item in enumerate(overrides)
            ),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        """Load a recipe file (see `from_mapping` for its keys)."""
        import yaml

        path = Path(path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"recipe file {path} does not exist") from None
        if size > MAX_RECIPE_BYTES:
            raise ConfigError(f"recipe file {path} is {size} bytes; the limit is {MAX_RECIPE_BYTES}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"recipe file {path} is not valid YAML: {exc}") from None
        return cls.from_mapping(_mapping(data, str(path)), where=str(path))


_REPEATS = (sre_parser.MAX_REPEAT, sre_parser.MIN_REPEAT, sre_parser.POSSESSIVE_REPEAT)
_REFERENCES = (sre_parser.GROUPREF, sre_parser.GROUPREF_EXISTS)


def _check_backtracking(pattern: str) -> None:
    """Refuse a pattern that could backtrack for minutes (see `MAX_PATTERN_REPEATS`)."""
    count = _count_repeats(sre_parser.parse(pattern), inside=False, pattern=pattern)
    if count > MAX_PATTERN_REPEATS:
        raise ConfigError(f"override pattern {pattern!r} repeats {count} times; at most {MAX_PATTERN_REPEATS} "
                          "repetitions (*, +, {m,n}) are allowed, so matching a module name stays fast")


def _count_repeats(items: Any, *, inside: bool, pattern: str) -> int:
    """Repetitions (of more than one) in a parsed pattern; `ConfigError` for one nested in another, or an
    alternation or back-reference inside one (each makes the number of ways to match a name explode)."""
    count = 0
    for op, av in items:
        if op in _REPEATS:
            if inside:
                raise ConfigError(f"override pattern {pattern!r} nests a repetition inside a repetition, which can "
                                  "take exponential time to match; write it without the inner one")
            _low, high, body = av
            count += (high > 1) + _count_repeats(body, inside=high > 1, pattern=pattern)
        elif op is sre_parser.BRANCH or op in _REFERENCES:
            if inside or op in _REFERENCES:
                raise ConfigError(f"override pattern {pattern!r} has an alternation inside a repetition or a "
                                  "back-reference, which can take exponential time to match")
            count += sum(_count_repeats(branch, inside=inside, pattern=pattern) for branch in av[1])
        elif op is sre_parser.SUBPATTERN:
            count += _count_repeats(av[3], inside=inside, pattern=pattern)
        elif op in (sre_parser.ASSERT, sre_parser.ASSERT_NOT):
            count += _count_repeats(av[1], inside=inside, pattern=pattern)
        elif op is sre_parser.ATOMIC_GROUP:
            count += _count_repeats(av, inside=inside, pattern=pattern)
    return count


def _check_work_bounds(recipe: Recipe) -> None:
    """Options that size a solve's work or memory, bounded (schemes check their ranges, not their size)."""
    search = recipe.gptq.grid_search
    sizes = {"gptq.grid_search.steps": search.steps if search else 1, "awq.grid": recipe.awq.grid,
             "awq.clip_grid": recipe.awq.clip_grid}
    for name, value in sizes.items():
        if value > MAX_GRID_STEPS:
            raise ConfigError(f"recipe {name} is {value}; the limit is {MAX_GRID_STEPS}")
    if recipe.awq.clip_tokens > MAX_CLIP_TOKENS:
        raise ConfigError(f"recipe awq.clip_tokens is {recipe.awq.clip_tokens}; the limit is {MAX_CLIP_TOKENS}")
    finite = {"gptq.max_damp_percent": recipe.gptq.max_damp_percent,
              "gptq.grid_search.norm": search.norm if search else 1.0}
    for name, number in finite.items():
        if not math.isfinite(number):
            raise ConfigError(f"recipe {name} must be a finite number, got {number}")


def _check_keys(data: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    if unknown := sorted(set(data) - set(allowed)):
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _method(value: Any, where: str) -> Method:
    try:
        return Method(value)
    except ValueError:
        raise ConfigError(f"{where}: unknown method {value!r}; known: {[m.value for m in Method]}") from None


def _options(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    _check_keys(data, {f.name for f in fields(cls)}, where)  # type: ignore[arg-type]
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _scheme_dict(scheme: Scheme) -> dict[str, Any]:
    """A scheme as plain data: integer grids field by field, ggml grids by their type."""
    if isinstance(scheme, GGMLScheme):
        return {"ggml": scheme.type.value, "importance": scheme.importance}
    if isinstance(scheme, FP8Scheme):
        return {"fp8": asdict(scheme)}
    return asdict(scheme)


def _fp8(data: Mapping[str, Any], where: str) -> FP8Scheme:
    """The fp8 section: booleans only (YAML's `yes`/`1` would otherwise slip through as truthy)."""
    _check_keys(data, {f.name for f in fields(FP8Scheme)}, where)
    for key, value in data.items():
        if not isinstance(value, bool):
            raise ConfigError(f"{where}.{key} must be true or false, got {value!r}")
    return FP8Scheme(**data)


def _scheme(base: QuantScheme, data: Mapping[str, Any], where: str) -> QuantScheme:
    _check_keys(data, _SCHEME_KEYS, where)
    for key, value in data.items():
        wanted = bool if key == "sym" else int
        if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            raise ConfigError(f"{where}.{key} must be {wanted.__name__}, got {value!r}")
    try:
        return replace(base, **data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _gptq(data: Mapping[str, Any], where: str) -> GPTQOptions:
    data = dict(data)
    search = data.pop("grid_search", None)
    options = _options(GPTQOptions, data, where)
    if search is None or search is False:
        return options
    grid = GridSearch() if search is True else _options(GridSearch, _mapping(search, f"{where}.grid_search"),
                                                          f"{where}.grid_search")
    return replace(options, grid_search=grid)


def _override(data: Mapping[str, Any], default: QuantScheme, where: str) -> ModuleOverride:
    _check_keys(data, {"pattern", "method", "skip", "scheme", *_SCHEME_KEYS}, where)
    pattern = data.get("pattern")
    if not isinstance(pattern, str):
        raise ConfigError(f"{where}.pattern must be a string, got {pattern!r}")
    skip = data.get("skip", False)
    if not isinstance(skip, bool):
        raise ConfigError(f"{where}.skip must be true or false, got {skip!r}")
    flat = {k: v for k, v in data.items() if k in _SCHEME_KEYS}
    nested = _mapping(data.get("scheme") or {}, f"{where}.scheme")  # to_dict writes null for "none"
    if flat and nested:
        raise ConfigError(f"{where}: give scheme fields either flat or under 'scheme', not both")
    fields_given = flat or nested
    return ModuleOverride(
        pattern=pattern,
        scheme=_scheme(default, fields_given, where) if fields_given else None,
        method=_method(data["method"], f"{where}.method") if data.get("method") is not None else None,
        skip=skip,
    )
