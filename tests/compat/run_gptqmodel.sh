#!/usr/bin/env bash
# Check our GPTQ writer against a real consumer, GPTQModel 7.7.0 on CPU, in a venv of its own
# (gptqmodel needs torch >= 2.14.1; the project pins 2.13). Usage:
#   tests/compat/run_gptqmodel.sh [VENV_DIR] [-- extra args for check_gptqmodel.py]
# VENV_DIR defaults to $BITSMITH_COMPAT_VENV or a directory under $TMPDIR. The venv is reused when
# it already has gptqmodel. bitsmith is put on PYTHONPATH, not installed, so the check always runs
# the working tree's writer and reader.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-${BITSMITH_COMPAT_VENV:-${TMPDIR:-/tmp}/bitsmith-gptqmodel-venv}}"
shift $(( $# > 0 ? 1 : 0 ))
[[ "${1:-}" == "--" ]] && shift

if ! "$venv/bin/python" -c "import gptqmodel" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install "torch==2.14.1"
    "$venv/bin/pip" install "gptqmodel==7.7.0"
fi

cd "$repo"
PYTHONPATH="$repo/libs${PYTHONPATH:+:$PYTHONPATH}" exec "$venv/bin/python" "$here/check_gptqmodel.py" "$@"
