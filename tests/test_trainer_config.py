"""Config loading, overrides, presets and the show-config command."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainer.cli import cli
from trainer.config import ConfigError, TrainConfig, config_from_dict, config_to_dict, config_to_toml, load_config

REPO = Path(__file__).resolve().parents[1]
LEGACY_FLAGS = {
    ("objectives", "eval_in_validation"): False,
    ("objectives", "seeded_validation_mask"): False,
    ("objectives", "detach_target"): False,
    ("objectives", "symmetric_alignment"): False,
    ("optim", "clip_all_params"): False,
}


def flag(config: TrainConfig, section: str, name: str):
    return getattr(getattr(config, section), name)


def test_defaults_match_historical_values():
    config = load_config()
    assert config.objectives.weights.contrastive == 1.0
    assert config.objectives.weights.reconstruction == 0.5
    assert config.objectives.weights.alignment == 0.3
    assert config.objectives.temperature == 0.07
    assert config.objectives.alignment_temperature is None
    assert config.model.dim == 128
    assert config.data.max_panels == 8
    assert config.data.page_types == ["narrative", "story"]
    assert config.device == "auto"
    for (section, name), legacy_value in LEGACY_FLAGS.items():
        assert flag(config, section, name) is (not legacy_value), f"{section}.{name}"


def test_overrides_parse_toml_literals():
    config = load_config(None, [
        "model.dim=64",
        "objectives.temperature=0.2",
        "objectives.detach_context=true",
        "data.page_types=[\"story\"]",
        "model.vision_backbone=efficientnet_lite0",
        "objectives.alignment_temperature=0.5",
        "seed=7",
    ])
    assert config.model.dim == 64
    assert config.objectives.temperature == 0.2
    assert config.objectives.detach_context is True
    assert config.data.page_types == ["story"]
    assert config.model.vision_backbone == "efficientnet_lite0"
    assert config.objectives.alignment_temperature == 0.5
    assert config.seed == 7


def test_override_integer_for_float_and_lists():
    config = load_config(None, ["objectives.weights.alignment=1", "data.page_types=narrative,cover", "data.page_types=[]"])
    assert config.objectives.weights.alignment == 1.0
    assert isinstance(config.objectives.weights.alignment, float)
    assert config.data.page_types == []
    assert load_config(None, ["data.page_types=narrative,cover"]).data.page_types == ["narrative", "cover"]


def test_optional_value_accepts_none():
    config = load_config(None, ["objectives.alignment_temperature=0.3", "objectives.alignment_temperature=none"])
    assert config.objectives.alignment_temperature is None


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("objectives.temprature=0.1", "unknown config key 'objectives.temprature'"),
        ("nothing=1", "unknown config key 'nothing'"),
        ("objectives.weights=1", "objectives.weights is a table"),
        ("model.dim.x=1", "model.dim is a value"),
        ("objectives.temperature=warm", "invalid value for objectives.temperature"),
        ("objectives.temperature=0", "invalid value for objectives.temperature"),
        ("objectives.detach_target=1", "invalid value for objectives.detach_target"),
        ("optim.batch_size=0", "invalid value for optim.batch_size"),
        ("objectives.weights.alignment=-1", "invalid value for objectives.weights.alignment"),
        ("data.val_fraction=1.0", "invalid value for data.val_fraction"),
        ("device=tpu", "invalid value for device"),
        ("preset=modern", "unknown preset 'modern'"),
        ("no-equals-sign", "expected KEY=VALUE"),
    ],
)
def test_bad_override_is_one_line_error(override, fragment):
    with pytest.raises(ConfigError) as raised:
        load_config(None, [override])
    message = str(raised.value)
    assert fragment in message
    assert "\n" not in message


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[optim]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(path) in str(raised.value)
    assert "optim.learning_rate" in str(raised.value)


def test_invalid_toml_and_missing_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[optim\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml")


def test_legacy_preset_restores_historical_flags():
    config = load_config(None, ["preset=legacy"])
    for (section, name), legacy_value in LEGACY_FLAGS.items():
        assert flag(config, section, name) is legacy_value, f"{section}.{name}"
    assert config.objectives.detach_context is False


def test_legacy_keeps_weights_and_temperature_configurable():
    config = load_config(None, ["preset=legacy", "objectives.weights.alignment=0.9", "objectives.temperature=0.2"])
    assert config.objectives.weights.alignment == 0.9
    assert config.objectives.temperature == 0.2


def test_explicit_key_wins_over_preset(tmp_path):
    path = tmp_path / "ablation.toml"
    path.write_text('preset = "legacy"\n[objectives]\nsymmetric_alignment = true\n')
    config = load_config(path)
    assert config.objectives.symmetric_alignment is True
    assert config.objectives.detach_target is False


def test_extends_merges_and_resolves_paths(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "base.toml").write_text('[data]\nmanifest = "data/manifest.csv"\n[optim]\nepochs = 3\nlr = 0.01\n')
    child_dir = tmp_path / "child"
    child_dir.mkdir()
    (child_dir / "run.toml").write_text('extends = "../base.toml"\n[optim]\nepochs = 9\n')
    config = load_config(child_dir / "run.toml")
    assert config.optim.epochs == 9
    assert config.optim.lr == 0.01
    assert Path(config.data.manifest) == (tmp_path / "data" / "manifest.csv").resolve()


def test_extends_loop_is_an_error(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.toml")


def test_override_path_is_relative_to_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "configs" / "c.toml"
    path.parent.mkdir()
    path.write_text('[data]\nmanifest = "m.csv"\ncache_dir = "cache"\n')
    config = load_config(path, ["data.manifest=elsewhere/m.csv"])
    assert config.data.manifest == str(tmp_path / "elsewhere" / "m.csv")
    assert config.data.cache_dir == str(tmp_path / "configs" / "cache")


def test_dict_and_toml_round_trip():
    config = load_config(None, ["preset=legacy", "objectives.weights.alignment=0.7", "data.cache_dir=/tmp/cache"])
    assert config_from_dict(config_to_dict(config)) == config
    rendered = config_to_toml(config)
    assert config_from_dict(tomllib.loads(rendered)) == config


def test_bundled_configs_load():
    default = load_config(REPO / "configs" / "default.toml")
    assert default.model.vision_backbone == "tiny_cnn"
    assert default.model.text_backbone == "hashed_bow"
    assert Path(default.data.manifest) == REPO / "fixtures" / "comics" / "manifest.csv"

    legacy = load_config(REPO / "configs" / "legacy.toml")
    assert legacy.preset == "legacy"
    for (section, name), legacy_value in LEGACY_FLAGS.items():
        assert flag(legacy, section, name) is legacy_value, f"{section}.{name}"
    assert legacy.optim.epochs == default.optim.epochs

    pretrained = load_config(REPO / "configs" / "pretrained.toml")
    assert (pretrained.model.vision_backbone, pretrained.model.text_backbone) == ("efficientnet_lite0", "minilm")
    assert pretrained.model.vision_frozen is True
    assert pretrained.model.text_frozen is True

    collapse = load_config(REPO / "configs" / "collapse.toml")
    weights = collapse.objectives.weights
    assert (weights.contrastive, weights.reconstruction, weights.alignment) == (0.0, 1.0, 0.0)
    assert collapse.objectives.detach_target is False
    assert collapse.objectives.detach_context is False


def test_show_config_prints_resolved_toml():
    result = CliRunner().invoke(
        cli, ["show-config", "--config", str(REPO / "configs" / "legacy.toml"), "--set", "objectives.weights.alignment=0.4"]
    )
    assert result.exit_code == 0, result.output
    shown = tomllib.loads(result.output)
    assert shown["preset"] == "legacy"
    assert shown["objectives"]["symmetric_alignment"] is False
    assert shown["objectives"]["weights"]["alignment"] == 0.4


def test_show_config_bad_key_exits_2(capfd):
    from trainer.cli import main

    with pytest.raises(SystemExit) as raised:
        main(["show-config", "--config", str(REPO / "configs" / "default.toml"), "--set", "optim.speed=3"])
    assert raised.value.code == 2
    error_lines = capfd.readouterr().err.strip().splitlines()
    assert len(error_lines) == 1
    assert "unknown config key 'optim.speed'" in error_lines[0]


@pytest.mark.parametrize(("override", "fragment"), [
    ("optim.epochs=abc", "invalid value for optim.epochs: expected an integer, got 'abc'"),
    ("model.dim=-1", "invalid value for model.dim: expected at least 1, got -1"),
])
def test_set_errors_name_set_not_file(tmp_path, override, fragment):
    config = tmp_path / "valid.toml"
    config.write_text("[optim]\nepochs = 3\n")
    with pytest.raises(ConfigError) as raised:
        load_config(config, [override])
    assert str(raised.value) == f"--set: {fragment}"


def test_file_errors_still_name_file(tmp_path):
    config = tmp_path / "invalid.toml"
    config.write_text("[optim]\nepochs = 0\n")
    with pytest.raises(ConfigError, match=f"^{config}: invalid value for optim.epochs"):
        load_config(config, ["model.dim=8"])
