"""Config loading, overrides, and the error message for every kind of bad value."""

from __future__ import annotations

import pytest

from dist_lm.config.schema import Config, ConfigError
from dist_lm.config.io import all_keys, available_presets, from_dict, load_config, to_dict, to_yaml


def write(tmp_path, text: str):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return str(path)


def error_of(config, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(config, list(overrides))
    return str(e.value)


def test_defaults_and_overrides_types():
    cfg = load_config(None, ["optim.lr=3e-4", "train.max_steps=200", "model.n_kv_heads=null",
                             "parallel.activation_checkpointing=true", "parallel.zero_stage=3",
                             "train.max_tokens=1e6", "run.name=abc"])
    assert cfg.optim.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string; we take it as float
    assert cfg.train.max_steps == 200 and cfg.train.max_tokens == 1_000_000
    assert cfg.model.n_kv_heads is None and cfg.parallel.activation_checkpointing is True
    assert cfg.parallel.zero_stage == 3 and cfg.run.name == "abc"


def test_yaml_then_override_wins(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.01\nmodel:\n  d_model: 64\n  n_heads: 2\n")
    cfg = load_config(path, ["optim.lr=0.02"])
    assert cfg.optim.lr == 0.02 and cfg.model.d_model == 64 and cfg.preset == "x"


@pytest.mark.parametrize("preset", available_presets())
def test_every_preset_loads_and_round_trips(preset):
    cfg = load_config(preset)
    assert cfg.preset == preset
    again = from_dict(to_dict(cfg), "round trip")
    assert again == cfg
    assert "model:" in to_yaml(cfg)


def test_required_presets_exist():
    assert {"debug", "demo", "rtx-12gb", "rtx-24gb", "h100-80gb", "h100-multinode"} <= set(available_presets())


def test_unknown_key_in_file_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, "model:\n  n_head: 4\n")
    msg = error_of(path)
    assert path in msg and "model.n_head" in msg and "did you mean 'model.n_heads'" in msg


def test_unknown_key_in_wrong_section_suggests_the_right_one():
    msg = error_of(None, ["train.lr=1e-3"])
    assert "command line" in msg and "train.lr" in msg and "optim.lr" in msg


def test_unknown_section():
    assert "unknown key" in error_of(None, ["modle.d_model=3"])


def test_wrong_type_names_key_and_expected_type(tmp_path):
    msg = error_of(write(tmp_path, "train:\n  max_steps: many\n"))
    assert "train.max_steps" in msg and "expected int" in msg and "'many'" in msg
    assert "expected one of 'auto', 'bf16', 'bf16-autocast', 'fp16', 'fp32', 'fp8'" in error_of(None, ["parallel.precision=fp4"])
    assert "expected bool" in error_of(None, ["parallel.compile=maybe"])
    assert "must be a mapping" in error_of(write(tmp_path, "model: 3\n"))


def test_out_of_range_values_name_key_and_range():
    assert "model.n_heads: must divide d_model=256" in error_of(None, ["model.n_heads=3"])
    assert "optim.min_lr: must be between 0 and lr" in error_of(None, ["optim.min_lr=1.0"])
    assert "train.max_steps: must be positive" in error_of(None, ["train.max_steps=0"])
    assert "parallel.offload_params: needs parallel.zero_stage=3" in error_of(None, ["parallel.offload_params=true"])
    assert "model.n_kv_heads: must divide n_heads" in error_of(None, ["model.n_kv_heads=3"])


def test_key_given_twice_is_an_error(tmp_path):
    msg = error_of(write(tmp_path, "optim:\n  lr: 0.1\n  lr: 0.2\n"))
    assert "lr: given twice" in msg and "line 3" in msg


def test_missing_file_and_unknown_preset():
    msg = error_of("configs/nope.yaml")
    assert "no such file or preset 'configs/nope.yaml'" in msg and "debug" in msg
    assert "no such file or preset 'nopreset'" in error_of("nopreset")


def test_bad_yaml_and_bad_override(tmp_path):
    assert "not valid YAML at line" in error_of(write(tmp_path, "model: [\n"))
    assert "key=value" in error_of(None, ["optim.lr"])
    assert "'lr' is not a section" in error_of(None, ["optim.lr.x=1"])


def test_all_keys_mirror_the_dataclasses():
    keys = all_keys()
    assert "model.n_kv_heads" in keys and "parallel.zero_stage" in keys and "preset" in keys
    assert len(keys) == len(set(keys))
    assert Config().model.ffn_dim % 64 == 0


def test_optional_float_takes_null_and_numbers():
    assert load_config(None, ["optim.min_lr_ratio=null"]).optim.min_lr_ratio is None
    cfg = load_config(None, ["optim.lr=2e-3", "optim.min_lr_ratio=0.25"])
    assert cfg.optim.min_lr == pytest.approx(5e-4)
    assert "expected float or null" in error_of(None, ["optim.min_lr_ratio=[1]"])
