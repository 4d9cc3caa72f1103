"""The report page: the template filled with tables and inline SVG charts.

Jinja2 escapes everything the job's inputs could put on the page (module names, paths, error
messages); only the SVG that `charts` drew from numbers is inserted as markup.
"""

from __future__ import annotations

from pathlib import PurePath

import jinja2
import yaml

import bitsmith
from bitsmith.report.analysis import layer_errors, phase_shares, ppl_increase_pct
from bitsmith.report.charts import block_error_chart, layer_error_chart, size_quality_chart, timeline_chart
from bitsmith.report.data import ReportData

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("bitsmith.report", "templates"),
    autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
)
_ENV.filters["basename"] = lambda path: PurePath(path).name
_ENV.filters["gib"] = lambda n: f"{n / 2**30:.2f} GiB"


def render_report(data: ReportData) -> str:
    """One self-contained HTML page: no script, no external resource."""
    diagnostics = data.diagnostics
    layers = layer_errors(diagnostics.layers, [a.name for a in data.artifacts])
    return _ENV.get_template("report.html.j2").render(
        version=bitsmith.__version__,
        data=data,
        diagnostics=diagnostics,
        increase=ppl_increase_pct,
        size_quality=size_quality_chart(data.artifacts) if any(a.metrics for a in data.artifacts) else "",
        layer_charts=list(layers.items()),
        charts={target: layer_error_chart(target, errors) for target, errors in layers.items()},
        block_chart=block_error_chart(diagnostics.blocks) if diagnostics.blocks else "",
        timeline_chart=timeline_chart(diagnostics.timeline) if diagnostics.timeline else "",
        phases=phase_shares(diagnostics.phases),
        recipe_yaml=yaml.safe_dump(data.recipe, sort_keys=False) if data.recipe else "(not recorded)",
    )
