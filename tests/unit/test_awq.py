"""AWQ's block transform: equivalence of the scaled float block, the searches' guarantees, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bitsmith.algos import awq
from bitsmith.algos.awq import awq_block, fake_quantize, scale_factors, scaled_errors, search_clip
from bitsmith.algos.gptq import hessian_row_errors, weight_energy
from bitsmith.algos.rtn import quantize_rtn
from bitsmith.calib import calibration_tokens, tokenize_file
from bitsmith.calib.capture import forward_block, run_with_input_hooks
from bitsmith.demo import CALIB_FILES, DEMO_MODEL, EVAL_FILES
from bitsmith.errors import CalibrationError, ConfigError
from bitsmith.models import CheckpointModel, get_adapter, load_checkpoint
from bitsmith.schemes import AWQOptions, GridSearch, QuantScheme

FAST = AWQOptions(grid=8, clip_grid=10)
W4 = QuantScheme(bits=4, group_size=128)
W3 = QuantScheme(bits=3, group_size=128)
G32 = QuantScheme(bits=4, group_size=32)


def _tiny(tmp_path: Path, model_type: str) -> CheckpointModel:
    """A random 1-block checkpoint with GQA (4 query heads, 2 KV heads) and every parameter random, biases and
    norms included (transformers would start them at 0 and 1, which would hide a fold that forgot them)."""
    import transformers

    config = transformers.AutoConfig.for_model(
        model_type,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=1,
        vocab_size=128,
        tie_word_embeddings=False,
        attention_bias=True,
        mlp_bias=True,
    )
    torch.manual_seed(0)
    model = getattr(transformers, get_adapter(model_type).causal_lm_class)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape) * (0.3 if param.dim() == 1 else 0.1)
            param.copy_(1 + noise if "norm" in name else noise)
        # An activation outlier channel, so the scales have something to do.
        model.model.layers[0].input_layernorm.weight[5] = 8.0
    model.save_pretrained(tmp_path / model_type)
    return load_checkpoint(tmp_path / model_type)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> CheckpointModel:
    return _tiny(tmp_path_factory.mktemp("awq"), "llama")


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> CheckpointModel:
    return _tiny(tmp_path_factory.mktemp("awq"), "qwen2")


@pytest.fixture(scope="module")
def calib_hidden(demo_checkpoint: CheckpointModel) -> torch.Tensor:
    tokens = calibration_tokens(DEMO_MODEL, CALIB_FILES, samples=6, seq_len=128, seed=0)
    return demo_checkpoint.embed(tokens)


def _hidden(model: CheckpointModel, samples: int = 3, length: int = 24, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return model.embed(torch.randint(0, int(model.config.vocab_size), (samples, length), generator=gen))


def _all(model: CheckpointModel, scheme: QuantScheme) -> dict[str, QuantScheme]:
    return dict.fromkeys(model.adapter.linears, scheme)


def _quantized(
    model: CheckpointModel, bid: int, tensors: dict[str, torch.Tensor], schemes: dict[str, QuantScheme]
) -> dict[str, torch.Tensor]:
    """`tensors` with every linear of `schemes` replaced by its RTN weight (what the caller applies)."""
    out = dict(tensors)
    for name, scheme in schemes.items():
        weight = tensors.get(f"{name}.weight", model.linear_weight(bid, name))
        out[f"{name}.weight"] = quantize_rtn(weight, scheme).dequantize()
    return out


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().pow(2).mean())


@pytest.mark.parametrize("arch", ["demo", "llama", "qwen2"])
def test_any_scales_fold_into_an_equivalent_block(arch: str, request: pytest.FixtureRequest) -> None:
    """Random scales for every group (v→o under GQA, biases of v and up) leave the block's function unchanged."""
    model = request.getfixturevalue({"demo": "demo_checkpoint", "llama": "tiny_llama", "qwen2": "tiny_qwen2"}[arch])
    bid = 1 if arch == "demo" else 0
    hidden = _hidden(model)
    gen = torch.Generator().manual_seed(1)
    tensors: dict[str, torch.Tensor] = {}
    factors: dict[str, torch.Tensor] = {}
    for pair in model.adapter.smooth_pairs:
        channels = model.block_tensor(bid, f"{pair.smooth}.weight").shape[0]
        scales = torch.rand(channels, generator=gen) * 4 + 0.25
        factors = scale_factors(model, bid, pair, scales)
        for name, factor in factors.items():
            tensors[name] = tensors.get(name, model.block_tensor(bid, name)) * factor
    expected = {
        "demo": set(),
        "llama": {"self_attn.v_proj.bias", "mlp.up_proj.bias"},
        "qwen2": {"self_attn.v_proj.bias"},
    }
    assert expected[arch] <= set(tensors)
    reference = model.block_forward(bid, hidden)
    torch.testing.assert_close(model.block_forward(bid, hidden, tensors), reference, rtol=1e-4, atol=1e-4)
    # The up->down scales with down_proj's columns in the wrong order break the block: the test can fail.
    wrong = dict(tensors)
    wrong["mlp.down_proj.weight"] = model.linear_weight(bid, "mlp.down_proj") * factors["mlp.down_proj.weight"].flip(1)
    assert not torch.allclose(model.block_forward(bid, hidden, wrong), reference, atol=1e-3)


def test_v_to_o_scales_follow_the_kv_head_of_each_query_head(tiny_llama: CheckpointModel) -> None:
    """4 query heads on 2 KV heads of dimension 16: o_proj's column h*16 + d reads v's channel (h // 2)*16 + d."""
    pair = next(p for p in tiny_llama.adapter.smooth_pairs if p.smooth == "self_attn.v_proj")
    scales = torch.arange(1, 33, dtype=torch.float32)
    columns = scale_factors(tiny_llama, 0, pair, scales)["self_attn.o_proj.weight"].squeeze(0)
    expected = torch.cat([scales[:16], scales[:16], scales[16:], scales[16:]])
    torch.testing.assert_close(columns, expected)


@pytest.mark.parametrize("arch", ["demo", "llama", "qwen2"])
def test_transform_without_quantization_is_the_same_block(arch: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue({"demo": "demo_checkpoint", "llama": "tiny_llama", "qwen2": "tiny_qwen2"}[arch])
    scheme = W3 if arch == "demo" else QuantScheme(bits=3, group_size=32)
    hidden = _hidden(model, samples=4, length=32)
    transform = awq_block(model, 0, hidden, _all(model, scheme), AWQOptions(grid=5, clip=False))
    scaled = [group for group in transform.report.scales if group.ratio is not None]
    assert scaled, "no group was scaled: the equivalence below would test nothing"
    assert all(t.dtype == torch.float32 for t in transform.tensors.values())
    torch.testing.assert_close(
        model.block_forward(0, hidden, transform.tensors), model.block_forward(0, hidden), rtol=1e-4, atol=1e-4
    )
    # Clipping changes only linear weights, never the norms or biases that keep the block equivalent.
    clipped = awq_block(model, 0, hidden, _all(model, scheme), AWQOptions(grid=5, clip_grid=4))
    for name, value in transform.tensors.items():
        if not name.endswith("proj.weight"):
            torch.testing.assert_close(clipped.tensors[name], value)
    # Only the linears named in `clip` are clipped (a pipeline names those rounded to nearest afterwards).
    some = awq_block(model, 0, hidden, _all(model, scheme), AWQOptions(grid=5, clip_grid=4), clip={"mlp.up_proj"})
    assert {c.linear for c in some.report.clips} == {"mlp.up_proj"}
    changed = {n for n, v in some.tensors.items() if not torch.equal(v, transform.tensors[n])}
    assert changed <= {"mlp.up_proj.weight"}


def test_search_is_never_worse_than_no_scaling_and_its_losses_are_real(
    demo_checkpoint: CheckpointModel, calib_hidden: torch.Tensor
) -> None:
    schemes = _all(demo_checkpoint, W3)
    transform = awq_block(demo_checkpoint, 0, calib_hidden, schemes, FAST)
    report = transform.report_dict()
    assert json.loads(json.dumps(report)) == report
    assert [g["smooth"] for g in report["scales"]] == [
        "input_layernorm",
        "self_attn.v_proj",
        "post_attention_layernorm",
        "mlp.up_proj",
    ]
    for group in report["scales"]:
        assert 0 < group["loss_scaled"] <= group["loss_plain"], group
    assert any(g["loss_scaled"] < g["loss_plain"] for g in report["scales"])
    # q and k are not clipped; every other quantized linear is, and clipping never adds error here.
    assert [c["linear"] for c in report["clips"]] == [
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    assert all(c["error_clipped"] <= c["error_plain"] for c in report["clips"])
    # The up->down group's loss (from down's input Hessian) is the quantized down_proj's output MSE.
    captured: list[torch.Tensor] = []
    run_with_input_hooks(demo_checkpoint, 0, calib_hidden, {"mlp.down_proj": lambda _p, x: captured.append(x)})
    inputs = torch.cat(captured).reshape(-1, 768)
    weight = demo_checkpoint.linear_weight(0, "mlp.down_proj")
    direct = _mse(inputs @ fake_quantize(weight, W3).T, inputs @ weight.T)
    assert report["scales"][3]["loss_plain"] == pytest.approx(direct, rel=1e-3)


def test_awq_beats_rtn_on_held_out_text(demo_checkpoint: CheckpointModel, calib_hidden: torch.Tensor) -> None:
    """Calibrated on training text, AWQ+RTN's block output is closer to the float block than RTN's on eval text
    (block 0 of the demo: 0.91x RTN's error at w4, 0.79x at w3; most of it from the clipping)."""
    held_out = demo_checkpoint.embed(tokenize_file(DEMO_MODEL, EVAL_FILES[1])[: 4 * 128].reshape(4, 128))
    reference = forward_block(demo_checkpoint, 0, held_out)
    for scheme in (W4, W3):
        schemes = _all(demo_checkpoint, scheme)
        transform = awq_block(demo_checkpoint, 0, calib_hidden, schemes, FAST)
        rtn = _mse(forward_block(demo_checkpoint, 0, held_out, _quantized(demo_checkpoint, 0, {}, schemes)), reference)
        awq = _mse(
            forward_block(demo_checkpoint, 0, held_out, _quantized(demo_checkpoint, 0, transform.tensors, schemes)),
            reference,
        )
        assert awq < 0.95 * rtn, (scheme.bits, awq, rtn)


def test_grid_search_is_the_quantizer_of_the_search(
    demo_checkpoint: CheckpointModel, calib_hidden: torch.Tensor
) -> None:
    schemes = {"mlp.down_proj": W3}
    plain = awq_block(demo_checkpoint, 0, calib_hidden, schemes, AWQOptions(grid=4, clip=False))
    searched = awq_block(
        demo_checkpoint, 0, calib_hidden, schemes, AWQOptions(grid=4, clip=False), grid_search=GridSearch(steps=20)
    )
    # The MSE grid rounds better, so the unscaled loss the search starts from is lower with it.
    assert searched.report.scales[0].loss_plain < plain.report.scales[0].loss_plain


def test_mixed_schemes_and_consumers_outside_them(tiny_llama: CheckpointModel) -> None:
    model = tiny_llama
    schemes = {
        "self_attn.q_proj": QuantScheme(bits=4, group_size=32),
        "self_attn.k_proj": QuantScheme(bits=3, group_size=64),
        "mlp.gate_proj": QuantScheme(bits=3, group_size=-1, sym=True),
        "mlp.down_proj": QuantScheme(bits=8, group_size=32),
    }
    hidden = _hidden(model, samples=4, length=32)
    transform = awq_block(model, 0, hidden, schemes, AWQOptions(grid=10, clip=False))
    groups = {g.smooth: g for g in transform.report.scales}
    # o_proj is not quantized, so v->o is not searched; every other group is, with its quantized members.
    assert list(groups) == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    assert groups["input_layernorm"].quantized == ("self_attn.q_proj", "self_attn.k_proj")
    assert groups["post_attention_layernorm"].quantized == ("mlp.gate_proj",)
    assert "self_attn.o_proj.weight" not in transform.tensors
    scaled = {g.smooth for g in transform.report.scales if g.ratio is not None}
    assert {"input_layernorm", "mlp.up_proj"} <= scaled
    # v_proj and up_proj are not quantized but still scaled, so the float block is unchanged.
    assert {"self_attn.v_proj.weight", "mlp.up_proj.weight", "mlp.up_proj.bias"} <= set(transform.tensors)
    torch.testing.assert_close(
        model.block_forward(0, hidden, transform.tensors), model.block_forward(0, hidden), rtol=1e-4, atol=1e-4
    )
    clipped = awq_block(model, 0, hidden, schemes, AWQOptions(grid=10))
    assert [c.linear for c in clipped.report.clips] == ["mlp.gate_proj", "mlp.down_proj"]


def test_search_clip_on_a_hessian_is_the_search_on_its_tokens() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 64, generator=gen)
    weight[:, 3] *= 6  # outliers worth clipping
    x = torch.randn(200, 64, generator=gen) * torch.rand(64, generator=gen).mul(3).add(0.1)
    hessian = 2 * x.T @ x / x.shape[0]
    scheme = QuantScheme(bits=3, group_size=32)
    clipped, report = search_clip(weight, hessian, scheme, AWQOptions(clip_grid=20, max_shrink=0.5), name="w")
    assert report.linear == "w" and 0 < report.clipped_groups <= 1
    assert (clipped.abs() <= weight.abs().amax(dim=1, keepdim=True) + 1e-6).all()
    assert report.error_plain == pytest.approx(_mse(x @ fake_quantize(weight, scheme).T, x @ weight.T), rel=1e-4)
    assert report.error_clipped == pytest.approx(_mse(x @ fake_quantize(clipped, scheme).T, x @ weight.T), rel=1e-4)
    assert report.error_clipped < report.error_plain
    # Each (row, group) range never shrinks past max_shrink.
    groups, original = clipped.reshape(8, 2, 32), weight.reshape(8, 2, 32)
    assert (groups.abs().amax(dim=2) >= 0.5 * original.abs().amax(dim=2) - 1e-6).all()


def test_search_clip_moves_each_end_of_an_asymmetric_range_on_its_own() -> None:
    gen = torch.Generator().manual_seed(1)
    weight = (torch.rand(16, 64, generator=gen) - 0.5) * 0.1
    weight[:, 5], weight[:, 40] = 1.0, -0.3  # outliers of unequal size at the two ends of every row's groups
    weight[:, 37], weight[:, 9] = 0.3, -1.0
    x = torch.randn(400, 64, generator=gen)
    scheme = QuantScheme(bits=3, group_size=32, sym=False)
    clipped, _ = search_clip(weight, 2 * x.T @ x / 400, scheme, AWQOptions(clip_grid=20, max_shrink=0.5))
    top = clipped.reshape(16, 2, 32).amax(dim=2) / weight.reshape(16, 2, 32).amax(dim=2)
    bottom = clipped.reshape(16, 2, 32).amin(dim=2) / weight.reshape(16, 2, 32).amin(dim=2)
    grid = torch.tensor([1 - i / 20 for i in range(10)])
    for ratio in (top, bottom):  # every end lands on the clipping grid
        assert ((ratio.reshape(-1, 1) - grid).abs().min(dim=1).values < 1e-5).all()
    assert (top != bottom).float().mean() >= 0.5  # one factor for both ends would tie them


def test_search_clip_walks_with_the_cross_terms_lower_the_whole_output_error(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=gen) * 0.02
    # Correlated inputs (a shared component): the groups' clipping errors add up in the output.
    x = torch.randn(2048, 256, generator=gen) * torch.rand(256, generator=gen) * 2 + torch.randn(2048, 1, generator=gen)
    hessian = 2 * x.T @ x / x.shape[0]
    scheme = QuantScheme(bits=3, group_size=64, sym=False)
    _, walked = search_clip(weight, hessian, scheme, AWQOptions())
    monkeypatch.setattr(awq, "_CLIP_PASSES", 0)  # the diagonal blocks alone (AutoAWQ's search)
    _, diagonal = search_clip(weight, hessian, scheme, AWQOptions())
    assert walked.error_clipped < 0.98 * diagonal.error_clipped < diagonal.error_plain


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(bits=4, group_size=32), QuantScheme(bits=3, group_size=-1, sym=True), QuantScheme(bits=2, min_zero=1)],
)
@pytest.mark.parametrize("search", [None, GridSearch(steps=10)])
def test_fake_quantize_is_rtn(scheme: QuantScheme, search: GridSearch | None) -> None:
    weight = torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    weight[0, :128] = 0  # an all-zero group
    expected = quantize_rtn(weight, scheme, search=search).dequantize()
    torch.testing.assert_close(fake_quantize(weight, scheme, search), expected)


def test_module_forward_runs_the_blocks_own_modules(demo_checkpoint: CheckpointModel) -> None:
    model = demo_checkpoint
    hidden = _hidden(model, samples=2, length=16)
    layer = model.block_module(2)
    with torch.no_grad():
        after_attention = hidden + model.module_forward(2, "self_attn", layer.get_submodule("input_layernorm")(hidden))
        out = after_attention + model.module_forward(
            2, "mlp", layer.get_submodule("post_attention_layernorm")(after_attention)
        )
    torch.testing.assert_close(out, model.block_forward(2, hidden), rtol=1e-5, atol=1e-5)
    zero = torch.zeros(256, 768)
    torch.testing.assert_close(
        model.module_forward(2, "mlp.down_proj", torch.ones(1, 2, 768), {"mlp.down_proj.weight": zero}),
        torch.zeros(1, 2, 256),
    )
    with pytest.raises(ConfigError, match="not parameters of mlp"):
        model.module_forward(2, "mlp", hidden, {"self_attn.q_proj.weight": torch.zeros(256, 256)})
    with pytest.raises(ConfigError, match="not a module"):
        model.module_forward(2, "mlp.nothing", hidden)


def test_bad_input_is_refused(demo_checkpoint: CheckpointModel) -> None:
    model = demo_checkpoint
    hidden = _hidden(model, samples=1, length=8)
    with pytest.raises(ConfigError, match=r"mlp\.fc1"):
        awq_block(model, 0, hidden, {"mlp.fc1": W4}, FAST)
    with pytest.raises(ConfigError, match=r"\[samples, length, 256\]"):
        awq_block(model, 0, hidden[0], _all(model, W4), FAST)
    with pytest.raises(ConfigError, match=r"\[samples, length, 256\]"):
        awq_block(model, 0, hidden[..., :128], _all(model, W4), FAST)
    with pytest.raises(ConfigError, match="does not divide"):
        awq_block(model, 0, hidden, {"mlp.down_proj": QuantScheme(bits=4, group_size=100)}, FAST)
    with pytest.raises(ConfigError, match="out of range"):
        awq_block(model, 9, hidden, _all(model, W4), FAST)
    broken = hidden.clone()
    broken[0, 3, 7] = float("nan")
    with pytest.raises(CalibrationError, match="finite"):
        awq_block(model, 0, broken, _all(model, W4), FAST)


def test_scaled_errors_measure_the_original_rtn_and_the_clipping_in_the_scaled_basis() -> None:
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=generator)
    x = torch.randn(512, 64, generator=generator) * torch.linspace(0.2, 4.0, 64)
    h = 2 * x.T @ x / len(x)
    scheme = QuantScheme(bits=3, group_size=32)
    rtn = fake_quantize(w, scheme)
    plain = hessian_row_errors(rtn - w, h).sum()
    # Unscaled and unclipped: the solve and RTN are one thing.
    error, rtn_error, energy = scaled_errors(w, w, rtn, h, scheme)
    assert error == pytest.approx(float(plain), rel=1e-9) and rtn_error == pytest.approx(float(plain), rel=1e-9)
    assert energy == pytest.approx(weight_energy(w, h))
    # Scaled columns (W·S with the input divided by S): RTN of the original costs what it cost before.
    s = torch.linspace(0.5, 2.0, 64)
    h_scaled = h / torch.outer(s, s)
    ref = w * s
    _, rtn_error, energy = scaled_errors(w, ref, fake_quantize(ref, scheme), h_scaled, scheme)
    assert rtn_error == pytest.approx(float(plain), rel=1e-5)
    assert energy == pytest.approx(weight_energy(w, h), rel=1e-5)
    # A clipped weight is measured against the unclipped reference: clipping's own change counts.
    clipped = ref.clamp(-1.0, 1.0)
    with_clip, _, _ = scaled_errors(w, ref, fake_quantize(clipped, scheme), h_scaled, scheme)
    against_itself, _, _ = scaled_errors(w, clipped, fake_quantize(clipped, scheme), h_scaled, scheme)
    assert with_clip > against_itself
