"""Rendering a report to HTML."""

from __future__ import annotations

import html

from bitsmith.report.data import ReportData


def render_report(data: ReportData) -> str:
    return f"<!doctype html><html><body><h1>job {html.escape(data.job.job_id)}</h1></body></html>"
