"""Recipes: YAML and wire forms, first-match overrides, and every malformed recipe refused with its place."""

from __future__ import annotations

from pathlib import Path

import pytest
from bitsmith.errors import ConfigError, NotFoundError
from bitsmith.recipes import MAX_RECIPE_BYTES, Assignment, ModuleOverride, Recipe
from bitsmith.rpc.convert import recipe_from_proto, recipe_to_proto
from bitsmith.schemes import AWQOptions, GPTQOptions, GridSearch, Method, QuantScheme

MIXED = """
method: awq+gptq
scheme: {bits: 4, group_size: 128, sym: false}
gptq: {damp_percent: 0.02, grid_search: true, asymmetric_calibration: true}
awq: {grid: 10, clip: false}
overrides:
  - pattern: 'layers\\.0\\.self_attn\\.o_proj'
    skip: true
  - pattern: 'self_attn\\.'
    bits: 8
  - pattern: 'down_proj'
    method: rtn
    scheme: {group_size: 64}
"""


def test_yaml_recipe_assigns_first_match(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(MIXED)
    recipe = Recipe.from_yaml(path)
    assert recipe.gptq == GPTQOptions(damp_percent=0.02, grid_search=GridSearch(), asymmetric_calibration=True)
    assert recipe.awq == AWQOptions(grid=10, clip=False)
    assert recipe.assign("model.layers.0.self_attn.o_proj") is None
    assert recipe.assign("model.layers.1.self_attn.o_proj") == Assignment(
        method=Method.AWQ_GPTQ, scheme=QuantScheme(bits=8, group_size=128))
    assert recipe.assign("model.layers.0.mlp.down_proj") == Assignment(
        method=Method.RTN, scheme=QuantScheme(bits=4, group_size=64))
    assert recipe.assign("model.layers.0.mlp.up_proj") == Assignment(method=Method.AWQ_GPTQ, scheme=QuantScheme())
    assert recipe.methods == {Method.AWQ_GPTQ, Method.RTN}


def test_wire_and_dict_forms_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(MIXED)
    recipe = Recipe.from_yaml(path)
    assert recipe_from_proto(recipe_to_proto(recipe)) == recipe
    data = recipe.to_dict()
    assert data["overrides"][1] == {"pattern": "self_attn\\.", "skip": False, "method": None,
                                    "scheme": {"bits": 8, "group_size": 128, "sym": False, "min_zero": 0}}
    assert recipe_from_proto(recipe_to_proto(Recipe())) == Recipe()


def test_skipping_everything_is_refused() -> None:
    recipe = Recipe(overrides=(ModuleOverride(pattern="proj", skip=True),))
    with pytest.raises(ConfigError, match="nothing to quantize"):
        recipe.assignments(["model.layers.0.mlp.up_proj"])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"bits": 4}, r"recipe: unknown keys \['bits'\]"),
        ({"method": "smoothquant"}, r"recipe.method: unknown method 'smoothquant'"),
        ({"scheme": {"bits": 5}}, r"recipe.scheme: bits must be one of"),
        ({"scheme": {"bits": "4"}}, r"recipe.scheme.bits must be int"),
        ({"scheme": {"sym": 1}}, r"recipe.scheme.sym must be bool"),
        ({"gptq": {"damp_percent": 0}}, r"damp_percent must be in"),
        ({"gptq": {"grid_search": {"steps": 0}}}, r"GridSearch.steps must be positive"),
        ({"awq": {"grid": 0}}, r"AWQOptions.grid must be positive"),
        ({"awq": {"ratio": 1}}, r"recipe.awq: unknown keys \['ratio'\]"),
        ({"overrides": {"pattern": "x"}}, r"recipe.overrides must be a list"),
        ({"overrides": ["x"]}, r"recipe.overrides\[0\] must be a mapping"),
        ({"overrides": [{"bits": 8}]}, r"recipe.overrides\[0\].pattern must be a string"),
        ({"overrides": [{"pattern": "(", "bits": 8}]}, r"'\(' is not a valid regex"),
        ({"overrides": [{"pattern": "x"}]}, r"changes nothing"),
        ({"overrides": [{"pattern": "x", "skip": True, "bits": 8}]}, r"cannot also set a scheme"),
        ({"overrides": [{"pattern": "x", "bits": 8, "scheme": {"sym": True}}]}, r"either flat or under 'scheme'"),
        ({"overrides": [{"pattern": "x", "bits": 6}]}, r"recipe.overrides\[0\]: bits must be one of"),
        ({"overrides": [{"pattern": "x", "skip": "yes"}]}, r"skip must be true or false"),
        ({"_version": 2}, r"version 2 is not 1"),
    ],
)
def test_bad_recipes_name_the_place(data: dict[str, object], reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        Recipe.from_mapping(data)


def test_bad_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        Recipe.from_yaml(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: [gptq\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Recipe.from_yaml(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- gptq\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        Recipe.from_yaml(listing)
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"#" * (MAX_RECIPE_BYTES + 1))
    with pytest.raises(ConfigError, match="the limit is"):
        Recipe.from_yaml(huge)
