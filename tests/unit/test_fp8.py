"""The fp8 method end to end in the library: the grid in recipes and on the wire, the solve, the store, and a
whole in-process job on the demo model with static activation scales from calibration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bitsmith.demo import CALIB_FILES, DEMO_MODEL
from bitsmith.errors import CalibrationError, ConfigError, FormatError
from bitsmith.pipeline import quantize_in_process, solve_group
from bitsmith.quantized import FP8Weight, QuantizedWeight
from bitsmith.recipes import Assignment, ModuleOverride, Recipe
from bitsmith.rpc.convert import (
    quantized_ref_from_proto,
    quantized_ref_to_proto,
    recipe_from_proto,
    recipe_to_proto,
    set_solve_grid,
    solve_grid,
)
from bitsmith.schemes import FP8_E4M3_MAX, FP8Scheme, GPTQOptions, Method, QuantScheme
from bitsmith.store import ArtifactStore, FP8Ref
from bitsmith.v1 import solver_pb2

STATIC = FP8Scheme(per_channel=False, static_activations=True)


def _weight(rows: int = 48, cols: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_fp8_recipe_yaml_assigns_the_float8_grid_and_keeps_integer_overrides(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("method: fp8\nfp8: {per_channel: false, static_activations: true}\n"
                    "overrides:\n  - pattern: 'down_proj'\n    method: gptq\n    bits: 8\n"
                    "  - pattern: 'lm_head'\n    skip: true\n")
    recipe = Recipe.from_yaml(path)
    assert recipe.assign("model.layers.0.self_attn.q_proj") == Assignment(method=Method.FP8, scheme=STATIC)
    assert recipe.assign("model.layers.0.mlp.down_proj") == Assignment(
        method=Method.GPTQ, scheme=QuantScheme(bits=8))
    assert recipe.calibration_needs == ("fp8 static activations", "gptq")
    assert Recipe.from_mapping(recipe.to_dict()) == recipe
    assert recipe_from_proto(recipe_to_proto(recipe)) == recipe


def test_dynamic_fp8_needs_no_calibration_and_an_unset_wire_section_is_the_default() -> None:
    recipe = Recipe(method=Method.FP8)
    assert recipe.calibration_needs == ()
    assert recipe.assign("x") == Assignment(method=Method.FP8, scheme=FP8Scheme())
    msg = recipe_to_proto(recipe)
    msg.ClearField("fp8")
    assert recipe_from_proto(msg).fp8 == FP8Scheme(per_channel=True, static_activations=False)


@pytest.mark.parametrize("data, match", [
    ({"method": "fp8", "overrides": [{"pattern": "q_proj", "bits": 8}]}, "integer-grid fields"),
    ({"method": "fp8", "fp8": {"per_channel": "yes"}}, r"fp8\.per_channel must be true or false"),
    ({"method": "fp8", "fp8": {"block": 128}}, "unknown keys"),
])
def test_malformed_fp8_recipes_are_refused(data: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Recipe.from_mapping(data)


def test_an_fp8_override_on_an_integer_recipe_takes_the_recipe_fp8_grid() -> None:
    recipe = Recipe(method=Method.GPTQ, fp8=STATIC,
                    overrides=(ModuleOverride(pattern="self_attn", method=Method.FP8),))
    assert recipe.assign("model.layers.0.self_attn.v_proj") == Assignment(method=Method.FP8, scheme=STATIC)
    assert recipe.assign("model.layers.0.mlp.up_proj") == Assignment(method=Method.GPTQ, scheme=QuantScheme())


def test_per_channel_scales_map_each_row_absmax_onto_the_fp8_range() -> None:
    weight = _weight()
    weight[3] = 0.0
    (solved,) = solve_group([weight], None, method=Method.FP8, scheme=FP8Scheme(), options=GPTQOptions(), label="w")
    fp8 = solved.weight
    assert isinstance(fp8, FP8Weight) and fp8.input_scale is None
    torch.testing.assert_close(fp8.scale[[0, 1]], weight[[0, 1]].abs().amax(1) / FP8_E4M3_MAX)
    assert torch.equal(fp8.dequantize()[3], torch.zeros(64))
    # e4m3 keeps 3 mantissa bits: every weight within 1/16 of itself, or of the subnormal step, after scaling.
    error = (fp8.dequantize() - weight).abs()
    bound = weight.abs() / 16 + fp8.scale[:, None] * 2.0**-9
    assert bool((error <= bound + 1e-12).all())


def test_a_group_shares_one_per_tensor_scale_and_static_activations_need_the_input_absmax() -> None:
    weights = [_weight(32, 64, 1), _weight(16, 64, 2) * 4]
    hessian = torch.eye(64) * 2
    with pytest.raises(CalibrationError, match="absmax"):
        solve_group(weights, hessian, method=Method.FP8, scheme=STATIC, options=GPTQOptions(), label="qkv")
    parts = solve_group(weights, hessian, method=Method.FP8, scheme=STATIC, options=GPTQOptions(), label="qkv",
                        input_absmax=3.5)
    scales = [p.weight.scale for p in parts if isinstance(p.weight, FP8Weight)]
    assert len(scales) == 2 and torch.equal(scales[0], scales[1])
    assert float(scales[0]) == pytest.approx(float(weights[1].abs().max()) / FP8_E4M3_MAX)
    for part, weight in zip(parts, weights, strict=True):
        assert isinstance(part.weight, FP8Weight) and part.weight.input_scale is not None
        assert float(part.weight.input_scale) == pytest.approx(3.5 / FP8_E4M3_MAX)
        delta = weight - part.weight.dequantize()
        assert part.error == pytest.approx(float(torch.einsum("ij,jk,ik->", delta, hessian, delta)), rel=1e-4)


def test_non_finite_weights_are_refused_with_the_layer_name() -> None:
    weight = _weight()
    weight[0, 0] = float("nan")
    with pytest.raises(Exception, match="bad_layer"):
        solve_group([weight], None, method=Method.FP8, scheme=FP8Scheme(), options=GPTQOptions(), label="bad_layer")


def test_fp8_weights_go_through_the_store_and_the_wire_unchanged(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    (solved,) = solve_group([_weight()], None, method=Method.FP8, scheme=STATIC, options=GPTQOptions(),
                            label="w", input_absmax=2.0)
    ref = store.put_quantized("job/q.safetensors", "model.layers.0.self_attn.q_proj", solved.weight)
    assert isinstance(ref, FP8Ref)
    back = store.get_quantized(quantized_ref_from_proto(quantized_ref_to_proto("x", ref)))
    assert isinstance(back, FP8Weight) and isinstance(solved.weight, FP8Weight)
    assert back.scheme == STATIC and torch.equal(back.data.view(torch.uint8), solved.weight.data.view(torch.uint8))
    assert torch.equal(back.scale, solved.weight.scale) and back.input_scale is not None
    request = solver_pb2.SolveRequest()
    set_solve_grid(request, STATIC)
    assert solve_grid(request) == STATIC and not request.HasField("scheme")


def test_an_fp8_weight_refuses_inconsistent_parts() -> None:
    data = torch.zeros(4, 8, dtype=torch.float8_e4m3fn)
    with pytest.raises(FormatError, match=r"float32 \[4\]"):
        FP8Weight(data=data, scale=torch.ones(1), scheme=FP8Scheme())
    with pytest.raises(FormatError, match="takes an input scale"):
        FP8Weight(data=data, scale=torch.ones(1), scheme=STATIC)
    with pytest.raises(FormatError, match="float8_e4m3fn"):
        FP8Weight(data=data.float(), scale=torch.ones(4), scheme=FP8Scheme())


def test_in_process_fp8_job_calibrates_static_scales_and_stays_close_to_the_float_model() -> None:
    """Static activations: each linear's input scale is its calibration absmax / 448, and the model's
    outputs with the FP8 weights stay within a few percent of the float model's."""
    from bitsmith.models import load_checkpoint

    recipe = Recipe(method=Method.FP8, fp8=FP8Scheme(static_activations=True))
    result = quantize_in_process(DEMO_MODEL, calib_files=CALIB_FILES, samples=4, seq_len=64, recipe=recipe)
    linears = result.quantized
    assert len(linears) == 28 and all(isinstance(w, FP8Weight) for w in linears.values())
    assert not any(isinstance(w, QuantizedWeight) for w in linears.values())
    q, k = linears["model.layers.0.self_attn.q_proj"], linears["model.layers.0.self_attn.k_proj"]
    assert isinstance(q, FP8Weight) and isinstance(k, FP8Weight) and q.input_scale is not None
    assert torch.equal(q.input_scale, k.input_scale)  # one input, one absmax
    model = load_checkpoint(DEMO_MODEL)
    hidden = model.embed(torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0)))
    reference = model.block_forward(0, hidden)
    overrides = {n.removeprefix("model.layers.0."): w.dequantize() for n, w in linears.items()
                 if n.startswith("model.layers.0.")}
    out = model.block_forward(0, hidden, {f"{n}.weight": w for n, w in overrides.items()})
    assert float((out - reference).norm() / (reference - hidden).norm()) < 0.05
