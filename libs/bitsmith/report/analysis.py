"""Numbers the report derives from a job's diagnostics: pure functions, no drawing.

Layer errors are put on one scale by dividing tr(ΔW·H·ΔWᵀ) by tr(W·H·Wᵀ): the fraction of the
layer's calibration output energy the quantization lost. A 4096x14336 down_proj and a 1024x4096
k_proj then compare directly, which is what "which layers lost the most" needs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from bitsmith.v1 import common_pb2


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerError:
    """One solved linear on the relative scale."""

    name: str
    block: int
    grid: str
    bits_per_weight: float
    relative: float
    """tr(ΔW·H·ΔWᵀ) / tr(W·H·Wᵀ) of the result."""
    rtn_relative: float
    """The same for round-to-nearest on the same grid."""
    outlier: bool = False

    @property
    def gain(self) -> float:
        """How many times less error than round-to-nearest (1.0: none; inf: exact)."""
        return self.rtn_relative / self.relative if self.relative > 0 else math.inf


def target_label(target: str, artifacts: Sequence[str]) -> str:
    """How the report names a solve target: a GGUF mix by its key (``gguf:Q4_K_M``), the integer grid
    that every other format shares by those formats' names."""
    if target:
        return target
    return ", ".join(name for name in artifacts if not name.startswith("gguf")) or "integer grid"


def layer_errors(layers: Sequence[common_pb2.LayerDiagnostics], artifacts: Sequence[str] = ()
                 ) -> dict[str, list[LayerError]]:
    """Per target (in first-seen order, labelled by `target_label` with the job's artifact names),
    its layers on the relative scale with outliers flagged.

    Layers solved without a Hessian (no calibration: nothing to weigh errors by) are left out.
    """
    by_target: dict[str, list[LayerError]] = {}
    for layer in layers:
        if layer.weight_energy <= 0:
            continue
        by_target.setdefault(target_label(layer.target, artifacts), []).append(LayerError(
            name=layer.name, block=layer.block, grid=layer.grid, bits_per_weight=layer.bits_per_weight,
            relative=layer.error / layer.weight_energy, rtn_relative=layer.rtn_error / layer.weight_energy,
        ))
    return {target: flag_outliers(errors) for target, errors in by_target.items()}


def flag_outliers(errors: Sequence[LayerError]) -> list[LayerError]:
    """Flag layers whose relative error lies above Tukey's upper fence (Q3 + 1.5·IQR) on a log scale.

    Errors span orders of magnitude across layer kinds, so the fence is drawn on their logarithms; a
    flagged layer is where more bits (or another method) would buy the most — mixed precision's seed.
    Fewer than four layers give no quartiles, and nothing is flagged.
    """
    logs = [math.log10(e.relative) for e in errors if e.relative > 0]
    if len(logs) < 4:
        return list(errors)
    q1, _, q3 = statistics.quantiles(logs, n=4, method="inclusive")
    fence = q3 + 1.5 * (q3 - q1)
    return [LayerError(name=e.name, block=e.block, grid=e.grid, bits_per_weight=e.bits_per_weight,
                       relative=e.relative, rtn_relative=e.rtn_relative,
                       outlier=e.relative > 0 and math.log10(e.relative) > fence) for e in errors]


def ppl_increase_pct(result: common_pb2.EvalResult) -> float | None:
    """Perplexity increase over the reference in percent (None without a reference)."""
    if not result.HasField("reference_ppl") or result.reference_ppl <= 0:
        return None
    return 100.0 * (result.ppl / result.reference_ppl - 1.0)


def phase_shares(phases: Sequence[common_pb2.PhaseTime]) -> list[tuple[common_pb2.PhaseTime, float]]:
    """Phases by descending time with each one's share of the total (0..1)."""
    total = sum(p.seconds for p in phases) or 1.0
    return [(p, p.seconds / total) for p in sorted(phases, key=lambda p: -p.seconds)]
