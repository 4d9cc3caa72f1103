"""llama.cpp's reference tools (llama-quantize, llama-perplexity, llama-imatrix) for benchmarks and tests.

Why build them from the llama-cpp-python sdist: the tools then come from exactly the llama.cpp source the
installed Python binding was compiled from, so a number the tools print and a number runtime_cpu reports
come from the same code (the tools are built for this CPU, ``GGML_NATIVE`` on; a binding built portable
may round floats differently in its SIMD paths, not more). They are built once into
``.cache/llama-tools/<version>/`` (gitignored), never into the repository; a later call finds the
binaries and builds nothing.

    python bench/llama_tools.py          # builds if needed (minutes), prints one "name path" per tool

    from llama_tools import tool_path
    subprocess.run([tool_path("llama-perplexity"), "-m", "model.gguf", "-f", "text.txt"], check=True)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix")
DIST = "llama-cpp-python"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "llama-tools"

log = logging.getLogger("bitsmith.bench.llama_tools")


def binding_version() -> str:
    """The installed llama-cpp-python version: the tools are built from the same llama.cpp source."""
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"{DIST} is not installed in {sys.prefix}; the tools are built to match it") from None


def _run(cmd: list[str], log_file: Path) -> None:
    with log_file.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        raise RuntimeError(f"{cmd[0]} failed with exit code {done.returncode}; see {log_file}")


def _source(root: Path, version: str, log_file: Path) -> Path:
    """The llama.cpp tree vendored in the sdist, downloaded (pip's own client) and unpacked once."""
    src = root / "src"
    llama_cpp = src / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if llama_cpp.is_dir():
        return llama_cpp
    sdist_dir = root / "sdist"
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
          f"{DIST}=={version}", "--dest", str(sdist_dir)], log_file)
    archives = sorted(sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not archives:
        raise RuntimeError(f"pip downloaded no sdist of {DIST}=={version} into {sdist_dir}")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(src, filter="data")
    if not llama_cpp.is_dir():
        raise RuntimeError(f"{archives[0]} has no vendor/llama.cpp")
    return llama_cpp


def build(version: str | None = None, *, jobs: int | None = None) -> dict[str, Path]:
    """Every tool of `TOOLS` built for `version` (default: the installed binding's); skips what exists."""
    version = version or binding_version()
    root = CACHE / version
    bin_dir = root / "build" / "bin"
    paths = {name: bin_dir / name for name in TOOLS}
    if all(p.is_file() and os.access(p, os.X_OK) for p in paths.values()):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    log_file = root / "build.log"
    start = time.perf_counter()
    llama_cpp = _source(root, version, log_file)
    # Static libraries make each binary self-contained; no server, tests, examples or network code.
    _run(["cmake", "-S", str(llama_cpp), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release",
          "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
          "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"], log_file)
    _run(["cmake", "--build", str(root / "build"), "--config", "Release", "--parallel",
          str(jobs or os.cpu_count() or 1), "--target", *TOOLS], log_file)
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"the build finished without {missing}; see {log_file}")
    log.info("built llama.cpp tools", extra={"version": version, "seconds": round(time.perf_counter() - start, 1),
                                             "dir": str(bin_dir)})
    return paths


def tool_path(name: str) -> Path:
    """The path of one tool (``llama-perplexity``, …), building all of them first if needed."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; known: {list(TOOLS)}")
    return build()[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", help=f"{DIST} version whose llama.cpp to build (default: the installed one)")
    parser.add_argument("--jobs", type=int, help="parallel compile jobs (default: all CPUs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    paths = build(args.version, jobs=args.jobs)
    for name, path in paths.items():
        print(f"{name} {path}")
    print(f"ready in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
