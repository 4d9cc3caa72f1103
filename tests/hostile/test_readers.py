"""The hostile corpus against the readers themselves: each input is refused by the reader that first sees it,
with bitsmith's own error (its status code as the corpus says) and a reason naming the file, tensor or key."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from bitsmith.demo import DEMO_MODEL
from bitsmith.errors import BitsmithError, ConfigError, FormatError
from bitsmith.formats.gguf import read, validate
from bitsmith.models import load_checkpoint, read_config
from bitsmith.recipes import Recipe
from bitsmith.rpc.convert import recipe_from_proto, recipe_to_proto
from bitsmith.schemes import Method
from bitsmith.store import ArtifactStore, TensorRef, tensor_digest

from tests.unit.gguf_files import write_artifact

from .corpus import CHECKPOINTS, GGUF_FILES, RECIPES, STORE_KEYS, Hostile, copy_demo, with_block_count

READ_LIMIT_S = 5.0
"""Every refusal comes long before a hang would be noticed: the readers check sizes before reading."""


def assert_refused(case: Hostile[object], call: Callable[[], object], error: type[BitsmithError] = BitsmithError
                   ) -> BitsmithError:
    start = time.monotonic()
    with pytest.raises(error) as info:
        call()
    assert time.monotonic() - start < READ_LIMIT_S, case.name
    assert info.value.grpc_code == case.code, str(info.value)
    assert re.search(case.reason, str(info.value)), str(info.value)
    return info.value


@pytest.fixture(scope="module", autouse=True)
def imported() -> None:
    """transformers imported before the clock starts: the limit is on reading, not on importing."""
    read_config(DEMO_MODEL)


@pytest.fixture(scope="module")
def f16(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of the demo model as an F16 GGUF file, as bitsmith writes it."""
    return write_artifact(tmp_path_factory.mktemp("gguf") / "f16", "F16").read_bytes()


@pytest.mark.parametrize("case", CHECKPOINTS, ids=lambda c: c.name)
def test_checkpoint_loader_refuses(case: Hostile[Callable[[Path], Path]], tmp_path: Path) -> None:
    model = case.build(copy_demo(tmp_path))
    assert_refused(case, lambda: load_checkpoint(model))


@pytest.mark.parametrize("case", RECIPES, ids=lambda c: c.name)
def test_recipe_conversion_refuses(case: Hostile[Callable[..., None]]) -> None:
    wire = recipe_to_proto(Recipe(method=Method.RTN))
    case.build(wire)
    assert_refused(case, lambda: recipe_from_proto(wire), ConfigError)


@pytest.mark.parametrize("case", GGUF_FILES, ids=lambda c: c.name)
def test_gguf_validator_and_reader_refuse(case: Hostile[Callable[[bytes], bytes]], f16: bytes, tmp_path: Path
                                         ) -> None:
    path = tmp_path / "model-F16.gguf"
    path.write_bytes(case.build(f16))
    assert_refused(case, lambda: validate(path), FormatError)
    assert_refused(case, lambda: read(path), FormatError)


def test_gguf_reader_counts_blocks_before_building_a_model_of_them(f16: bytes, tmp_path: Path) -> None:
    """500 blocks claimed (llama.cpp's limit allows it), 4 in the file: refused before transformers builds 500."""
    path = tmp_path / "model-F16.gguf"
    path.write_bytes(with_block_count(f16, 500))
    case = Hostile("gguf-more-blocks-than-tensors", None, "INVALID_ARGUMENT",
                   r"the metadata claims 500 blocks, the file has no tensor of block 499")
    assert_refused(case, lambda: read(path), FormatError)


@pytest.mark.parametrize("case", STORE_KEYS, ids=lambda c: c.name)
def test_store_refuses_keys_that_leave_it_on_read_and_write(case: Hostile[Callable[[Path, Path], str]],
                                                            tmp_path: Path) -> None:
    store, outside = ArtifactStore(tmp_path / "store"), tmp_path / "outside"
    outside.mkdir()
    planted = ArtifactStore(outside).put_tensors("w.safetensors", {"w": torch.ones(4)})["w"]
    key = case.build(store.root, outside)
    ref = TensorRef(key=key, name="w", dtype="float32", shape=(4,), sha256=tensor_digest(torch.ones(4)))
    assert ref.sha256 == planted.sha256, "the file outside is a valid one: only where it lies is wrong"
    assert_refused(case, lambda: store.get_tensor(ref), ConfigError)
    assert_refused(case, lambda: store.put_tensors(key, {"w": torch.zeros(4)}), ConfigError)
    assert sorted(p.name for p in outside.iterdir()) == ["w.safetensors"]
    assert torch.equal(ArtifactStore(outside).get_tensor(planted), torch.ones(4)), "nothing outside was overwritten"
