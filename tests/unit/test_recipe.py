"""Recipe schema: unknown keys, types, validators, overrides, YAML errors, version, dump/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qtool.errors import RecipeError
from qtool.recipe import RECIPE_VERSION, Recipe, apply_overrides, build_recipe, dump_recipe, load_recipe, parse_override

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_validate():
    r = load_recipe(None)
    assert r.version == RECIPE_VERSION
    assert r.model.backbone == "tf_efficientnet_lite0" and r.ptq.activation_bits == 8


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    r = load_recipe(path)
    assert r.name


def test_unknown_key_names_its_path(tmp_path):
    p = _write(tmp_path, "version: 1\ndata:\n  imagesize: 64\n")
    with pytest.raises(RecipeError, match=r"data\.imagesize: unknown key") as e:
        load_recipe(p)
    assert str(p) in str(e.value)
    with pytest.raises(RecipeError, match=r"ptq\.calib_data\.sorce: unknown key"):
        load_recipe(None, ["ptq.calib_data.sorce=train"])
    with pytest.raises(RecipeError, match=r"recipe key trian: unknown key"):
        load_recipe(None, ["trian.epochs=1"])


def test_wrong_type_names_the_key():
    with pytest.raises(RecipeError, match=r"data\.image_size: .*integer"):
        load_recipe(None, ["data.image_size=big"])
    with pytest.raises(RecipeError, match=r"data\.synth\.categories: .*list"):
        load_recipe(None, ["data.synth.categories=grid"])
    with pytest.raises(RecipeError, match=r"model\.dcam\.variant"):
        load_recipe(None, ["model.dcam.variant=diagonal"])
    with pytest.raises(RecipeError, match=r"train\.epochs"):
        load_recipe(None, ["train.epochs=-1"])


@pytest.mark.parametrize("key", ["ptq.activation_bits", "ptq.weight_bits"])
def test_bad_bit_width_names_the_key(key):
    with pytest.raises(RecipeError, match=rf"{key}: .*bit width 5 not supported; allowed: 4, 6, 8"):
        load_recipe(None, [f"{key}=5"])
    assert getattr(load_recipe(None, [f"{key}=4"]).ptq, key.split(".")[1]) == 4


def test_parse_override_types():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=1.5") == (["a"], 1.5)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=[grid,disc]") == (["a"], ["grid", "disc"])
    assert parse_override("a=x=y") == (["a"], "x=y")
    assert parse_override(" a.b =hello") == (["a", "b"], "hello")
    for bad in ("noequals", "=3", "a=[1"):
        with pytest.raises(RecipeError, match="override"):
            parse_override(bad)


def test_overrides_apply_and_validate():
    r = load_recipe(None, ["model.levels=[1,2]", "train.epochs=3", "data.synth.categories=[disc]",
                           "ptq.calib_options.percentile=99.9"])
    assert r.model.levels == [1, 2] and r.train.epochs == 3
    assert r.data.synth.categories == ["disc"]
    assert r.ptq.calib_options == {"percentile": 99.9}
    tree = {"train": {"epochs": 1}}
    out = apply_overrides(tree, ["train.epochs=2"])
    assert out["train"]["epochs"] == 2 and tree["train"]["epochs"] == 1, "overrides must not mutate the input"


def test_later_override_wins(tmp_path):
    p = _write(tmp_path, "version: 1\ntrain:\n  epochs: 7\n")
    assert load_recipe(p).train.epochs == 7
    assert load_recipe(p, ["train.epochs=2", "train.epochs=5"]).train.epochs == 5


def test_override_below_a_value_is_an_error(tmp_path):
    p = _write(tmp_path, "version: 1\nseed: 3\n")
    with pytest.raises(RecipeError, match=r"'seed' is not a section"):
        load_recipe(p, ["seed.x=1"])
    with pytest.raises(RecipeError, match="seed"):
        load_recipe(None, ["seed.x=1"])


@pytest.mark.parametrize(
    "text, line",
    [("version: 1\ndata:\n  image_size: 64\n root: x\n", 4), ("a: 1\nb: @x\n", 2)],
)
def test_invalid_yaml_names_file_and_line(tmp_path, text, line):
    p = _write(tmp_path, text)
    with pytest.raises(RecipeError, match=rf"{p} line {line}: invalid YAML"):
        load_recipe(p)


def test_non_mapping_and_missing_files(tmp_path):
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(_write(tmp_path, "- 1\n- 2\n"))
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError, match=str(missing)):
        load_recipe(missing)
    assert load_recipe(_write(tmp_path, "")).name == Recipe().name  # empty file = defaults


def test_version_mismatch(tmp_path):
    p = _write(tmp_path, f"version: {RECIPE_VERSION + 1}\n")
    with pytest.raises(RecipeError, match=rf"version: .*version {RECIPE_VERSION + 1} not supported"):
        load_recipe(p)


def test_dump_load_round_trip(tmp_path):
    r = load_recipe(None, ["name=rt", "seed=7", "model.levels=[1,2]", "model.dcam.enabled=true",
                           "ptq.exclude_nodes=['/head/*']", "ptq.calib_data.source=mix", "data.categories=[grid]"])
    path = tmp_path / "out" / "recipe.yaml"
    dump_recipe(r, path)
    back = load_recipe(path)
    assert back == r
    assert back.model_dump() == r.model_dump()
    assert yaml.safe_load(path.read_text())["version"] == RECIPE_VERSION
    assert sorted(p.name for p in path.parent.iterdir()) == ["recipe.yaml"]


def test_sections_validate_assignment():
    r = build_recipe({})
    with pytest.raises(ValueError):
        r.train.epochs = "many"
