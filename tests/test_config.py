"""Config loading, overrides, and the error message for every kind of bad value."""

from __future__ import annotations

import pytest

from dist_lm.config.io import all_keys, available_presets, from_dict, load_config, to_dict, to_yaml
from dist_lm.config.schema import Config, ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return str(path)


def error_of(config, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(config, list(overrides))
    return str(e.value)


def test_defaults_and_overrides_types():
    cfg = load_config(
        None,
        [
            "optim.lr=3e-4",
            "train.max_steps=200",
            "model.n_kv_heads=null",
            "parallel.activation_checkpointing=true",
            "parallel.zero_stage=3",
            "train.max_tokens=1e6",
            "run.name=abc",
        ],
    )
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
    assert "expected one of 'auto', 'bf16', 'bf16-autocast', 'fp16', 'fp32', 'fp8'" in error_of(
        None, ["parallel.precision=fp4"]
    )
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


def test_async_save_is_auto_on_gpus_unless_set():
    auto = load_config(None, []).checkpoint
    assert auto.async_save == "auto" and auto.saves_async(on_gpu=True) and not auto.saves_async(on_gpu=False)
    for value, saves in (("true", True), ("false", False)):
        chosen = load_config(None, [f"checkpoint.async_save={value}"]).checkpoint
        assert chosen.async_save is saves
        assert chosen.saves_async(on_gpu=True) is saves and chosen.saves_async(on_gpu=False) is saves
    assert "expected bool or one of 'auto'" in error_of(None, ["checkpoint.async_save=sometimes"])


# ------------------------------------------------------------- names and values taken literally
def test_a_field_that_holds_text_takes_the_override_as_written():
    """run.name=007 is "007", not 7 (a run named 007 resumed run 7); 0123 is not 83, 12:30 not 750,
    data.dir=0777 not 511, and a '#' is not a YAML comment."""
    for text in ["007", "0123", "12:30", "a #x", "1e3", "true", "[a]", "2026-12-06"]:
        assert load_config(None, [f"run.name={text}"]).run.name == text
    assert load_config(None, ["data.dir=0777"]).data.dir == "0777"
    assert load_config(None, ["train.sample_prompt= The"]).train.sample_prompt == " The"
    assert load_config(None, ["run.name=null"]).run.name is None  # YAML's null words still mean null
    assert load_config(None, ["logging.wandb_tags=007,a #b"]).logging.wandb_tags == ["007", "a #b"]
    assert load_config(None, ["train.seed=0123"]).train.seed == 83  # a number field reads YAML, as always


def test_a_yaml_file_keeps_the_text_of_a_name_that_looks_like_a_number(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            "run:\n  name: 007\ndata:\n  dir: 0777\ntrain:\n  sample_prompt: 12:30\n"
            "logging:\n  wandb_group: 2026-12-06\n",
        )
    )
    assert (cfg.run.name, cfg.data.dir, cfg.train.sample_prompt) == ("007", "0777", "12:30")
    assert cfg.logging.wandb_group == "2026-12-06"
    assert from_dict(to_dict(cfg), "x").run.name == "007"


@pytest.mark.parametrize("name", [".", "..", ".hidden", "a/b", "a\\nb", " a", "x" * 201])
def test_a_run_name_is_one_plain_directory_name(name):
    assert "run.name" in error_of(None, [f"run.name={name}"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=inf", "optim.lr: must be a finite number, got inf"),
        ("optim.lr=nan", "optim.lr: must be a finite number, got nan"),
        ("model.init_std=.inf", "model.init_std: must be a finite number, got inf"),
        ("optim.min_lr_ratio=-.inf", "optim.min_lr_ratio: must be a finite number"),
        ("train.max_steps=1e30", "train.max_steps: 1000000000000000019884624838656 is out of range"),
        ("train.seed=-1", "train.seed: must be between 0 and 2**53"),
        ("parallel.timeout_minutes=1e300", "parallel.timeout_minutes: must be positive and at most 1e+06"),
        ("data.mixture=[{dir: a, weight: .inf}, {dir: b, weight: 1}]", "weight: must be a finite number"),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_refused(override, message):
    assert message in error_of(None, [override])


def test_mixture_weights_are_normalised_without_overflow():
    """1e308 and 1e308 summed to inf and normalised to 0 and 0 (a validation loss of 0.0, exit 0)."""
    from dist_lm.data.checks import normalised

    assert normalised([1e308, 1e308]) == [0.5, 0.5]
    assert normalised([3.0, 1.0]) == [0.75, 0.25]
    assert normalised([1e-300, 1e-300]) == [0.5, 0.5]


# ------------------------------------------------------------------- any value, any key
def _accepted_config_is_valid(cfg: Config) -> None:
    """What a config that loaded must be: finite numbers in range, and the same after a round trip."""
    import dataclasses
    import math

    from dist_lm.config.errors import MAX_INT

    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        for f in dataclasses.fields(value) if dataclasses.is_dataclass(value) else []:
            v = getattr(value, f.name)
            if isinstance(v, float):
                assert math.isfinite(v), (section.name, f.name, v)
            if isinstance(v, int) and not isinstance(v, bool):
                assert abs(v) <= MAX_INT, (section.name, f.name, v)
    assert from_dict(to_dict(cfg), "round trip") == cfg


def test_any_override_is_accepted_and_valid_or_refused_in_one_line():
    """Property: for any key of the tree and any text, load_config gives a valid config or a
    ConfigError of one line; nothing else (no TypeError, OverflowError, ... from deeper down)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    tricky = st.sampled_from(
        [
            "inf",
            "-inf",
            ".inf",
            "nan",
            ".nan",
            "1e308",
            "1e400",
            "-1",
            "0",
            "007",
            "12:30",
            "0x10",
            "0777",
            "a #x",
            "null",
            "~",
            "",
            "true",
            "yes",
            "[1, 2]",
            "{a: 1}",
            "9007199254740993",
            "-9007199254740993",
            "1.5",
            "[{dir: x, weight: 1e308}]",
            "'",
            '"',
            "mlp,moe",
            "a\x00b",
            "\t",
        ]
    )
    numbers = st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True)).map(str)
    values = st.one_of(tricky, numbers, st.text(max_size=12))

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(key=st.sampled_from([k for k in all_keys() if k != "preset"]), value=values)
    def check(key: str, value: str) -> None:
        try:
            cfg = load_config(None, [f"{key}={value}"])
        except ConfigError as e:
            assert "\n" not in str(e) and key.split(".")[0] in str(e) or "data.mixture" in str(e), str(e)
            return
        _accepted_config_is_valid(cfg)

    check()


def test_a_misspelt_section_suggests_the_section_first():
    """trian.max_steps=5 suggested train.seed (the closest string to 'trian'): now the section."""
    assert "did you mean 'train.max_steps'?" in error_of(None, ["trian.max_steps=5"])
    assert "did you mean 'train'?" in error_of(None, ["trian.nothing=5"])
