"""Tokens/s on CPU: torch fp32 (the unquantized checkpoint) vs ONNX Runtime (MatMulNBits artifact), and
llama.cpp on an F16 GGUF of the same model, through runtime_cpu over gRPC vs called directly.

torch and ONNX Runtime run in this process, one after the other, on the same machine and thread count,
through the same calling convention (`bitsmith.runtimes.load_model`): prefill = one forward over a
`--prompt`-token window (tokens/s), decode = greedy steps with the KV cache, one token at a time
(tokens/s). The ONNX artifact is written from RTN codes of the demo model (the codes do not change the
speed).

llama.cpp: the same GGUF file, the same thread count, context and batch size, the same `--prompt`-token
text prompt and the same number of greedy tokens, (a) through a runtime_cpu server's Generate stream
(a server process like `bitsmith serve runtime_cpu`, with its llama.cpp worker process) and (b) with
`llama_cpp.Llama` in this process, alternating. Both are timed by the
caller's clock: prompt tok/s = prompt tokens / time to the first token, decode tok/s = tokens after the
first / time from the first to the last (rates: medians over the runs); the service's overhead is how much
slower (a) is than (b), the median over interleaved pairs of runs. The worker's own clock (`GenerateStats`)
and the chunks per stream (fewer than tokens where the stream joined tokens that waited for a send) are
printed too. Prints the hardware first.

    python bench/cpu_runtime.py [--bits 4] [--group-size 128] [--prompt 512] [--decode 128] [--repeats 3]
                                [--gguf-model DIR] [--llama-threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from machine import hardware


def best_of(repeats: int, fn: Callable[[], int]) -> float:
    """Tokens/s of the fastest of `repeats` runs of `fn` (which returns the tokens it processed)."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        rates.append(tokens / (time.perf_counter() - start))
    return max(rates) if repeats > 1 else statistics.fmean(rates)


def measure(model: Any, prompt: int, decode: int, repeats: int) -> tuple[float, float]:
    import torch

    ids = torch.randint(0, 4096, (1, prompt), generator=torch.Generator().manual_seed(0))

    def prefill() -> int:
        with torch.no_grad():
            model(ids)
        return prompt

    def greedy() -> int:
        with torch.no_grad():
            out = model(ids[:, :16], use_cache=True)
            for _ in range(decode):
                token = out.logits[:, -1:].argmax(-1)
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
        return decode

    prefill()  # warm-up (ORT's first run plans memory; torch's allocates)
    return best_of(repeats, prefill), best_of(repeats, greedy)


@dataclass(frozen=True, slots=True)
class Timed:
    """One greedy generation by the caller's clock: prompt tokens, seconds to the first token, tokens
    after the first and the seconds they took."""

    prompt_tokens: int
    first_s: float
    rest_tokens: int
    rest_s: float

    @property
    def rates(self) -> tuple[float, float]:
        return self.prompt_tokens / self.first_s, self.rest_tokens / self.rest_s


def medians(runs: list[Timed]) -> tuple[float, float]:
    """The median prompt rate and the median decode rate over the runs (a shared machine's busy spells
    make the best and the worst runs outliers)."""
    rates = [r.rates for r in runs]
    return statistics.median(p for p, _ in rates), statistics.median(d for _, d in rates)


def grpc_generate(stub: Any, path: Path, prompt: str, max_new_tokens: int) -> tuple[Timed, Any, int]:
    """One Generate stream through runtime_cpu, timed at the client: the timing, the worker's own stats and
    the number of text chunks (a chunk carries every token that was ready when the service sent it)."""
    from bitsmith.v1 import runtime_pb2

    start = time.perf_counter()
    first = last = start
    pieces = 0
    stats = None
    for chunk in stub.Generate(runtime_pb2.GenerateRequest(artifact_path=str(path), prompt=prompt,
                                                           max_new_tokens=max_new_tokens), timeout=600):
        if chunk.HasField("stats"):
            stats = chunk.stats
            continue
        last = time.perf_counter()
        pieces += 1
        if pieces == 1:
            first = last
    if stats is None or pieces < 2 or stats.generated_tokens < 2:
        raise RuntimeError(f"the stream gave {pieces} chunks and {'no' if stats is None else ''} stats")
    return Timed(stats.prompt_tokens, first - start, stats.generated_tokens - 1, last - first), stats, pieces


def direct_generate(llm: Any, prompt: str, tokens: int) -> Timed:
    """The same greedy loop with llama_cpp.Llama in this process: tokenize, prompt pass, then per token
    argmax, text piece and one decode step — what runtime_cpu's worker does, without the IPC and gRPC."""
    import llama_cpp
    import numpy as np

    start = time.perf_counter()
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    first = start
    for i in range(tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        token = int(logits.argmax())
        llm.detokenize([token])
        if i == 0:
            first = time.perf_counter()
        if i < tokens - 1:
            llm.eval([token])
    return Timed(len(ids), first - start, tokens - 1, time.perf_counter() - first)


def llama_cpp_rows(args: argparse.Namespace, gguf_dir: Path, store: Path) -> None:
    """runtime_cpu over gRPC vs llama_cpp.Llama in-process, on one GGUF file (see the module docstring)."""
    import grpc
    import llama_cpp
    from bitsmith.demo import EVAL_FILES
    from bitsmith.formats.gguf import gguf_file
    from bitsmith.formats.gguf.runtime import cpu_threads
    from bitsmith.formats.gguf.worker import MIN_CONTEXT
    from bitsmith.v1 import runtime_pb2_grpc

    file = gguf_file(gguf_dir)
    threads = cpu_threads()
    n_ctx = max(args.prompt + args.decode, MIN_CONTEXT)  # as the worker sizes its context for this request
    llm = llama_cpp.Llama(str(file), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    text_ids = llm.tokenize(EVAL_FILES[0].read_text(encoding="utf-8").encode(), add_bos=False, special=True)
    prompt = llm.detokenize(text_ids[: args.prompt]).decode("utf-8", errors="ignore")

    # runtime_cpu in its own process, as deployed (`bitsmith serve`): the client here does not share its GIL.
    server = subprocess.Popen([sys.executable, "-m", "bitsmith_services.cli", "serve", "runtime_cpu", "--port", "0",
                               "--store", str(store)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert server.stdout is not None
    channel = grpc.insecure_channel(server.stdout.readline().strip())
    stub = runtime_pb2_grpc.RuntimeServiceStub(channel)
    try:
        warm, _, _ = grpc_generate(stub, gguf_dir, prompt, args.decode)  # starts the worker, sizes its context
        tokens = warm.rest_tokens + 1  # the stream stops at EOS: decode exactly as many directly
        direct_generate(llm, prompt, tokens)  # warm-up
        served, direct = [], []
        for _ in range(args.repeats):  # interleaved, so a busy spell on a shared machine hits both
            served.append(grpc_generate(stub, gguf_dir, prompt, args.decode))
            direct.append(direct_generate(llm, prompt, tokens))
    finally:
        channel.close()
        server.terminate()
        server.wait()
    worker = [s for _, s, _ in served]

    print(f"\nllama.cpp {llama_cpp.__version__}, {args.gguf_model.name} {file.name} ({threads} threads, context "
          f"{n_ctx}); prompt {served[0][0].prompt_tokens} tokens, {tokens} greedy tokens, median of "
          f"{args.repeats}; {statistics.median(n for _, _, n in served):.0f} chunks per stream (median)")
    print(f"{'llama.cpp':<40} {'prompt tok/s':>14} {'decode tok/s':>13}")
    grpc_rates, direct_rates = medians([t for t, _, _ in served]), medians(direct)
    worker_rates = (statistics.median(s.prompt_tokens / s.prompt_seconds for s in worker),
                    statistics.median(s.decode_tokens / s.decode_seconds for s in worker))
    for name, (p, d) in (("runtime_cpu over gRPC (client clock)", grpc_rates),
                         ("  its worker (llama.cpp's own clock)", worker_rates),
                         ("llama_cpp.Llama in-process", direct_rates)):
        print(f"{name:<40} {p:>14.0f} {d:>13.1f}")
    # Overhead from each interleaved pair (a gRPC run and the direct run right after it), then the median
    # over pairs: a busy spell of a shared machine then skews one pair, not the figure.
    pairs = [(t, d) for (t, _, _), d in zip(served, direct, strict=True)]
    overhead = [statistics.median(100 * (d.rates[i] / t.rates[i] - 1) for t, d in pairs) for i in (0, 1)]
    print(f"{'service overhead (target <= 5%)':<40} {overhead[0]:>13.1f}% {overhead[1]:>12.1f}%")
    # The service's cost is per request and per streamed token, not per FLOP: the same figures make a
    # smaller share of a larger model's time.
    per_request_ms = statistics.median(1e3 * (t.first_s - d.first_s) for t, d in pairs)
    per_token_us = statistics.median(1e6 * (t.rest_s / t.rest_tokens - d.rest_s / d.rest_tokens) for t, d in pairs)
    print(f"service cost (median of pairs): {per_request_ms:.2f} ms per request (to the first token), "
          f"{per_token_us:.0f} us per further token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gguf-model", type=Path, help="checkpoint whose F16 GGUF the llama.cpp rows run "
                        "(default: the demo model); the service's cost is per token, so its share shrinks as "
                        "the model grows")
    parser.add_argument("--llama-threads", type=int, help="llama.cpp's threads on both sides (default: every "
                        "core); the service process then shares the cores that llama.cpp leaves")
    args = parser.parse_args()
    if args.llama_threads is not None:
        from bitsmith.formats.gguf.runtime import THREADS_ENV

        os.environ[THREADS_ENV] = str(args.llama_threads)  # read here and by the server process it starts

    import onnxruntime
    import torch
    from bitsmith.demo import CALIB_FILES, DEMO_MODEL
    from bitsmith.formats import get_format
    from bitsmith.formats.gguf import write_gguf
    from bitsmith.manifest import build_artifact
    from bitsmith.pipeline import quantize_in_process
    from bitsmith.recipes import Recipe
    from bitsmith.runtimes import load_model
    from bitsmith.schemes import Format, GPTQOptions, Method, QuantScheme

    args.gguf_model = args.gguf_model or DEMO_MODEL
    print(f"hardware: {hardware()}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}")
    scheme = QuantScheme(bits=args.bits, group_size=args.group_size)
    quantized = quantize_in_process(DEMO_MODEL, calib_files=CALIB_FILES, samples=1, seq_len=16,
                                    recipe=Recipe(scheme=scheme, method=Method.RTN)).quantized
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "onnx"
        build_artifact(artifact, lambda d: get_format(Format.ONNX).write(
            d, source_model_dir=DEMO_MODEL, quantized=quantized, options=GPTQOptions()), format=Format.ONNX, recipe={})
        rows = [
            ("torch fp32 (checkpoint)", load_model(DEMO_MODEL)),
            (f"onnxruntime MatMulNBits int{args.bits} g{args.group_size}", load_model(artifact)),
        ]
        print(f"demo model ref-llama-4m; prefill {args.prompt} tokens, decode {args.decode} tokens, best of "
              f"{args.repeats}")
        print(f"{'runtime':<40} {'prefill tok/s':>14} {'decode tok/s':>13}")
        for name, model in rows:
            prefill, decode = measure(model, args.prompt, args.decode, args.repeats)
            print(f"{name:<40} {prefill:>14.0f} {decode:>13.1f}")
        gguf_dir = Path(tmp) / "gguf"
        build_artifact(gguf_dir, lambda d: write_gguf(d, source_model_dir=args.gguf_model, quantized={}),
                       format=Format.GGUF, recipe={})
        llama_cpp_rows(args, gguf_dir, Path(tmp) / "store")


if __name__ == "__main__":
    main()
