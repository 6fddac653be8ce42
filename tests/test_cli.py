"""The entry point with bad input: one line naming what is wrong, exit status 2, nothing written.
And the single-process debug mode."""

from __future__ import annotations

from conftest import assert_ok, launch, read_metrics


def bad(env, args) -> str:
    proc = launch("python", args, env)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "dist-lm:" not in proc.stdout  # failed before the process group started
    return lines[0]


def test_missing_config_file(env):
    assert "no such file or preset 'configs/missing.yaml'" in bad(env, ["--config", "configs/missing.yaml"])


def test_unknown_preset_lists_the_presets(env):
    line = bad(env, ["--config", "h100-80GB"])
    assert "'h100-80GB'" in line and "h100-80gb" in line


def test_bad_override(env):
    assert "optim.lr: expected float, got 'fast'" in bad(env, ["--config", "debug", "optim.lr=fast"])
    assert "did you mean 'train.max_steps'" in bad(env, ["--config", "debug", "train.max_step=3"])


def test_missing_data_dir(env, tmp_path):
    line = bad(env, ["--config", "debug", f"data.dir={tmp_path / 'nothing'}", f"run.dir={tmp_path / 'run'}"])
    assert f"data.dir={tmp_path / 'nothing'} does not exist" in line
    assert not (tmp_path / "run").exists()


def test_data_dir_without_meta(env, tmp_path):
    assert "meta.json is missing" in bad(env, ["--config", "debug", f"data.dir={tmp_path}"])


def test_indivisible_batch(env):
    line = bad(env, ["--config", "debug", "train.micro_batch_size=3", "train.global_batch_size=8"])
    assert "train.global_batch_size: 8 is not a multiple" in line


def test_existing_run_dir_is_untouched_by_a_bad_config(env, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("precious")
    bad(env, ["--config", "debug", "model.n_heads=5", f"run.dir={run}"])
    assert (run / "config.yaml").read_text() == "precious" and sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_print_config_shows_the_resolved_values(env, tmp_path):
    proc = launch("python", ["--config", "debug", "optim.lr=0.005", "--print-config", f"run.dir={tmp_path / 'r'}"], env)
    assert_ok(proc)
    assert "lr: 0.005" in proc.stdout and "preset: debug" in proc.stdout
    assert not (tmp_path / "r").exists()


def test_preset_is_another_name_for_config(env, tmp_path):
    args = ["debug", "optim.lr=0.005", "--print-config", f"run.dir={tmp_path / 'r'}"]
    by_config, by_preset = launch("python", ["--config", *args], env), launch("python", ["--preset", *args], env)
    assert_ok(by_config)
    assert_ok(by_preset)
    assert by_preset.stdout == by_config.stdout and "preset: debug" in by_preset.stdout
    assert not (tmp_path / "r").exists()


def test_debug_mode_runs_a_handful_of_logged_steps(env, ds_ops, tmp_path):
    proc = launch("python", ["--debug", f"run.dir={tmp_path}"], env)
    assert_ok(proc)
    assert "precision fp32" in proc.stdout
    train, evals = read_metrics(tmp_path)
    assert [r["step"] for r in train] == list(range(1, 11)) and [r["step"] for r in evals] == [5, 10]


def test_debug_mode_names_the_first_non_finite_gradient(env, ds_ops, tmp_path):
    # A huge init blows up the embeddings' gradient while RMSNorm keeps the loss itself finite.
    proc = launch("python", ["--debug", "model.init_std=1e30", f"run.dir={tmp_path}"], env)
    assert proc.returncode == 1
    assert "step 1: gradient of tok_embeddings.weight is not finite" in proc.stderr  # the first step is 1


def test_debug_mode_refuses_a_launcher(env, tmp_path):
    proc = launch("torchrun", ["--debug", f"run.dir={tmp_path}"], env)
    assert proc.returncode != 0 and "--debug runs one process" in proc.stderr
