"""The entry point with bad input: one line naming what is wrong, exit status 2, nothing written.
And the single-process debug mode."""

from __future__ import annotations

import subprocess
import sys

import pytest

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


# ------------------------------------------------------- where a run may write (reliability #1, #15)
def test_run_name_dot_dot_is_refused_before_anything_is_written(env):
    """run.name=.. made the current directory the run directory: the user's config.yaml and
    run.json there were overwritten. Now a config error, before torch is imported."""
    for name in ("..", "."):
        assert f"run.name: '{name}' starts with '.'" in bad(env, ["--config", "debug", f"run.name={name}"])


def test_a_run_never_starts_in_a_directory_of_someone_elses_files(env, ds_ops, tmp_path):
    """run.dir naming a directory that holds files but is no run's (no .lock): one line, exit 2,
    and every file there as it was (before: config.yaml and run.json overwritten, train.log
    appended to, then a KeyError traceback from the user's own metrics.jsonl)."""
    project = tmp_path / "project"
    project.mkdir()
    files = {"config.yaml": "mine: 1\n", "run.json": "{}", "metrics.jsonl": '{"loss": 1}\n', "train.log": "x\n"}
    for name, text in files.items():
        (project / name).write_text(text)
    proc = launch("python", ["--config", "debug", f"run.dir={project}"], env)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert (
        len(lines) == 1
        and f"{project} holds files (config.yaml, metrics.jsonl, run.json, ...) and is not a run directory" in lines[0]
    ), proc.stderr
    assert {p.name: p.read_text() for p in project.iterdir()} == files


def test_default_run_names_started_in_the_same_second_differ():
    """The default name was the preset and the second: runs started together (a sweep's, a job
    array's) shared a directory and all but one were refused."""
    from dist_lm.train.run_directory import default_run_name

    names = [default_run_name("debug") for _ in range(20)]
    assert len(set(names)) == len(names) and all(n.startswith("debug-") for n in names)


# ------------------------------------------------------------- tool arguments (reliability #11)
@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "RUN", "--temperature", "inf"], "argument --temperature: inf is outside [0, 1e+06]"),
        (["generate", "RUN", "--top-p", "0"], "argument --top-p: 0 is outside (0, 1]"),
        (["generate", "RUN", "--seed", "-3"], "argument --seed: -3 is outside [0, 9007199254740992]"),
        (["generate", "RUN", "--max-tokens", "1e99"], "argument --max-tokens: '1e99' is not an integer"),
        (["evaluate", "RUN", "--samples", "0"], "argument --samples: 0 is outside [1, 9007199254740992]"),
        (["prepare", "x.txt", "--out", "o", "--val-fraction", "nan"], "argument --val-fraction: nan is outside [0, 1)"),
        (
            ["prepare", "x.txt", "--out", "o", "--vocab-size", "99999999999"],
            "argument --vocab-size: 99999999999 is outside",
        ),
        (["plan", "--gpus", "1", "--compute-capability", "eight"], "'eight' is not a compute capability like 8.6"),
        (["train", "--max_steps", "20"], "config keys are set as section.key=value, e.g. train.max_steps=..."),
    ],
)
def test_a_bad_tool_argument_gets_one_line_and_status_2(env, tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "dist_lm", *args], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("error: "), proc.stderr


def test_any_tool_argument_is_accepted_or_refused_in_one_line(tmp_path):
    """Property: any value of a numeric argument of generate, evaluate or prepare ends in exit
    status 2 with one line here (the checkpoint and the input do not exist, so an accepted value
    fails on them), never in a traceback."""
    import contextlib
    import io

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from dist_lm.commands import evaluate, generate, prepare

    options = {
        generate: ["--max-tokens", "--temperature", "--top-k", "--top-p", "--seed"],
        evaluate: ["--samples", "--micro-batch"],
        prepare: ["--workers", "--val-fraction", "--seed", "--shard-tokens", "--vocab-size"],
    }
    values = st.one_of(
        st.sampled_from(["inf", "nan", "-0", "1e400", "0x1f", "", " ", "1_000", "-1"]),
        st.integers().map(str),
        st.floats().map(str),
        st.text(max_size=8),
    )
    missing = str(tmp_path / "missing")

    @settings(max_examples=150, deadline=None)
    @given(command=st.sampled_from(list(options)), data=st.data())
    def check(command, data) -> None:
        option, value = data.draw(st.sampled_from(options[command])), data.draw(values)
        argv = [missing, "--out", str(tmp_path / "out")] if command is prepare else [missing]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                status = command.main([*argv, f"{option}={value}"])
            except SystemExit as e:
                status = e.code
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), (option, value, err.getvalue())

    check()


def test_a_batch_the_ranks_cannot_split_is_refused_before_torch_is_imported():
    """train.global_batch_size=10 took 9 s to refuse (after importing torch and DeepSpeed), while
    every other config error took under 0.3 s: the launcher's rank count is read without torch."""
    code = (
        "import sys; from dist_lm.commands import train; "
        "status = train.main(['--config', 'debug', 'train.global_batch_size=10']); "
        "print(status, 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr
    assert "train.global_batch_size: 10 is not a multiple of micro_batch_size x data-parallel ranks" in proc.stderr


def test_zero_plus_plus_quantized_collectives_are_refused_on_the_cpu(env, tmp_path):
    line = bad(
        env,
        [
            "--config",
            "debug",
            "parallel.zero_stage=3",
            "parallel.zero_quantized_gradients=true",
            f"run.dir={tmp_path / 'run'}",
        ],
    )
    assert "parallel.zero_quantized_gradients: DeepSpeed's quantized collectives are CUDA kernels" in line
    assert not (tmp_path / "run").exists()
