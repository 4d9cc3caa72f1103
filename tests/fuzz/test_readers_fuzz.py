"""Fuzzing the readers that take files from outside: the safetensors checkpoint loader, the GGUF reader and
the config loader. Seeds are real files bitsmith reads (a tiny random llama checkpoint and its F16 GGUF
artifact), mutated; every example must give a valid result or one of bitsmith's own errors — never another
exception — within the profile's deadline (see conftest)."""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bitsmith.errors import BitsmithError
from bitsmith.formats.gguf import read, validate
from bitsmith.models import load_checkpoint
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.gguf_files import small_tokenizer, tiny_model, write_artifact

from .mutations import HUGE, mutated

WEIGHTS = "model.safetensors"


class Seeds:
    """The seed files' bytes and where their headers end (no dataclass: a failing example's report prints
    this, and must not print a quarter of a megabyte of weights)."""

    def __init__(self, model: Path, gguf: Path) -> None:
        self.model = model
        self.weights = (model / WEIGHTS).read_bytes()
        self.weights_header = 8 + struct.unpack_from("<Q", self.weights)[0]
        self.config: dict[str, Any] = json.loads((model / "config.json").read_text())
        self.gguf = gguf.read_bytes()
        self.gguf_header = validate(gguf).data_offset

    def __repr__(self) -> str:
        return f"Seeds({self.model.parent})"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    """A llama checkpoint small enough to read in milliseconds (1 block, 32 wide, 300 tokens) and its GGUF file."""
    root = tmp_path_factory.mktemp("seeds")
    tokenizer = small_tokenizer(root / "tokenizer", 300)
    model = tiny_model(root / "model", tokenizer=tokenizer, vocab_size=300, hidden_size=32, intermediate_size=64,
                       num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1, max_position_embeddings=64)
    gguf = write_artifact(root / "gguf", "F16", source=model)
    load_checkpoint(model)
    read(gguf).dense_state_dict()  # the seeds read, and everything the readers import is imported
    return Seeds(model, gguf)


@pytest.fixture(scope="module")
def workdir(seeds: Seeds, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the seed checkpoint; each example writes every file it mutates or depends on."""
    return Path(shutil.copytree(seeds.model, tmp_path_factory.mktemp("fuzz") / "model"))


def answers(call: Callable[[], object]) -> None:
    """A value, or one of bitsmith's own errors; any other exception fails the example."""
    with contextlib.suppress(BitsmithError):
        call()


@given(data=st.data())
def test_checkpoint_loader_survives_mutated_safetensors(seeds: Seeds, workdir: Path, data: st.DataObject) -> None:
    (workdir / "config.json").write_text(json.dumps(seeds.config))
    (workdir / WEIGHTS).write_bytes(data.draw(mutated(seeds.weights, seeds.weights_header), label="weights"))
    answers(lambda: load_checkpoint(workdir).num_blocks)


@given(data=st.data())
def test_gguf_reader_survives_mutated_files(seeds: Seeds, workdir: Path, data: st.DataObject) -> None:
    path = workdir / "model-F16.gguf"
    path.write_bytes(data.draw(mutated(seeds.gguf, seeds.gguf_header), label="gguf"))
    answers(lambda: read(path).dense_state_dict())


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.sampled_from(HUGE),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
EXTRA_KEYS = ("head_dim", "rope_scaling", "rope_parameters", "quantization_config", "layer_types", "sliding_window")


def _configs(real: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """config.json files: the real one with values replaced or keys dropped, or its bytes mutated."""
    keys = st.sampled_from(sorted({*real, *EXTRA_KEYS}))
    edited = st.tuples(st.dictionaries(keys, JSON_VALUES, max_size=3), st.sets(keys, max_size=2)).map(
        lambda e: json.dumps({k: v for k, v in {**real, **e[0]}.items() if k not in e[1]}).encode())
    encoded = json.dumps(real).encode()
    return edited | mutated(encoded, len(encoded))


@given(data=st.data())
def test_config_loader_survives_mutated_configs(seeds: Seeds, workdir: Path, data: st.DataObject) -> None:
    (workdir / WEIGHTS).write_bytes(seeds.weights)
    (workdir / "config.json").write_bytes(data.draw(_configs(seeds.config), label="config.json"))
    answers(lambda: load_checkpoint(workdir, check_finite=False).block_forward)

