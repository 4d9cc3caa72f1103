"""What a quantization job asks for, as typed dataclasses: the one place a `QuantizeJob` is built.

The SDK (`Client.quantize`) and the CLI both describe a job with these, so a request is checked once,
on construction, with errors that name the bad field — before any RPC — and becomes protobuf in one
place (`QuantizeRequest.to_proto`). Paths are made absolute here because the services resolve them
in their own working directories.

>>> OutputFormat.parse("gguf:Q4_K_M")
OutputFormat(format=<Format.GGUF: 'gguf'>, variant='Q4_K_M')
>>> Calibration(files=["calib.txt"], samples=0)
Traceback (most recent call last):
...
bitsmith.errors.ConfigError: calibration samples must be positive, got 0
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from bitsmith.errors import ConfigError
from bitsmith.recipes import Recipe
from bitsmith.schemes import Format, QuantScheme

if TYPE_CHECKING:
    from bitsmith.v1 import common_pb2, job_pb2

StrPath = str | os.PathLike[str]
E = TypeVar("E", bound=StrEnum)


class CalibrationMode(StrEnum):
    SEQUENTIAL = "sequential"
    """Block i+1 calibrates on the outputs of quantized block i (what GPTQ's paper does)."""
    PARALLEL = "parallel"
    """Every block calibrates on the float model's activations, so the solves of all blocks fan out over
    the job's solver replicas while calibration moves on."""


class CheckpointFormat(StrEnum):
    """Which GPTQ checkpoint layout a GPTQ artifact takes."""

    AUTO = "auto"
    """v1 when every grid is symmetric (it loads everywhere), else v2."""
    GPTQ = "gptq"
    """v1: stores zero - 1, so asymmetric grids are solved with zeros >= 1."""
    GPTQ_V2 = "gptq_v2"
    """True zeros: what GPTQModel and transformers need for asymmetric grids from other quantizers."""


def _absolute(paths: Sequence[StrPath], what: str) -> tuple[Path, ...]:
    if isinstance(paths, str | os.PathLike):
        raise ConfigError(f"{what} takes a list of files, got the single path {os.fspath(paths)!r}")
    out = []
    for p in paths:
        if not os.fspath(p):
            raise ConfigError(f"{what} holds an empty path")
        out.append(Path(p).resolve())
    return tuple(out)


def _enum(cls: type[E], value: E | str, what: str) -> E:
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"{what} must be one of {[m.value for m in cls]}, got {value!r}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
    """The text the calibrator draws `samples` windows of `seq_len` tokens from (split evenly across
    `files`), and how many further held-out windows measure each block's output error (None: the
    server's default, samples / 16 clamped to [1, 16]; 0: none)."""

    files: Sequence[StrPath]
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    mode: CalibrationMode | str = CalibrationMode.SEQUENTIAL
    holdout_samples: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", _absolute(self.files, "calibration files"))
        object.__setattr__(self, "mode", _enum(CalibrationMode, self.mode, "calibration mode"))
        if self.samples <= 0:
            raise ConfigError(f"calibration samples must be positive, got {self.samples}")
        if self.seq_len <= 0:
            raise ConfigError(f"calibration seq_len must be positive, got {self.seq_len}")
        if self.seed < 0:
            raise ConfigError(f"calibration seed must be >= 0, got {self.seed}")
        if self.holdout_samples is not None and self.holdout_samples < 0:
            raise ConfigError(f"calibration holdout_samples must be >= 0 or None, got {self.holdout_samples}")

    def to_proto(self) -> common_pb2.CalibrationSpec:
        from bitsmith.v1 import common_pb2

        msg = common_pb2.CalibrationSpec(
            files=[str(f) for f in self.files], samples=self.samples, seq_len=self.seq_len, seed=self.seed,
            mode=common_pb2.CalibrationMode.Value(f"CALIBRATION_MODE_{str(self.mode).upper()}"),
        )
        if self.holdout_samples is not None:
            msg.holdout_samples = self.holdout_samples
        return msg


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputFormat:
    """One artifact to write. Only GGUF takes a variant: the llama-quantize mix ("Q4_K_M"); the GPTQ
    checkpoint layout is the request's `checkpoint_format`."""

    format: Format | str
    variant: str | None = None

    def __post_init__(self) -> None:
        fmt = _enum(Format, self.format, "an output format")
        object.__setattr__(self, "format", fmt)
        if self.variant is not None and fmt is not Format.GGUF:
            raise ConfigError(f"{fmt.value} takes no variant {self.variant!r} (only gguf:MIX does)")
        if self.variant == "":
            object.__setattr__(self, "variant", None)

    @classmethod
    def parse(cls, text: str) -> OutputFormat:
        """``"gguf:Q4_K_M"`` → GGUF with that mix; a bare name has no variant."""
        name, _, variant = text.partition(":")
        return cls(format=name, variant=variant or None)

    def __str__(self) -> str:
        return f"{Format(self.format).value}:{self.variant}" if self.variant else Format(self.format).value


@dataclass(frozen=True, slots=True, kw_only=True)
class QualityGate:
    """Bounds every artifact must meet on the evaluation data, else the job fails with the numbers."""

    max_ppl_increase_pct: float | None = None
    max_kl: float | None = None
    min_top1: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_ppl_increase_pct", "max_kl"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"quality gate {name} must be >= 0, got {value}")
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise ConfigError(f"quality gate min_top1 must be in [0, 1], got {self.min_top1}")

    def to_proto(self) -> common_pb2.QualityGate:
        from bitsmith.v1 import common_pb2

        msg = common_pb2.QualityGate()
        for name in ("max_ppl_increase_pct", "max_kl", "min_top1"):
            if (value := getattr(self, name)) is not None:
                setattr(msg, name, value)
        return msg


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluation:
    """Held-out text every artifact is scored on (perplexity, and KL / top-1 against the float model)."""

    files: Sequence[StrPath]
    seq_len: int = 512
    gate: QualityGate | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", _absolute(self.files, "evaluation files"))
        if not self.files:
            raise ConfigError("evaluation needs at least one file")
        if self.seq_len <= 0:
            raise ConfigError(f"evaluation seq_len must be positive, got {self.seq_len}")

    def to_proto(self) -> common_pb2.EvalSpec:
        from bitsmith.v1 import common_pb2

        return common_pb2.EvalSpec(files=[str(f) for f in self.files], seq_len=self.seq_len,
                                   gate=self.gate.to_proto() if self.gate else common_pb2.QualityGate())


@dataclass(frozen=True, slots=True, kw_only=True)
class Resources:
    """What the job holds of the cluster while it runs; it waits in the coordinator's queue until that is free.

    `gpus` solver replicas (one GPU each on a GPU cluster) its solves fan out over; `host_memory_bytes` of
    calibrator memory (None: estimated from the model and calibration set); `node_label` pins its solves
    to replicas whose node has it (a Ray label "key=value", a resource such as "accelerator_type:H100").
    """

    gpus: int = 1
    host_memory_bytes: int | None = None
    node_label: str | None = None

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ConfigError(f"a job needs at least one GPU (solver replica), got gpus={self.gpus}")
        if self.host_memory_bytes is not None and self.host_memory_bytes < 1:
            raise ConfigError(f"host_memory_bytes must be positive, got {self.host_memory_bytes}")
        if self.node_label == "":
            raise ConfigError("node_label must be None or non-empty")

    def to_proto(self) -> job_pb2.JobResources:
        from bitsmith.v1 import job_pb2

        return job_pb2.JobResources(gpus=self.gpus, host_memory_bytes=self.host_memory_bytes or 0,
                                    node_label=self.node_label or "")


def gptq_checkpoint(recipe: Recipe, requested: CheckpointFormat | str) -> tuple[Recipe, CheckpointFormat]:
    """The GPTQ checkpoint variant, and the recipe with every asymmetric grid kept off zero 0 for v1.

    v1 loads everywhere for symmetric grids; asymmetric ones go to v2 (true zeros), which GPTQModel and
    transformers require for them. A forced v1 asymmetric file keeps its zeros >= 1 (v1 stores zero - 1),
    so the solver, not the packer, pays for the constraint.
    """
    requested = _enum(CheckpointFormat, requested, "checkpoint_format")
    schemes = [recipe.scheme, *(o.scheme for o in recipe.overrides if isinstance(o.scheme, QuantScheme))]
    if requested is CheckpointFormat.AUTO:
        requested = CheckpointFormat.GPTQ if all(s.sym for s in schemes) else CheckpointFormat.GPTQ_V2
    if requested is not CheckpointFormat.GPTQ:
        return recipe, requested

    def v1(scheme: QuantScheme) -> QuantScheme:
        return scheme if scheme.sym else replace(scheme, min_zero=max(scheme.min_zero, 1))

    overrides = tuple(replace(o, scheme=v1(o.scheme)) if isinstance(o.scheme, QuantScheme) else o
                      for o in recipe.overrides)
    return replace(recipe, scheme=v1(recipe.scheme), overrides=overrides), requested


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantizeRequest:
    """A whole job: the checkpoint, the recipe, the calibration, the artifacts to write and how to score them.

    `request_id` makes submission idempotent: resubmitting it returns the job it first made.
    """

    model: StrPath
    out: StrPath
    recipe: Recipe = field(default_factory=Recipe)
    calibration: Calibration | None = None
    formats: Sequence[OutputFormat] = (OutputFormat(format=Format.GPTQ),)
    evaluation: Evaluation | None = None
    request_id: str | None = None
    checkpoint_format: CheckpointFormat | str = CheckpointFormat.AUTO
    resources: Resources = field(default_factory=Resources)

    def __post_init__(self) -> None:
        (model,) = _absolute([self.model], "model")
        (out,) = _absolute([self.out], "out")
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "out", out)
        object.__setattr__(self, "formats", tuple(self.formats))
        object.__setattr__(self, "checkpoint_format",
                           _enum(CheckpointFormat, self.checkpoint_format, "checkpoint_format"))
        if not isinstance(self.recipe, Recipe):
            raise ConfigError(f"recipe must be a bitsmith.recipes.Recipe, got {type(self.recipe).__name__}")
        if not self.formats:
            raise ConfigError("a job needs at least one output format")
        if bad := [f for f in self.formats if not isinstance(f, OutputFormat)]:
            raise ConfigError(f"formats must be OutputFormat values (OutputFormat.parse for text), got {bad!r}")
        if len(set(self.formats)) != len(self.formats):
            raise ConfigError(f"output formats repeat: {[str(f) for f in self.formats]}")
        if self.request_id == "":
            raise ConfigError("request_id must be None or non-empty")
        calibrated = self.recipe.calibration_needs
        if calibrated and (self.calibration is None or not self.calibration.files):
            raise ConfigError(f"the recipe's {' and '.join(calibrated)} needs calibration text files; none were given")

    def to_proto(self) -> job_pb2.QuantizeJob:
        """The wire message; for GPTQ output the recipe is first fitted to its checkpoint layout."""
        from bitsmith.rpc.convert import format_to_proto, recipe_to_proto
        from bitsmith.v1 import common_pb2, job_pb2

        recipe, variant = self.recipe, None
        if any(f.format is Format.GPTQ for f in self.formats):
            recipe, variant = gptq_checkpoint(self.recipe, self.checkpoint_format)
        return job_pb2.QuantizeJob(
            model_path=str(self.model),
            recipe=recipe_to_proto(recipe),
            calibration=self.calibration.to_proto() if self.calibration else common_pb2.CalibrationSpec(),
            output=common_pb2.OutputSpec(path=str(self.out), formats=[
                common_pb2.OutputFormat(format=format_to_proto(Format(f.format)),
                                        variant=(variant.value if f.format is Format.GPTQ and variant
                                                 else f.variant or ""))
                for f in self.formats
            ]),
            eval=self.evaluation.to_proto() if self.evaluation else common_pb2.EvalSpec(),
            client_request_id=self.request_id or "",
            resources=self.resources.to_proto(),
        )
