"""GGUF through llama.cpp in runtime_cpu, over real gRPC: F16 scores and decodes like the torch reference;
the stream joins the tokens that waited for a slow consumer without holding any back; malformed files are
refused before llama.cpp sees them; a file that passes validation but makes llama.cpp abort kills only its
worker, a hung worker is killed after the configured time, and the service answers the next request."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from bitsmith.demo import DEMO_MODEL, EVAL_FILES
from bitsmith.evaluate import tokenize_file
from bitsmith.formats.gguf.runtime import WORKER_TIMEOUT_ENV, GgufCausalLM, WorkerPool
from bitsmith.runtimes import GenerationStats, artifact_format, evaluate_path, generate_greedy
from bitsmith.schemes import Format
from bitsmith.v1 import runtime_pb2, runtime_pb2_grpc
from bitsmith_services.registry import Role, start_service

from tests.unit.gguf_files import write_artifact

pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

PROMPT = "And God said"
CRASH_PROBE = """
import sys, llama_cpp
llama_cpp.Llama(sys.argv[1], n_ctx=64, verbose=False)
"""


@pytest.fixture(scope="module")
def f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bitsmith's F16 GGUF artifact of the demo model (a directory: the file and its manifest)."""
    out = tmp_path_factory.mktemp("gguf") / "f16"
    write_artifact(out)
    return out


def _file(artifact: Path) -> Path:
    (file,) = artifact.glob("*.gguf")
    return file


def _patched(src: Path, dst: Path, field: str, edit: object) -> Path:
    """A copy of `src` with one metadata value changed in place (same bytes, so the layout stays valid)."""
    shutil.copy(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    edit(reader.fields[field])  # type: ignore[operator]
    del reader  # flushes the memory map
    return dst


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "eval-sample.txt"
    path.write_text(EVAL_FILES[0].read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[runtime_pb2_grpc.RuntimeServiceStub]:
    server, port = start_service(Role.RUNTIME_CPU, "127.0.0.1:0", tmp_path_factory.mktemp("store"))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield runtime_pb2_grpc.RuntimeServiceStub(channel)
    channel.close()
    server.stop(grace=1).wait()


def _torch_pieces(max_new_tokens: int) -> list[str]:
    """The reference: each greedy token's text from the torch checkpoint."""
    pieces = list(generate_greedy(DEMO_MODEL, PROMPT, max_new_tokens))
    assert all(isinstance(p, str) for p in pieces)
    return [str(p) for p in pieces]


def _evaluate(stub: runtime_pb2_grpc.RuntimeServiceStub, path: Path, sample: Path,
              reference: Path | None = None) -> runtime_pb2.EvaluateResponse:
    return stub.Evaluate(runtime_pb2.EvaluateRequest(
        artifact_path=str(path), data_files=[str(sample)], seq_len=256,
        reference_model_path=str(reference or "")), timeout=180)


def _still_serves(stub: runtime_pb2_grpc.RuntimeServiceStub, f16: Path, sample: Path) -> None:
    (result,) = _evaluate(stub, f16, sample).results
    assert 5 < result.ppl < 50


def test_recognised_as_gguf(f16: Path) -> None:
    assert artifact_format(f16) is Format.GGUF
    assert artifact_format(_file(f16)) is Format.GGUF


def test_llama_cpp_tokenizes_like_the_checkpoint_tokenizer(f16: Path) -> None:
    """The engine scores llama.cpp's tokens of the file; they must be the reference tokenizer's."""
    engine = GgufCausalLM(f16)
    for file in EVAL_FILES:
        assert engine.tokenize_file(file).tolist() == tokenize_file(DEMO_MODEL, file).tolist()


def test_f16_evaluates_like_torch_over_grpc(stub: runtime_pb2_grpc.RuntimeServiceStub, f16: Path,
                                            sample: Path) -> None:
    (result,) = _evaluate(stub, f16, sample, reference=DEMO_MODEL).results
    (torch_result,) = evaluate_path(DEMO_MODEL, [sample], seq_len=256)
    assert result.tokens == torch_result.tokens  # the same windows
    assert result.reference_ppl == pytest.approx(torch_result.ppl, rel=1e-9)
    assert result.ppl == pytest.approx(torch_result.ppl, rel=1e-3)  # F16 weights vs the float32 forward
    assert 0 <= result.kl < 1e-4
    assert result.top1 > 0.99
    assert result.tokens_per_s > 0


def test_generate_streams_the_torch_greedy_text(stub: runtime_pb2_grpc.RuntimeServiceStub, f16: Path) -> None:
    """A chunk may carry several tokens' text; joined, the chunks are torch's greedy text, and the stats
    count every token."""
    chunks = list(stub.Generate(runtime_pb2.GenerateRequest(
        artifact_path=str(f16), prompt=PROMPT, max_new_tokens=16), timeout=120))
    *pieces, last = chunks
    reference = _torch_pieces(16)
    assert "".join(c.text for c in pieces) == "".join(reference)
    assert all(c.text for c in pieces) and 1 <= len(pieces) <= len(reference)
    assert not any(c.HasField("stats") for c in pieces) and not last.text
    stats = last.stats
    assert (stats.prompt_tokens, stats.generated_tokens, stats.decode_tokens) == (3, len(reference),
                                                                                   len(reference) - 1)
    assert stats.prompt_seconds > 0 and stats.decode_seconds > 0


def test_chunk_interval_joins_the_tokens_decoded_within_it(stub: runtime_pb2_grpc.RuntimeServiceStub,
                                                            f16: Path) -> None:
    """With an interval longer than the whole decode, the first text comes at once (the first token, or
    all that had arrived by then) and everything after it in one chunk before the stats; with 0 the
    stream may still join tokens that waited for a send, never more than it has."""
    reference = _torch_pieces(16)
    chunks = list(stub.Generate(runtime_pb2.GenerateRequest(
        artifact_path=str(f16), prompt=PROMPT, max_new_tokens=16, chunk_interval_ms=60_000), timeout=120))
    texts = [c.text for c in chunks[:-1]]
    assert len(texts) <= 2 and texts[0].startswith(reference[0]) and "".join(texts) == "".join(reference)
    assert chunks[-1].stats.generated_tokens == len(reference)
    each = list(stub.Generate(runtime_pb2.GenerateRequest(
        artifact_path=str(f16), prompt=PROMPT, max_new_tokens=16, chunk_interval_ms=0), timeout=120))
    assert "".join(c.text for c in each) == "".join(reference) and len(each) - 1 <= len(reference)


def test_a_slow_consumer_gets_the_waiting_tokens_joined(f16: Path) -> None:
    """While the consumer is busy the worker decodes on; the next pieces carry everything that arrived
    rather than one token each, and the first piece came as soon as it existed, before the rest."""
    pool = WorkerPool()
    try:
        engine = GgufCausalLM(f16, pool=pool)
        reference = _torch_pieces(128)
        stream = engine.generate(PROMPT, 128, lambda: False)
        first = next(stream)
        time.sleep(3.0)  # far longer than the demo model's 127 further decode steps
        *rest, stats = list(stream)
        assert isinstance(first, str) and isinstance(stats, GenerationStats)
        assert stats.generated_tokens == len(reference)  # the count stays exact when pieces are joined
        assert first + "".join(str(p) for p in rest) == "".join(reference)
        assert first and len(first) < len("".join(reference))
        assert len(rest) < len(reference) - 1
    finally:
        pool.close()


def test_cancelled_stream_leaves_the_worker_in_step(stub: runtime_pb2_grpc.RuntimeServiceStub, f16: Path) -> None:
    call = stub.Generate(runtime_pb2.GenerateRequest(artifact_path=str(f16), prompt=PROMPT, max_new_tokens=4000),
                         timeout=120)
    assert next(call).text and next(call).text
    call.cancel()
    again = list(stub.Generate(runtime_pb2.GenerateRequest(
        artifact_path=str(_file(f16)), prompt=PROMPT, max_new_tokens=4), timeout=120))
    assert "".join(c.text for c in again[:-1]) == "".join(_torch_pieces(4))
    assert again[-1].stats.generated_tokens == 4


@pytest.mark.parametrize("damage", ["truncated", "bad magic"])
def test_malformed_file_is_refused_and_the_service_serves_on(
        stub: runtime_pb2_grpc.RuntimeServiceStub, f16: Path, sample: Path, tmp_path: Path, damage: str) -> None:
    data = _file(f16).read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"GGUX" + data[4:])
    with pytest.raises(grpc.RpcError) as info:
        _evaluate(stub, bad, sample)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert str(bad) in (info.value.details() or "")
    _still_serves(stub, f16, sample)


def test_file_llama_cpp_refuses_is_a_clean_error(stub: runtime_pb2_grpc.RuntimeServiceStub, f16: Path,
                                                 sample: Path, tmp_path: Path) -> None:
    """Three KV heads for k/v tensors of two: a valid layout whose shapes llama.cpp rejects (an exception)."""
    def three_kv_heads(field: object) -> None:
        field.parts[field.data[0]][0] = 3  # type: ignore[attr-defined]

    bad = _patched(_file(f16), tmp_path / "kv3.gguf", "llama.attention.head_count_kv", three_kv_heads)
    with pytest.raises(grpc.RpcError) as info:
        _evaluate(stub, bad, sample)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "llama.cpp failed" in (info.value.details() or "")
    _still_serves(stub, f16, sample)


def test_file_that_aborts_llama_cpp_kills_only_its_worker(stub: runtime_pb2_grpc.RuntimeServiceStub, f16: Path,
                                                          sample: Path, tmp_path: Path) -> None:
    """Two tokens with the same text pass the byte-level check, but llama.cpp's vocabulary loader asserts
    (``GGML_ASSERT(id_to_token.size() == token_to_id.size())``) and aborts the process that loaded it."""
    from bitsmith.formats.gguf import validate

    def duplicate_token(field: object) -> None:
        parts, data = field.parts, field.data  # type: ignore[attr-defined]
        assert len(parts[data[5]]) == len(parts[data[6]])
        parts[data[6]][:] = parts[data[5]]

    bad = _patched(_file(f16), tmp_path / "dup-token.gguf", "tokenizer.ggml.tokens", duplicate_token)
    validate(bad)
    probe = subprocess.run([sys.executable, "-c", CRASH_PROBE, str(bad)], capture_output=True, check=False,
                           env={**os.environ, "GGML_NO_BACKTRACE": "1"}, timeout=120)
    assert probe.returncode == -6, "plain llama_cpp.Llama no longer aborts on this file: pick another crash"

    for _ in range(2):  # the same file again gets a fresh worker and the same answer
        with pytest.raises(grpc.RpcError) as info:
            _evaluate(stub, bad, sample)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = info.value.details() or ""
        assert "SIGABRT" in details and str(bad) in details and "GGML_ASSERT" in details
    _still_serves(stub, f16, sample)


def _worker_pids(file: Path) -> list[int]:
    """The llama.cpp worker processes serving `file` (their command line names it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, NotADirectoryError, PermissionError, ProcessLookupError):
            continue
        if b"bitsmith.formats.gguf.worker" in argv and str(file).encode() in argv:
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker through /proc")
def test_hung_worker_is_killed_and_the_service_serves_on(
        stub: runtime_pb2_grpc.RuntimeServiceStub, f16: Path, sample: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped worker makes no progress: after the configured time its request fails naming the file,
    the worker is gone, and the same file is served again by a fresh worker."""
    monkeypatch.setenv(WORKER_TIMEOUT_ENV, "3")
    file = tmp_path / "hang.gguf"
    shutil.copy(_file(f16), file)
    request = runtime_pb2.GenerateRequest(artifact_path=str(file), prompt=PROMPT, max_new_tokens=4)
    assert list(stub.Generate(request, timeout=120))[-1].stats.generated_tokens == 4
    (pid,) = _worker_pids(file)
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request, timeout=120))
    assert 3 <= time.monotonic() - start < 60
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    details = info.value.details() or ""
    assert "made no progress for 3 s" in details and str(file) in details
    assert pid not in _worker_pids(file)
    monkeypatch.setenv(WORKER_TIMEOUT_ENV, "120")  # the fresh worker's start may take seconds on a busy host
    again = list(stub.Generate(request, timeout=120))
    assert "".join(c.text for c in again[:-1]) == "".join(_torch_pieces(4))
    _still_serves(stub, f16, sample)
