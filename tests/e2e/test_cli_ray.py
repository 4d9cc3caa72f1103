"""The README's path for real: `bitsmith quantize` in a fresh process starts a local Ray, runs the
services as Ray actors, quantizes the demo model, and one trace follows the job across them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bitsmith.demo import CALIB_FILES, DEMO_MODEL, EVAL_FILES
from bitsmith.manifest import verify_manifest
from bitsmith.telemetry import TRACE_FILE_ENV, read_spans


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bitsmith_services.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, check=False)


@pytest.mark.slow
def test_quantize_on_ray_writes_artifact_and_one_trace_spans_the_services(tmp_path: Path) -> None:
    trace_file = tmp_path / "spans.jsonl"
    out = tmp_path / "artifact"
    proc = run_cli(
        "quantize", str(DEMO_MODEL), "--method", "gptq", "--bits", "4", "--group-size", "128",
        "--calib", str(CALIB_FILES[0]), "--calib", str(CALIB_FILES[1]), "--samples", "16", "--seq-len", "256",
        "--format", "gptq", "--out", str(out), "--eval", str(EVAL_FILES[1]), "--json",
        env={TRACE_FILE_ENV: str(trace_file), "BITSMITH_HOME": str(tmp_path / "home")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["state"] == "succeeded"
    (artifact,) = result["artifacts"]
    assert artifact["format"] == "gptq" and artifact["path"] == str(out)
    assert artifact["sha256"] == verify_manifest(out).digest
    assert result["metrics"][str(EVAL_FILES[1])]["ppl"] > 1

    spans = [s for s in read_spans(str(trace_file)) if s["trace_id"] == result["trace_id"]]
    services = {s["service"] for s in spans}
    assert {"bitsmith-coordinator", "bitsmith-calibrator", "bitsmith-solver", "bitsmith-packer",
            "bitsmith-runtime_cpu"} <= services
    coordinator_pids = {s["pid"] for s in spans if s["service"] == "bitsmith-coordinator"}
    worker_pids = {s["pid"] for s in spans if s["service"] != "bitsmith-coordinator"}
    assert coordinator_pids.isdisjoint(worker_pids), "workers run in Ray actor processes"
    (root,) = [s for s in spans if s["name"] == "job"]
    assert all(s["parent_id"] for s in spans if s is not root)


@pytest.mark.slow
def test_eval_cli_reports_ppl_kl_top1_of_the_unquantized_model(tmp_path: Path) -> None:
    proc = run_cli("eval", str(DEMO_MODEL), "--data", str(EVAL_FILES[1]), "--reference", str(DEMO_MODEL),
                   "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ppl"] == pytest.approx(15.044, rel=1e-3)  # the model README's bf16 number
    assert result["kl"] == pytest.approx(0.0, abs=1e-6) and result["top1"] == 1.0
    assert result["tokens"] == 58_957


def test_quantize_against_an_unreachable_server_fails_clearly(tmp_path: Path) -> None:
    proc = run_cli("quantize", str(DEMO_MODEL), "--method", "rtn", "--out", str(tmp_path / "o"),
                   "--server", "127.0.0.1:9", timeout=120)
    assert proc.returncode == 2
    assert "cannot reach a bitsmith service at 127.0.0.1:9" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_worker_options_are_refused_for_a_stack_already_running(tmp_path: Path) -> None:
    proc = run_cli("quantize", str(DEMO_MODEL), "--method", "rtn", "--out", str(tmp_path / "o"),
                   "--server", "127.0.0.1:9", "--activations", "host", timeout=120)
    assert proc.returncode == 2
    assert "computes as it was started" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_the_embedded_stack_computes_as_its_options_say(tmp_path: Path) -> None:
    """`--matmul-precision bfloat16 --activations host` reach the calibrator the embedded stack starts on Ray:
    the same job, calibrated in bfloat16, writes another artifact than at the defaults."""
    digests = []
    for name, options in (("default", ()), ("bfloat16", ("--matmul-precision", "bfloat16", "--activations", "host"))):
        out = tmp_path / name
        proc = run_cli("quantize", str(DEMO_MODEL), "--method", "gptq", "--calib", str(CALIB_FILES[0]),
                       "--samples", "8", "--seq-len", "128", "--format", "gptq", "--out", str(out), *options,
                       env={"BITSMITH_HOME": str(tmp_path / "home")})
        assert proc.returncode == 0, proc.stderr[-3000:]
        digests.append(verify_manifest(out).digest)
    assert digests[0] != digests[1]
