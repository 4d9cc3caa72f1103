"""The README's Python SDK examples, run as written against a stack started by `bitsmith up`.

Every ```python block of the "Python SDK" section runs in its own interpreter with `BITSMITH_HOME`
naming the test's home, so `Client()` finds that stack the way a user's script would. The working
directory stands in for the repository root (its `libs` is the repository's), so the examples' relative
demo paths resolve while their `out/...` artifacts land in the test's directory, not the checkout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bitsmith.manifest import MANIFEST_FILE, verify_manifest

from .test_cli_ray import run_cli

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Python SDK"


def sdk_examples(readme: str) -> list[str]:
    """The ```python blocks between the section's heading and the next heading of its level."""
    start = readme.index(f"\n{SECTION}\n")
    end = readme.find("\n## ", start + 1)
    section = readme[start:end if end != -1 else None]
    return re.findall(r"^```python\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("home")
    env = {"BITSMITH_HOME": str(home)}
    up = run_cli("up", env=env, timeout=300)
    assert up.returncode == 0, up.stderr[-3000:]
    try:
        yield home
    finally:
        down = run_cli("down", env=env)
        assert down.returncode == 0 and "stopped" in down.stderr


def test_the_section_has_examples() -> None:
    examples = sdk_examples((ROOT / "README.md").read_text())
    assert len(examples) >= 2 and all("Client()" in code for code in examples)


@pytest.mark.slow
def test_every_sdk_example_in_the_readme_runs_as_written(home: Path, tmp_path: Path) -> None:
    (tmp_path / "libs").symlink_to(ROOT / "libs", target_is_directory=True)
    for i, code in enumerate(sdk_examples((ROOT / "README.md").read_text())):
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "BITSMITH_HOME": str(home)}, check=False)
        assert proc.returncode == 0, f"example {i + 1} failed:\n{code}\n{proc.stderr[-3000:]}"
        assert proc.stdout.strip(), f"example {i + 1} printed nothing"
    written = sorted(p.parent for p in (tmp_path / "out").rglob(MANIFEST_FILE))
    assert written, "the examples wrote no artifact"
    for artifact in written:
        verify_manifest(artifact)

