"""The Python SDK against a real stack: typed requests in, typed jobs, events and artifacts out."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from bitsmith.demo import CALIB_FILES, DEMO_MODEL, EVAL_FILES
from bitsmith.errors import ConfigError, ServiceUnavailableError
from bitsmith.manifest import verify_manifest
from bitsmith.recipes import ModuleOverride, Recipe
from bitsmith.rpc import (
    Artifact,
    Calibration,
    Client,
    EvalResult,
    Evaluation,
    Format,
    JobFailedError,
    JobState,
    OutputFormat,
    ProgressEvent,
    QualityGate,
    QuantizeRequest,
)
from bitsmith.rpc.discovery import write_stack_file
from bitsmith.rpc.request import CheckpointFormat, gptq_checkpoint
from bitsmith.schemes import Method, QuantScheme

from .conftest import Stack, make_request

SMALL = Calibration(files=CALIB_FILES, samples=8, seq_len=128)


def test_quantize_watch_wait_and_typed_artifacts(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "gptq"
    job = stack.client.quantize(DEMO_MODEL, out=out, calibration=SMALL, formats=["gptq"],
                                evaluation=Evaluation(files=[EVAL_FILES[1]], seq_len=256))
    assert job.state in (JobState.QUEUED, JobState.RUNNING)

    events = list(job.watch())
    assert all(isinstance(e, ProgressEvent) for e in events)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1)), "every event, once, in order"
    assert events[0].phase == "queued" and events[-1].phase == "done"
    assert events[-1].state is JobState.SUCCEEDED and events[-1].step == events[-1].total_steps > 0
    solves = [e for e in events if e.phase == "solve"]
    assert {e.block for e in solves} == {0, 1, 2, 3} and all(e.num_blocks == 4 for e in solves)
    assert events[0].block is None
    times = [e.time for e in events]
    assert all(t is not None and t.tzinfo is UTC for t in times) and times == sorted(times)
    assert job.state is JobState.SUCCEEDED, "watch refreshes the job once the stream ends"

    done = job.wait()
    assert done is job and job.error is None and job.trace_id
    assert job.finished_at is not None and job.finished_at <= datetime.now(UTC)
    (artifact,) = job.artifacts
    assert isinstance(artifact, Artifact) and artifact.format is Format.GPTQ and artifact.variant == "gptq_v2"
    assert artifact.path == out and artifact.sha256 == verify_manifest(out).digest and artifact.bytes > 0
    assert artifact.bits_per_weight is None or 4 < artifact.bits_per_weight < 5
    (metric,) = artifact.metrics
    assert isinstance(metric, EvalResult) and metric.dataset == str(EVAL_FILES[1])
    assert metric.reference_ppl is not None and metric.ppl > metric.reference_ppl > 1
    assert metric.kl is not None and 0 < metric.kl < 0.5 and metric.top1 is not None and 0.5 < metric.top1 <= 1
    assert job.metrics == artifact.metrics
    assert job.model == DEMO_MODEL and job.progress is not None and job.progress.phase == "done"

    again = stack.client.job(job.id)
    assert again.state is JobState.SUCCEEDED and again.artifacts == job.artifacts
    assert job.id in {j.id for j in stack.client.jobs(states=["succeeded"])}
    assert job.id not in {j.id for j in stack.client.jobs(states=[JobState.FAILED, JobState.CANCELLED])}


def test_recipe_from_a_yaml_file_with_overrides_and_two_formats(stack: Stack, tmp_path: Path) -> None:
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("method: rtn\nscheme: {bits: 4, group_size: 64, sym: true}\n"
                           "overrides:\n  - {pattern: 'self_attn\\.', bits: 8}\n"
                           "  - {pattern: 'layers\\.0\\.mlp\\.down_proj', skip: true}\n")
    job = stack.client.quantize(str(DEMO_MODEL), out=tmp_path / "out", recipe=recipe_file,
                                formats=["gptq", OutputFormat(format="gguf", variant="Q8_0")])
    job.wait()
    by_format = {a.format: a for a in job.artifacts}
    assert by_format[Format.GPTQ].variant == "gptq", "a symmetric recipe writes v1 GPTQ"
    assert by_format[Format.GGUF].variant == "Q8_0" and by_format[Format.GGUF].path == tmp_path / "out" / "gguf-Q8_0"
    from bitsmith.formats import get_format

    bits = {name: w.scheme.bits for name, w in get_format(Format.GPTQ).read(by_format[Format.GPTQ].path
                                                                            ).quantized.items()}
    assert bits["model.layers.1.self_attn.q_proj"] == 8 and bits["model.layers.1.mlp.up_proj"] == 4
    assert "model.layers.0.mlp.down_proj" not in bits


def test_a_failed_job_raises_on_wait_with_the_servers_reason(stack: Stack, tmp_path: Path) -> None:
    job = stack.client.submit(make_request(tmp_path / "gated", method=Method.RTN, evaluate=True,
                                           gate=QualityGate(max_kl=1e-9)))
    with pytest.raises(JobFailedError, match=r"failed: .*quality gate failed.*KL") as info:
        job.wait()
    assert info.value.job is job and job.state is JobState.FAILED
    assert job.wait(check=False).state is JobState.FAILED
    assert not (tmp_path / "gated").exists()


def test_cancel_a_queued_and_a_running_job(stack: Stack, tmp_path: Path) -> None:
    """One job runs at a time on this stack, so the second waits in the queue behind the first."""
    running = stack.client.submit(make_request(tmp_path / "running", samples=32, seq_len=256))
    queued = stack.client.submit(make_request(tmp_path / "queued", method=Method.RTN, calibrate=False))
    assert queued.state is JobState.QUEUED
    with pytest.raises(TimeoutError, match=f"job {running.id} did not end within"):
        running.wait(timeout=0.2)

    assert queued.cancel() is queued and queued.state is JobState.CANCELLED
    for event in running.watch():
        if event.phase == "solve":
            running.cancel()
            break
    with pytest.raises(JobFailedError, match=f"job {running.id} cancelled"):
        running.wait(timeout=120)
    assert running.state is JobState.CANCELLED
    assert queued.wait(check=False).state is JobState.CANCELLED
    assert not (tmp_path / "running").exists() and not (tmp_path / "queued").exists()
    assert {running.id, queued.id} <= {j.id for j in stack.client.jobs(states=["cancelled"])}


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda out: Calibration(files=CALIB_FILES, samples=0), "calibration samples must be positive, got 0"),
        (lambda out: Calibration(files=str(CALIB_FILES[0])), "takes a list of files"),
        (lambda out: Calibration(files=CALIB_FILES, mode="random"), "calibration mode must be one of"),
        (lambda out: OutputFormat.parse("onnx:Q4_K_M"), "onnx takes no variant 'Q4_K_M'"),
        (lambda out: OutputFormat.parse("safetensors"), "an output format must be one of"),
        (lambda out: QualityGate(min_top1=1.5), "min_top1 must be in [0, 1]"),
        (lambda out: Evaluation(files=[]), "evaluation needs at least one file"),
        (lambda out: QuantizeRequest(model=DEMO_MODEL, out=out), "the recipe's gptq needs calibration text files"),
        (lambda out: QuantizeRequest(model=DEMO_MODEL, out=out, calibration=SMALL, formats=()),
         "at least one output format"),
        (lambda out: QuantizeRequest(model=DEMO_MODEL, out=out, calibration=SMALL,
                                     formats=(OutputFormat(format="gptq"),) * 2), "output formats repeat"),
        (lambda out: QuantizeRequest(model=DEMO_MODEL, out=out, calibration=SMALL, checkpoint_format="v3"),
         "checkpoint_format must be one of"),
    ],
    ids=["samples", "single-path", "mode", "variant", "format", "gate", "no-eval-files", "no-calibration",
         "no-format", "repeated-format", "checkpoint-format"],
)
def test_bad_requests_are_refused_on_construction_before_any_rpc(stack: Stack, tmp_path: Path, build,
                                                                    needle: str) -> None:
    before = len(stack.client.jobs(limit=1000))
    with pytest.raises(ConfigError) as info:
        build(tmp_path / "out")
    assert needle in str(info.value)
    assert len(stack.client.jobs(limit=1000)) == before and not (tmp_path / "out").exists()


def test_quantize_refuses_a_bad_format_string_before_any_rpc(stack: Stack, tmp_path: Path) -> None:
    before = len(stack.client.jobs(limit=1000))
    with pytest.raises(ConfigError, match="gptq takes no variant 'Q4_K_M'"):
        stack.client.quantize(DEMO_MODEL, out=tmp_path / "o", calibration=SMALL, formats=["gptq", "gptq:Q4_K_M"])
    assert len(stack.client.jobs(limit=1000)) == before


def test_request_paths_are_absolute_and_the_proto_is_built_in_one_place(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    request = QuantizeRequest(model="model", out="out", recipe=Recipe(method=Method.RTN),
                              formats=(OutputFormat.parse("gguf:Q4_K_M"), OutputFormat.parse("onnx")),
                              evaluation=Evaluation(files=["eval.txt"], gate=QualityGate(max_kl=0.1)))
    spec = request.to_proto()
    assert spec.model_path == str(tmp_path / "model") and spec.output.path == str(tmp_path / "out")
    assert list(spec.eval.files) == [str(tmp_path / "eval.txt")]
    assert spec.eval.gate.HasField("max_kl") and not spec.eval.gate.HasField("min_top1")
    assert [(f.variant) for f in spec.output.formats] == ["Q4_K_M", ""]
    assert not spec.calibration.files and not spec.calibration.HasField("holdout_samples")
    assert Calibration(files=["c.txt"], holdout_samples=0).to_proto().HasField("holdout_samples")


def test_gptq_checkpoint_layout_follows_the_grids() -> None:
    asym = Recipe(scheme=QuantScheme(bits=4), overrides=(
        ModuleOverride(pattern="down_proj", scheme=QuantScheme(bits=8, group_size=64)),))
    sym = Recipe(scheme=QuantScheme(bits=4, sym=True))
    assert gptq_checkpoint(asym, "auto") == (asym, CheckpointFormat.GPTQ_V2)
    assert gptq_checkpoint(sym, "auto") == (sym, CheckpointFormat.GPTQ)
    v1, variant = gptq_checkpoint(asym, "gptq")
    assert variant is CheckpointFormat.GPTQ and v1.scheme.min_zero == 1
    assert isinstance(v1.overrides[0].scheme, QuantScheme) and v1.overrides[0].scheme.min_zero == 1
    # Only a GPTQ artifact takes the constraint: other formats store true zeros.
    onnx_only = QuantizeRequest(model="m", out="o", recipe=asym, calibration=SMALL,
                                formats=(OutputFormat(format="onnx"),), checkpoint_format="gptq")
    assert onnx_only.to_proto().recipe.scheme.min_zero == 0


def test_client_finds_the_running_stack_through_its_home(stack: Stack, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITSMITH_HOME", str(tmp_path))
    write_stack_file(tmp_path, stack.address)  # as `bitsmith up`'s process does, naming a live pid (ours)
    with Client() as client:
        assert client.address == stack.address
        assert isinstance(client.jobs(limit=1), list)


def test_client_without_a_running_stack_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITSMITH_HOME", str(tmp_path / "home"))
    with pytest.raises(ServiceUnavailableError, match=rf"no bitsmith stack is running in {tmp_path / 'home'}"):
        Client()


def test_the_cli_goes_through_the_sdk(stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """quantize / jobs / report keep their flags and `--json` shapes on top of the SDK."""
    from bitsmith_services.cli import main

    def run(*argv: str) -> str:
        capsys.readouterr()
        assert main([*argv, "--server", stack.address]) == 0
        return capsys.readouterr().out.strip().splitlines()[-1]

    out = tmp_path / "rtn"
    result = json.loads(run("quantize", str(DEMO_MODEL), "--method", "rtn", "--sym", "--out", str(out), "--json"))
    assert result.keys() == {"job_id", "state", "artifacts", "metrics", "trace_id", "error"}
    assert result["state"] == "succeeded" and result["error"] == "" and result["metrics"] == {}
    manifest = verify_manifest(out)
    assert result["artifacts"] == [{"format": "gptq", "variant": "gptq", "path": str(out), "sha256": manifest.digest,
                                    "bytes": sum(f.bytes for f in manifest.files),
                                    "bits_per_weight": 4.0 + 16 / 128, "metrics": {}}]
    assert json.loads(run("jobs", "show", result["job_id"], "--json")) == result
    assert result in json.loads(run("jobs", "list", "--json"))

    monkeypatch.chdir(tmp_path)
    report = Path(run("report", result["job_id"]))
    assert report == tmp_path / f"{result['job_id']}-report.html"
    assert result["job_id"] in report.read_text()
    assert Path(run("report", result["job_id"], "--out", str(tmp_path / "r.html"))) == tmp_path / "r.html"

    calibrated = json.loads(run("quantize", str(DEMO_MODEL), "--method", "gptq", "--samples", "8", "--seq-len", "64",
                                *(a for f in CALIB_FILES for a in ("--calib", str(f))), "--holdout-samples", "3",
                                "--out", str(tmp_path / "gptq"), "--json"))
    blocks = stack.client.job(calibrated["job_id"]).diagnostics.blocks
    assert [b.samples for b in blocks] == [3] * 4 and all(0 < b.output_error < 1 for b in blocks)
