"""The wire contract and the import discipline: checked-in stubs match proto/, and the processes that do
not compute (coordinator, CLI, SDK) never import torch."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_stubs_match_the_protos(tmp_path: Path) -> None:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    args = ["protoc", f"-I{ROOT / 'proto'}", f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos]
    assert protoc.main(args) == 0
    generated = tmp_path / "bitsmith" / "v1"
    checked_in = ROOT / "libs" / "bitsmith" / "v1"
    names = sorted(p.name for p in generated.iterdir())
    assert names, "protoc generated nothing"
    _, mismatch, errors = filecmp.cmpfiles(generated, checked_in, names, shallow=False)
    assert not mismatch and not errors, f"stale stubs {mismatch + errors}: run `make proto`"


def test_control_plane_imports_no_torch() -> None:
    code = ("import sys; import bitsmith, bitsmith.rpc.client, bitsmith.store, bitsmith.formats, bitsmith.manifest, "
            "bitsmith_services.cli, bitsmith_services.coordinator.server, bitsmith_services.stack; "
            "heavy = [m for m in ('torch', 'transformers', 'triton') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
