"""The job report: its numbers (relative errors, outliers) and the page (charts by id, escaping, no network)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bitsmith.errors import FormatError
from bitsmith.formats.base import write_file_atomic
from bitsmith.manifest import update_manifest, write_manifest
from bitsmith.report import ReportData, render_report
from bitsmith.report.analysis import LayerError, flag_outliers, layer_errors, target_label
from bitsmith.schemes import Format
from bitsmith.v1 import common_pb2, job_pb2
from google.protobuf.json_format import MessageToDict

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj")


def _layer(block: int, local: str, relative: float, *, target: str = "", energy: float = 100.0
           ) -> common_pb2.LayerDiagnostics:
    return common_pb2.LayerDiagnostics(
        name=f"model.layers.{block}.{local}", block=block, target=target, method=common_pb2.METHOD_GPTQ,
        grid="w4 g128 asym", bits_per_weight=4.15625, parameters=65536, error=relative * energy,
        rtn_error=2 * relative * energy, weight_energy=energy, damp_percent=0.01,
    )


def _diagnostics(blocks: int = 3) -> common_pb2.JobDiagnostics:
    layers = [_layer(b, n, 1e-3 * (1 + b + i)) for b in range(blocks) for i, n in enumerate(LINEARS)]
    layers += [_layer(b, n, 5e-4, target="gguf:Q4_K_M") for b in range(blocks) for n in LINEARS]
    timeline = [common_pb2.TimelineSpan(name="Collect", service="calibrator", phase="calibrate", block=0,
                                        start_s=0.0, duration_s=1.0),
                common_pb2.TimelineSpan(name="Solve", service="solver", phase="solve", block=0, start_s=1.0,
                                        duration_s=2.0),
                common_pb2.TimelineSpan(name="Evaluate", service="runtime_cpu", phase="evaluate", start_s=3.0,
                                        duration_s=4.0)]
    return common_pb2.JobDiagnostics(
        layers=layers,
        blocks=[common_pb2.BlockDiagnostics(block=b, output_error=0.1 + 0.01 * b, samples=4) for b in range(blocks)],
        phases=[common_pb2.PhaseTime(phase="calibrate", seconds=1.0, calls=1),
                common_pb2.PhaseTime(phase="solve", seconds=2.0, calls=1),
                common_pb2.PhaseTime(phase="evaluate", seconds=4.0, calls=1)],
        timeline=timeline,
        services=[common_pb2.ServiceUsage(service="solver", busy_s=2.0,
                                          usage=common_pb2.ResourceUsage(device="cpu", peak_host_bytes=1 << 30))],
        wall_s=7.5, trace_id="ab" * 16,
    )


def _job(diagnostics: common_pb2.JobDiagnostics) -> job_pb2.Job:
    result = common_pb2.EvalResult(dataset="data/eval-prose.txt", ppl=20.5, tokens=1000, kl=0.02, top1=0.91,
                                   reference_ppl=20.0)
    return job_pb2.Job(
        job_id="0123456789abcdef", state=common_pb2.JOB_STATE_SUCCEEDED,
        spec=job_pb2.QuantizeJob(model_path="models/m", recipe=common_pb2.Recipe(
            method=common_pb2.METHOD_GPTQ, scheme=common_pb2.QuantScheme(bits=4, group_size=128))),
        artifacts=[common_pb2.Artifact(format=common_pb2.FORMAT_GPTQ, path="out/gptq", bytes=4_000_000,
                                       bits_per_weight=4.15625, metrics=[result]),
                   common_pb2.Artifact(format=common_pb2.FORMAT_GGUF, variant="Q4_K_M", path="out/gguf",
                                       bytes=2_900_000, bits_per_weight=4.8, metrics=[result])],
        diagnostics=diagnostics,
    )


def _errors(relatives: list[float]) -> list[LayerError]:
    return [LayerError(name=f"l{i}", block=i, grid="w4", bits_per_weight=4.0, relative=r, rtn_relative=2 * r)
            for i, r in enumerate(relatives)]


def test_outliers_are_flagged_on_the_log_scale() -> None:
    flagged = flag_outliers(_errors([1e-3, 1.2e-3, 0.9e-3, 1.1e-3, 1e-3, 0.8e-3, 5e-2]))
    assert [e.name for e in flagged if e.outlier] == ["l6"]
    # Spread over decades but without a straggler: nothing stands out.
    assert not any(e.outlier for e in flag_outliers(_errors([1e-4, 1e-3, 1e-2, 1e-1, 3e-3, 3e-2])))
    assert not any(e.outlier for e in flag_outliers(_errors([1e-3, 1e-3, 1.0])))  # too few for quartiles


def test_layer_errors_are_relative_grouped_by_target_and_skip_unweighted_layers() -> None:
    layers = [_layer(0, "a", 2e-3), _layer(0, "b", 1e-3, target="gguf:Q4_K"), _layer(0, "c", 0.0, energy=0.0)]
    grouped = layer_errors(layers, ["gptq", "awq", "gguf:Q4_K"])
    assert list(grouped) == ["gptq, awq", "gguf:Q4_K"]
    (a,) = grouped["gptq, awq"]
    assert a.relative == pytest.approx(2e-3) and a.rtn_relative == pytest.approx(4e-3) and a.gain == pytest.approx(2)
    assert target_label("", []) == "integer grid"


def test_page_has_one_bar_per_layer_and_target_and_every_chart() -> None:
    page = render_report(ReportData.from_job(_job(_diagnostics(blocks=3))))
    assert len(re.findall(r'id="layer:gptq:model\.layers\.\d\.', page)) == 12
    assert len(re.findall(r'id="rtn:gptq:', page)) == 12
    assert len(re.findall(r'id="layer:gguf:Q4_K_M:', page)) == 12
    assert [int(b) for b in re.findall(r'id="block:(\d+)"', page)] == [0, 1, 2]
    assert {"artifact:gptq:eval-prose.txt", "artifact:gguf:Q4_K_M:eval-prose.txt"} <= set(
        re.findall(r'id="(artifact:[^"]+)"', page))
    assert {"lane:calibrator:calibrate", "lane:solver:solve", "lane:runtime_cpu:evaluate"} <= set(
        re.findall(r'id="(lane:[^"]+)"', page))
    for section in ("size-quality-chart", "layer-chart-1", "layer-chart-2", "block-chart", "timeline-chart"):
        assert f'id="{section}"' in page
    assert "+2.50 %" in page and "4.156" in page and "method: METHOD_GPTQ" in page


def test_page_is_self_contained_deterministic_and_escapes_what_the_job_brought() -> None:
    diagnostics = _diagnostics()
    diagnostics.layers[0].name = 'model.layers.0.<script>alert("x")</script>'
    job = _job(diagnostics)
    job.error = "<img src=x onerror=alert(1)>"
    page = render_report(ReportData.from_job(job))
    assert "<script" not in page and "<img" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    # Nothing is fetched when the page is viewed: no script, and no src/href/url() to any address.
    assert not re.search(r'(src|href)\s*=\s*"(?!#)', page) and "url(http" not in page
    assert render_report(ReportData.from_job(job)) == page


def test_a_job_without_calibration_or_artifacts_still_renders() -> None:
    job = job_pb2.Job(job_id="feedfacefeedface", state=common_pb2.JOB_STATE_FAILED, error="ConfigError: no")
    page = render_report(ReportData.from_job(job))
    assert "no H-weighted errors" in page and "wrote no artifact" in page and "No timeline" in page
    assert "ConfigError: no" in page


def test_report_from_an_artifact_directory_reads_its_manifest(tmp_path: Path) -> None:
    write_file_atomic(tmp_path / "model.safetensors", b"\x00" * 64)
    write_manifest(tmp_path, format=Format.GPTQ, recipe={"method": "METHOD_GPTQ"})
    metrics = {"eval.txt": {"dataset": "eval.txt", "ppl": 11.0, "tokens": 10, "reference_ppl": 10.0}}
    update_manifest(tmp_path, metrics=metrics, bits_per_weight=4.15625,
                    diagnostics=MessageToDict(_diagnostics(), preserving_proto_field_name=True))
    data = ReportData.from_artifact_dir(tmp_path)
    assert data.artifacts[0].name == "gptq" and data.artifacts[0].bits_per_weight == 4.15625
    assert data.artifacts[0].metrics[0].ppl == 11.0 and len(data.diagnostics.layers) == 24
    assert len(re.findall(r'id="layer:gptq:', render_report(data))) == 12


def test_malformed_or_missing_manifests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r"no manifest\.json"):
        ReportData.from_artifact_dir(tmp_path)
    write_file_atomic(tmp_path / "model.safetensors", b"\x00")
    write_manifest(tmp_path, format=Format.GPTQ, recipe={})
    update_manifest(tmp_path, metrics={}, diagnostics={"layers": [{"error": "lots"}]})
    with pytest.raises(FormatError, match="diagnostics is malformed"):
        ReportData.from_artifact_dir(tmp_path)
