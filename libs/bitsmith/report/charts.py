"""The report's charts, drawn with matplotlib into static SVG that the page inlines.

Static SVG needs no script and no network at view time, survives being mailed or attached to a
ticket, and prints. Each drawn element a reader (or a test) may look for carries an id through
matplotlib's `gid`: ``layer:<target>:<name>`` for a solved layer's bar, ``rtn:<target>:<name>`` for
round-to-nearest's, ``block:<i>``, ``artifact:<name>:<dataset>`` and ``lane:<service>:<phase>``.
Figures are built without pyplot (no global state, safe in a server's threads).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec

import matplotlib as mpl
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bitsmith.report.analysis import LayerError, ppl_increase_pct
from bitsmith.report.data import ArtifactSummary
from bitsmith.v1 import common_pb2

SOLVED, RTN, OUTLIER = "#3465a4", "#c0c4c8", "#cc3333"
PHASE_COLORS = {"plan": "#888a85", "calibrate": "#4e9a06", "scale": "#8ae234", "solve": "#3465a4",
                "pack": "#f57900", "evaluate": "#75507b", "publish": "#c17d11"}
P = ParamSpec("P")
_SVG_RC: dict[str, Any] = {"svg.fonttype": "none", "svg.hashsalt": "bitsmith-report", "font.size": 9}


def _svg_chart(draw: Callable[P, Figure]) -> Callable[P, str]:
    """`draw` run under the report's rcParams, its figure returned as an inline <svg> element (no XML
    prolog, text kept as text, ids stable from run to run)."""

    def chart(*args: P.args, **kwargs: P.kwargs) -> str:
        buffer = io.StringIO()
        with mpl.rc_context(_SVG_RC):  # type: ignore[arg-type]  # keys are rcParams names
            draw(*args, **kwargs).savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
        text = buffer.getvalue()
        return text[text.index("<svg"):]

    chart.__name__, chart.__doc__ = draw.__name__, draw.__doc__
    return chart


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


@_svg_chart
def layer_error_chart(target: str, errors: Sequence[LayerError]) -> Figure:
    """Relative error of every layer after the solve beside round-to-nearest's, on a log scale;
    outliers in red. Ticks mark where each block starts."""
    fig = _figure(min(24.0, max(8.0, 0.12 * len(errors))), 3.6)
    ax = fig.add_subplot()
    positions = range(len(errors))
    rtn = ax.bar([p - 0.2 for p in positions], [e.rtn_relative for e in errors], width=0.4, color=RTN,
                 label="round to nearest")
    solved = ax.bar([p + 0.2 for p in positions], [e.relative for e in errors], width=0.4,
                    color=[OUTLIER if e.outlier else SOLVED for e in errors], label="this job")
    for error, bar, base in zip(errors, solved, rtn, strict=True):
        bar.set_gid(f"layer:{target}:{error.name}")
        base.set_gid(f"rtn:{target}:{error.name}")
    starts = [i for i, e in enumerate(errors) if i == 0 or e.block != errors[i - 1].block]
    ax.set_xticks(starts, [str(errors[i].block) for i in starts])
    ax.set_xlim(-1, len(errors))
    ax.set_yscale("log")
    ax.set_xlabel("decoder block (bars: its linears in order)")
    ax.set_ylabel("tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)")
    ax.set_title(f"per-layer error, {target}")
    ax.legend(handles=[rtn, solved], loc="upper left", fontsize=8)
    return fig


@_svg_chart
def block_error_chart(blocks: Sequence[common_pb2.BlockDiagnostics]) -> Figure:
    """Each block's output error on held-out samples, relative to what the block adds."""
    fig = _figure(min(24.0, max(6.0, 0.25 * len(blocks))), 2.8)
    ax = fig.add_subplot()
    bars = ax.bar([b.block for b in blocks], [b.output_error for b in blocks], color=SOLVED)
    for block, bar in zip(blocks, bars, strict=True):
        bar.set_gid(f"block:{block.block}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder block")
    ax.set_ylabel("‖Yq - Y‖ / ‖Y - X‖")
    ax.set_title("block output error on held-out calibration samples")
    return fig


@_svg_chart
def size_quality_chart(artifacts: Sequence[ArtifactSummary]) -> Figure:
    """Bits per weight against quality loss: KL where measured, else the perplexity increase."""
    points = [(a, r) for a in artifacts for r in a.metrics]
    use_kl = all(r.HasField("kl") for _, r in points)
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot()
    markers: dict[str, str] = {}
    for artifact, result in points:
        dataset = Path(result.dataset).name
        marker = markers.setdefault(dataset, "osD^v<>"[len(markers) % 7])
        y = result.kl if use_kl else ppl_increase_pct(result)
        if y is None:
            continue
        (line,) = ax.plot([artifact.bits_per_weight], [y], marker=marker, linestyle="none", markersize=7,
                          color=SOLVED, label=dataset)
        line.set_gid(f"artifact:{artifact.name}:{dataset}")
        ax.annotate(artifact.name, (artifact.bits_per_weight, y), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xlabel("bits per weight (quantized linears)")
    ax.set_ylabel("KL to the unquantized model" if use_kl else "perplexity increase, %")
    ax.set_title("size and quality of each artifact")
    return fig


@_svg_chart
def timeline_chart(timeline: Sequence[common_pb2.TimelineSpan]) -> Figure:
    """The job's calls per service over time, colored by phase (a Gantt chart of the trace)."""
    services = list(dict.fromkeys(span.service for span in timeline))
    fig = _figure(10.0, 1.2 + 0.45 * len(services))
    ax = fig.add_subplot()
    for lane, service in enumerate(services):
        by_phase: dict[str, list[tuple[float, float]]] = {}
        for span in timeline:
            if span.service == service:
                by_phase.setdefault(span.phase, []).append((span.start_s, max(span.duration_s, 1e-3)))
        for phase, ranges in by_phase.items():
            bars = ax.broken_barh(ranges, (lane - 0.35, 0.7), color=PHASE_COLORS.get(phase, "#555753"), label=phase)
            bars.set_gid(f"lane:{service}:{phase}")
    ax.set_yticks(range(len(services)), services)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the job started")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("timeline by service and phase")
    return fig
