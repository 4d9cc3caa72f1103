"""The job report: one self-contained HTML page per job or artifact (static SVG charts, no network).

`ReportData` gathers what a report shows from a finished job (`from_job`) or from an artifact
directory's manifest (`from_artifact_dir`); `render_report` turns it into the page.
"""

from bitsmith.report.data import ReportData
from bitsmith.report.render import render_report

__all__ = ["ReportData", "render_report"]
