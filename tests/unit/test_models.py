"""Checkpoint validation and the block-by-block forward against transformers' own model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bitsmith.demo import DEMO_MODEL
from bitsmith.errors import ConfigError, FormatError, NotFoundError, UnsupportedError
from bitsmith.models import (
    build_causal_lm,
    get_adapter,
    load_causal_lm,
    load_checkpoint,
    supported_architectures,
)
from bitsmith.models.base import read_config
from safetensors.torch import load_file, save_file

LLAMA_GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


def _copy_demo(tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, target)
    return target


def _edit_config(model_dir: Path, **changes: object) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _blockwise_logits(model, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    hidden = model.embed(ids)
    for bid in range(model.num_blocks):
        hidden = model.block_forward(bid, hidden)
    return model.head(hidden)


def test_demo_structure(demo_checkpoint) -> None:  # type: ignore[no-untyped-def]
    assert demo_checkpoint.num_blocks == 4
    assert demo_checkpoint.groups(2) == LLAMA_GROUPS
    assert demo_checkpoint.full_name(3, "self_attn.q_proj") == "model.layers.3.self_attn.q_proj"
    assert demo_checkpoint.linear_weight(0, "self_attn.k_proj").shape == (128, 256)
    assert demo_checkpoint.linear_weight(0, "mlp.down_proj").dtype == torch.float32
    assert demo_checkpoint.linear_bias(0, "self_attn.q_proj") is None
    with pytest.raises(ConfigError, match="out of range"):
        demo_checkpoint.groups(4)
    with pytest.raises(ConfigError, match="not a linear"):
        demo_checkpoint.linear_weight(0, "input_layernorm")


def test_block_chain_equals_transformers_model(demo_checkpoint, demo_lm) -> None:  # type: ignore[no-untyped-def]
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = demo_lm(ids).logits
    torch.testing.assert_close(_blockwise_logits(demo_checkpoint, ids), expected, rtol=1e-5, atol=1e-5)


def test_block_forward_is_causal(demo_checkpoint) -> None:  # type: ignore[no-untyped-def]
    hidden = torch.randn(1, 16, 256, generator=torch.Generator().manual_seed(1))
    changed = hidden.clone()
    changed[:, 10:] += 1.0
    out, out_changed = demo_checkpoint.block_forward(0, hidden), demo_checkpoint.block_forward(0, changed)
    torch.testing.assert_close(out[:, :10], out_changed[:, :10])
    assert not torch.allclose(out[:, 10:], out_changed[:, 10:])


def test_overrides_replace_weights_without_touching_checkpoint(demo_checkpoint, demo_lm) -> None:  # type: ignore[no-untyped-def]
    ids = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(2))
    new = torch.zeros(768, 256)
    hidden = demo_checkpoint.embed(ids)
    overridden = demo_checkpoint.block_forward(0, hidden, {"mlp.up_proj.weight": new})
    plain = demo_checkpoint.block_forward(0, hidden)
    assert not torch.allclose(overridden, plain)
    # up_proj = 0 silences the MLP: the block output is the attention residual alone.
    layer = demo_lm.model.layers[0]
    with torch.no_grad():
        original = layer.mlp.up_proj.weight.clone()
        layer.mlp.up_proj.weight.zero_()
        try:
            expected = demo_lm.model.layers[0](
                hidden,
                position_embeddings=demo_lm.model.rotary_emb(hidden, torch.arange(32).unsqueeze(0)),
                attention_mask=None,
            )
        finally:
            layer.mlp.up_proj.weight.copy_(original)
    torch.testing.assert_close(overridden, expected if isinstance(expected, torch.Tensor) else expected[0])
    with pytest.raises(ConfigError, match="expected"):
        demo_checkpoint.block_forward(0, hidden, {"mlp.up_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(ConfigError, match="not a parameter"):
        demo_checkpoint.block_forward(0, hidden, {"mlp.up_proj": new})


def test_registered_architectures_match_transformers() -> None:
    assert supported_architectures() == ("llama", "mistral", "qwen2")
    assert get_adapter("qwen2").has_bias("self_attn.q_proj", None)
    assert not get_adapter("qwen2").has_bias("self_attn.o_proj", None)


@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "llama"])
def test_tiny_random_architectures(tmp_path: Path, model_type: str) -> None:
    """A new architecture is one file plus this test: random weights, saved by transformers."""
    import transformers

    adapter = get_adapter(model_type)
    config = transformers.AutoConfig.for_model(
        model_type,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=128,
        tie_word_embeddings=False,
        attention_bias=True,
    )
    torch.manual_seed(0)
    reference = getattr(transformers, adapter.causal_lm_class)(config).eval()
    reference.save_pretrained(tmp_path)
    model = load_checkpoint(tmp_path)
    for local in adapter.linears:
        bias = model.linear_bias(0, local)
        assert (bias is not None) == adapter.has_bias(local, model.config), local
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(_blockwise_logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_unknown_architecture_lists_supported(tmp_path: Path) -> None:
    model_dir = _copy_demo(tmp_path)
    _edit_config(model_dir, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedError, match="llama, mistral, qwen2"):
        load_checkpoint(model_dir)


def test_mismatched_architecture_class(tmp_path: Path) -> None:
    model_dir = _copy_demo(tmp_path)
    _edit_config(model_dir, architectures=["Qwen2ForCausalLM"])
    with pytest.raises(UnsupportedError, match="Qwen2ForCausalLM"):
        load_checkpoint(model_dir)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"hidden_size": 10**9}, "hidden_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"num_key_value_heads": 3}, "multiple"),
        ({"vocab_size": "many"}, "vocab_size"),
    ],
)
def test_absurd_dimensions_rejected(tmp_path: Path, changes: dict[str, object], match: str) -> None:
    model_dir = _copy_demo(tmp_path)
    _edit_config(model_dir, **changes)
    with pytest.raises(FormatError, match=match):
        load_checkpoint(model_dir)


def test_missing_directory_config_and_weights(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        load_checkpoint(tmp_path / "absent")
    model_dir = _copy_demo(tmp_path)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(NotFoundError, match=r"model\.safetensors"):
        load_checkpoint(model_dir)
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"config\.json"):
        load_checkpoint(model_dir)


def test_truncated_safetensors_names_file(tmp_path: Path) -> None:
    model_dir = _copy_demo(tmp_path)
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FormatError, match=r"model\.safetensors"):
        load_checkpoint(model_dir)


def _rewrite_tensors(model_dir: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_nan_weight_names_tensor(tmp_path: Path) -> None:
    model_dir = _copy_demo(tmp_path)

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.2.mlp.up_proj.weight"][5, 7] = float("nan")

    _rewrite_tensors(model_dir, poison)
    with pytest.raises(FormatError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        load_checkpoint(model_dir)
    assert load_checkpoint(model_dir, check_finite=False).num_blocks == 4  # the opt-out for verified copies


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weight_found_in_its_stored_dtype(tmp_path: Path, dtype: torch.dtype, value: float) -> None:
    """The check reads each tensor as stored: one bad entry, last in a half-precision tensor, is found."""
    model_dir = _copy_demo(tmp_path)

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        for name in tensors:
            tensors[name] = tensors[name].to(dtype)
        tensors["model.layers.1.self_attn.o_proj.weight"][-1, -1] = value

    _rewrite_tensors(model_dir, poison)
    with pytest.raises(FormatError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight contains NaN or Inf"):
        load_checkpoint(model_dir)


def test_missing_and_misshapen_tensors(tmp_path: Path) -> None:
    model_dir = _copy_demo(tmp_path)
    _rewrite_tensors(model_dir, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    with pytest.raises(FormatError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight is missing"):
        load_checkpoint(model_dir)

    def reshape(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.1.self_attn.v_proj.weight"] = torch.zeros(64, 256, dtype=torch.bfloat16)

    _rewrite_tensors(model_dir, reshape)
    with pytest.raises(FormatError, match=r"shape \(64, 256\)"):
        load_checkpoint(model_dir)


def test_sharded_checkpoint(tmp_path: Path, demo_lm) -> None:  # type: ignore[no-untyped-def]
    model_dir = _copy_demo(tmp_path)
    tensors = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, model_dir / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(members, shard))
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = load_checkpoint(model_dir)
    torch.testing.assert_close(model.linear_weight(3, "mlp.down_proj"), demo_lm.model.layers[3].mlp.down_proj.weight)
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(NotFoundError, match="model-00002-of-00002"):
        load_checkpoint(model_dir)


def test_build_causal_lm_with_tied_head_and_quantization_config(tmp_path: Path, demo_lm) -> None:  # type: ignore[no-untyped-def]
    model_dir = _copy_demo(tmp_path)
    _edit_config(model_dir, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
    config, _ = read_config(model_dir)
    assert getattr(config, "quantization_config", None) is None
    state = {k: v for k, v in demo_lm.state_dict().items() if k != "lm_head.weight"}
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(256, 256)
    built = build_causal_lm(model_dir, state)
    assert built.lm_head.weight.data_ptr() == built.model.embed_tokens.weight.data_ptr()
    assert not built.training
    assert torch.count_nonzero(built.model.layers[0].self_attn.q_proj.weight) == 0
    torch.testing.assert_close(built.lm_head.weight, demo_lm.lm_head.weight)
    state.pop("model.norm.weight")
    with pytest.raises(FormatError, match=r"model\.norm\.weight"):
        build_causal_lm(model_dir, state)


def test_load_causal_lm_is_float32_eval() -> None:
    model = load_causal_lm(DEMO_MODEL)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_preload_imports_every_architectures_model_code() -> None:
    """In a fresh interpreter (this one may have imported them already): what a calibrator or packer
    imports as it starts, so that no job's first checkpoint waits for it."""
    modules = [f"transformers.models.{name}.modeling_{name}" for name in ("llama", "mistral", "qwen2")]
    code = ("import sys; from bitsmith import models; before = [m in sys.modules for m in MODULES]; "
            "models.preload(); print(before, [m in sys.modules for m in MODULES])").replace("MODULES", repr(modules))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.split() == ["[False,", "False,", "False]", "[True,", "True,", "True]"]
