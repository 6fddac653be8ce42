"""Monitoring: wandb offline (read back from its own run file), metrics.csv/jsonl, TensorBoard,
early stopping, sweeps and the analysis plots. Real runs of the entry point throughout."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, assert_ok, launch, read_metrics
from dist_lm.observe.metrics import RunSummary
from dist_lm.observe.sinks import COLUMNS, CsvSink, JsonlSink, SampleLog, drop_rows_after, read_sample_log
from wandb_records import history, records, run_id

SECRET = "dist-lm-test-secret-7f3a9c"  # must never reach the run directory
SHORT = ["--config", "debug", "train.max_steps=4", "train.log_interval=1", "train.eval_interval=2"]


def wandb_files(run: Path) -> list[Path]:
    return sorted(run.glob("wandb/offline-run-*/run-*.wandb"))


def without_wandb_settings(env: dict) -> dict:
    """The launch environment without WANDB_* variables (conftest's child_env disables wandb)."""
    return {k: v for k, v in env.items() if not k.startswith("WANDB_")}


def test_offline_wandb_holds_the_logged_metrics_and_no_secret(env, ds_ops, tmp_path):
    run = tmp_path / "run"
    proc = launch(
        "python",
        [*SHORT, "logging.wandb=offline", "logging.wandb_tags=a,b", f"run.dir={run}"],
        {**without_wandb_settings(env), "WANDB_API_KEY": SECRET},
    )
    assert_ok(proc)
    (wandb_file,) = wandb_files(run)
    logged = {row["_step"]: row for row in history(wandb_file)}
    ours, _ = read_metrics(run)
    assert sorted(logged) == [1, 2, 3, 4]
    for row in ours:
        assert logged[row["step"]]["loss"] == pytest.approx(row["loss"])
        assert logged[row["step"]]["tokens_per_s"] == pytest.approx(row["tokens_per_s"])
    assert logged[2]["val_loss"] == pytest.approx(next(r["val_loss"] for r in ours if r["step"] == 2))
    run_record = next(r.run for r in records(wandb_file) if r.WhichOneof("record_type") == "run")
    assert json.loads(next(i.value_json for i in run_record.config.update if i.key == "model"))["d_model"] == 128
    assert list(run_record.tags) == ["a", "b"]
    assert run_id(wandb_file) == (run / "wandb-run-id").read_text()
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_auto_without_a_key_logs_offline_and_says_how_to_sync(env, ds_ops, tmp_path):
    run = tmp_path / "run"
    env = without_wandb_settings(env)
    proc = launch("python", [*SHORT, f"run.dir={run}"], {**env, "HOME": str(tmp_path)})  # no ~/.netrc either
    assert_ok(proc)
    assert "wandb: no wandb API key configured: logging offline" in proc.stdout and "wandb sync " in proc.stdout
    assert len(wandb_files(run)) == 1


def test_resuming_continues_the_same_wandb_run(env, ds_ops, tmp_path):
    run = tmp_path / "run"
    env = without_wandb_settings(env)
    args = [
        "--config",
        "debug",
        "train.log_interval=1",
        "train.eval_interval=0",
        "logging.wandb=offline",
        f"run.dir={run}",
    ]
    assert_ok(launch("python", [*args, "train.max_steps=2"], env))
    assert_ok(launch("python", [*args, "train.max_steps=4"], env))
    first, second = wandb_files(run)
    assert run_id(first) == run_id(second) == (run / "wandb-run-id").read_text()
    assert [r["_step"] for r in history(second)] == [3, 4]


def test_metrics_csv_and_jsonl_columns_and_values(env, ds_ops, tmp_path):
    run = tmp_path / "run"
    assert_ok(launch("python", [*SHORT, "train.eval_samples=512", "logging.wandb=disabled", f"run.dir={run}"], env))
    with open(run / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [int(r["step"]) for r in rows] == [r["step"] for r in jsonl] == [1, 2, 3, 4, 4]
    # the last row is the checkpoint saved at the end: its step, how long training stood still for
    # it (all of a synchronous save), how long it took; no training figures
    (saved,) = [r for r in jsonl if "checkpoint_step" in r]
    assert saved["checkpoint_step"] == 4 and saved["checkpoint_stall_s"] == saved["checkpoint_s"] > 0
    assert "loss" not in saved and rows[-1]["loss"] == "" and float(rows[-1]["checkpoint_s"]) > 0
    rows = rows[:-1]
    for r in rows:
        assert 0 < float(r["loss"]) < 20 and float(r["lr"]) > 0 and float(r["tokens_per_s"]) > 0
        assert float(r["step_time"]) > 0 and float(r["grad_norm"]) > 0 and float(r["peak_mem_gb"]) > 0
        assert r["mfu"] == ""  # unknown on CPU: left empty rather than guessed
    assert [float(r["val_loss"]) > 0 for r in rows if r["val_loss"]] == [True, True]
    assert [int(r["tokens"]) for r in rows] == [1024, 2048, 3072, 4096]  # 8 sequences x 128 tokens a step
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    # step_time and tokens/s time training steps: the evaluation after step 2 (512 samples, a few
    # steps' worth) is in the time between rows 2 and 3, not in row 3's step_time.
    step_time = [float(r["step_time"]) for r in rows]
    evaluation = elapsed[1] - elapsed[0] - step_time[1]
    assert evaluation > 2 * step_time[1] and step_time[2] <= elapsed[2] - elapsed[1] + 0.01, (evaluation, step_time)
    summary = RunSummary.read(run)  # what tools read instead of the log
    assert (summary.launcher, summary.world_size, summary.precision, summary.global_batch_size) == (
        "none",
        1,
        "fp32",
        8,
    )
    assert summary.first_step_s > 0 and summary.start_step == 0 and summary.predicted_peak_mem_gb is None  # (CPU)


def test_tensorboard_option(env, ds_ops, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert_ok(launch("python", [*SHORT, "logging.wandb=disabled", "logging.tensorboard=true", f"run.dir={run}"], env))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val_loss")] == [2, 4]


def test_profiling_a_few_steps(env, ds_ops, tmp_path):
    import gzip

    run = tmp_path / "run"
    proc = launch(
        "python",
        [*SHORT, "logging.wandb=disabled", "logging.profile_start=2", "logging.profile_steps=2", f"run.dir={run}"],
        env,
    )
    assert_ok(proc)
    assert "profile of steps 2-3: " in proc.stdout and f"trace and table in {run / 'profile'}" in proc.stdout
    trace = json.loads(gzip.decompress((run / "profile" / "rank0-trace.json.gz").read_bytes()))
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])
    table = (run / "profile" / "rank0-ops.txt").read_text()
    assert table.startswith("steps 2-3: ") and "aten::mm" in table
    assert [r["step"] for r in read_metrics(run)[0]] == [1, 2, 3, 4]  # the run itself goes on as usual
    gaps = tool("trace_gaps.py", run / "profile" / "rank0-trace.json.gz")
    assert gaps.returncode == 0 and "no GPU work in the trace" in gaps.stdout, gaps.stderr  # (a CPU run)


def test_gpu_busy_time_counts_overlapping_kernels_once():
    from types import SimpleNamespace as Event

    from torch.autograd import DeviceType

    from dist_lm.observe.profiling import busy_and_idle, busy_seconds

    def event(device, start_us, end_us):
        return Event(device_type=device, time_range=Event(start=start_us, end=end_us))

    kernels = [event(DeviceType.CUDA, 30, 40), event(DeviceType.CUDA, 0, 10), event(DeviceType.CUDA, 5, 20)]
    assert busy_seconds([*kernels, event(DeviceType.CPU, 0, 100)]) == pytest.approx(30e-6)
    assert busy_seconds([]) == 0
    spans = [(30, 40), (0, 10), (5, 20), (41, 45)]
    assert busy_and_idle(spans, min_gap=5) == (34, [(20, 30)])  # the 1 us gap before 41 is too short to list


def test_early_stopping_on_validation_patience(env, ds_ops, tmp_path):
    run = tmp_path / "run"
    # A learning rate this small cannot improve validation loss by 0.5 per evaluation.
    proc = launch(
        "python",
        [
            "--config",
            "debug",
            "train.max_steps=20",
            "train.eval_interval=1",
            "optim.lr=1e-9",
            "optim.min_lr=0",
            "train.early_stop_patience=2",
            "train.early_stop_min_delta=0.5",
            "logging.wandb=disabled",
            f"run.dir={run}",
        ],
        env,
    )
    assert_ok(proc)
    assert "early stop at step 3: 2 evaluations without improving" in proc.stdout
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000003"


def tool(name: str, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / name), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_sweep_survives_a_failed_trial_resumes_and_is_analyzed(env, ds_ops, tmp_path):
    out = tmp_path / "sweep"
    # micro 4 x global 6 cannot be split (found only when that trial starts): one of four fails.
    args = [
        "--config",
        "debug",
        "--out",
        out,
        "--param",
        "train.micro_batch_size=2,4",
        "--param",
        "train.global_batch_size=8,6",
        "train.max_steps=4",
        "train.eval_interval=2",
        "logging.wandb=disabled",
    ]
    proc = tool("sweep.py", *args, env=env)
    assert_ok(proc)
    assert "4 trials (3 ok, 0 diverged, 1 failed)" in proc.stdout
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["train.micro_batch_size"], r["train.global_batch_size"], r["status"]) for r in rows] == [
        ("2", "8", "ok"),
        ("2", "6", "ok"),
        ("4", "8", "ok"),
        ("4", "6", "failed"),
    ]
    assert all(float(r["best_val_loss"]) > 0 for r in rows[:3])
    assert "is not a multiple" in (out / "logs" / "trial-003.log").read_text()

    # An interrupted sweep: trial-001's row is gone; running again runs only that trial.
    with open(out / "results.csv", newline="") as f:
        lines = f.read().splitlines()
    (out / "results.csv").write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    proc = tool("sweep.py", *args, env=env)
    assert_ok(proc)
    assert "3 of 4 trials already recorded" in proc.stdout
    assert proc.stdout.count("sweep: trial-") == 2  # started and finished lines of trial-001 only
    with open(out / "results.csv", newline="") as f:
        assert [r["trial"] for r in csv.DictReader(f)] == ["trial-000", "trial-001", "trial-002", "trial-003"]

    proc = tool("analyze.py", out, "--out", tmp_path / "plots")
    assert_ok(proc)
    best = min(rows[:3], key=lambda r: float(r["best_val_loss"]))
    assert f"best: {best['trial']}" in proc.stdout
    assert (
        f"recommended overrides: train.micro_batch_size={best['train.micro_batch_size']} "
        f"train.global_batch_size={best['train.global_batch_size']}"
    ) in proc.stdout
    assert "trial-003: failed" in proc.stdout
    for name in ("heatmap.png", "curves.png"):
        assert_png(tmp_path / "plots" / name)


def test_a_sweep_refuses_other_settings_in_the_same_directory(env, tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"config": "other"}))
    proc = tool("sweep.py", "--config", "debug", "--out", out, "--param", "optim.lr=1e-3", env=env)
    assert proc.returncode == 2 and "started with other settings" in proc.stderr


def test_analyze_a_run(env, ds_ops, tmp_path):
    run = tmp_path / "run"
    assert_ok(launch("python", [*SHORT, "logging.wandb=disabled", f"run.dir={run}"], env))
    proc = tool("analyze.py", run, "--out", tmp_path / "plots")
    assert_ok(proc)
    for name in ("loss.png", "lr.png", "throughput.png"):
        assert_png(tmp_path / "plots" / name)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (saved,) = [r for r in rows if "checkpoint_step" in r]  # the one at the end
    stood = f"{saved['checkpoint_stall_s']:.1f}"
    assert f"checkpoints: 1 saved; training stood still {stood} s for them (" in proc.stdout, proc.stdout


def test_analyze_compares_runs_at_the_last_step_they_share(tmp_path):
    """Several run directories: one plot of their training losses, and each run's gap to the
    first at the last step all of them logged (how fp8 is compared with bf16 in the docs)."""
    for name, losses in {"bf16": {10: 6.0, 20: 4.0, 30: 3.0}, "fp8": {10: 6.1, 20: 4.2}}.items():
        (tmp_path / name).mkdir()
        rows = [{"step": step, "loss": loss} for step, loss in losses.items()] + [{"step": 20, "val_loss": 9.0}]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = tool("analyze.py", tmp_path / "bf16", tmp_path / "fp8", "--out", tmp_path / "plots")
    assert_ok(proc)
    assert "| bf16 | 20 | 4.0000 | +0.00% |" in proc.stdout and "| fp8 | 20 | 4.2000 | +5.00% |" in proc.stdout
    assert_png(tmp_path / "plots" / "compare.png")
    refused = tool("analyze.py", tmp_path / "bf16", tmp_path / "plots", "--out", tmp_path / "plots")
    assert refused.returncode == 2 and "has no metrics.jsonl" in refused.stderr


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path


def test_the_csv_refuses_a_metric_it_has_no_column_for(tmp_path):
    sink = CsvSink(tmp_path / "metrics.csv")
    sink.write({"step": 1, "loss": 2.0})
    with pytest.raises(ValueError, match="no column for tokens_per_gpu: add it to dist_lm.observe.sinks.COLUMNS"):
        sink.write({"step": 2, "tokens_per_gpu": 5.0})
    sink.close()


def test_a_resumed_csv_of_fewer_columns_gets_the_header_of_this_version(tmp_path):
    """A run resumed under a version with more columns: the header grows, and the old rows are
    rewritten under it, each figure under its name (a mixture's columns come after COLUMNS, so
    the new columns land between them)."""
    path = tmp_path / "metrics.csv"
    old = [*COLUMNS[: COLUMNS.index("checkpoint_step")], "val_loss_web"]
    path.write_text(",".join(old) + "\n" + ",".join(["1", "1024", "9.5"] + [""] * (len(old) - 4) + ["7.5"]) + "\n")
    sink = CsvSink(path, ["val_loss_web"])
    sink.write({"step": 2, "loss": 9.0, "checkpoint_step": 2})
    sink.close()
    rows = list(csv.DictReader(open(path)))
    assert [(r["step"], r["loss"], r["checkpoint_step"]) for r in rows] == [("1", "9.5", ""), ("2", "9.0", "2")]
    assert [r["val_loss_web"] for r in rows] == ["7.5", ""]
    assert open(path).readline().strip().split(",") == [*COLUMNS, "val_loss_web"]


def test_drop_rows_after_keeps_earlier_steps_and_removes_a_torn_line(tmp_path):
    sinks = [JsonlSink(tmp_path / "metrics.jsonl"), CsvSink(tmp_path / "metrics.csv")]
    for step in range(1, 7):
        for sink in sinks:
            sink.write({"step": step, "loss": 10.0 - step})
    for sink in sinks:
        sink.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a process killed while writing
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("7,")
    assert drop_rows_after(tmp_path, 4) == 3  # steps 5 and 6, and the torn line
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == "6.0"
    assert drop_rows_after(tmp_path, 4) == 0 and sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.csv",
        "metrics.jsonl",
    ]


def test_sample_logs_hold_each_step_once_after_a_restart_on_fewer_ranks(tmp_path):
    """Two ranks logged steps 1-5 (rank 1 was killed mid-line); the run goes on from step 3 on
    one rank: rank 0 trims its own file and rank 1's."""
    logs = [SampleLog(tmp_path, rank, 2, 0) for rank in (0, 1)]
    for step in range(1, 6):
        for rank, log in enumerate(logs):
            log.write(step, [10 * step + 2 * rank, 10 * step + 2 * rank + 1])
    for log in logs:
        log.close()
    with open(tmp_path / "samples" / "rank1.txt", "a") as f:
        f.write("6: 60 6")
    log = SampleLog(tmp_path, 0, 1, 3)
    log.write(4, [40, 41, 42, 43])
    log.close()
    assert read_sample_log(tmp_path / "samples" / "rank0.txt") == {
        1: [10, 11],
        2: [20, 21],
        3: [30, 31],
        4: [40, 41, 42, 43],
    }
    assert read_sample_log(tmp_path / "samples" / "rank1.txt") == {1: [12, 13], 2: [22, 23], 3: [32, 33]}
    SampleLog(tmp_path, 0, 1, 0).close()  # a fresh start in the same run directory
    assert [p.read_text() for p in sorted((tmp_path / "samples").iterdir())] == ["", ""]


@pytest.fixture
def wandb_server_refusing_the_key():
    """A local HTTP server that answers every request 401, as wandb's does for a bad API key."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"errors":[{"message":"user is not logged in"}]}')

        do_GET = do_POST

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("setting", ["auto", "online"])
def test_a_bad_wandb_key_falls_back_offline_under_auto_and_fails_online_in_one_line(
    env, ds_ops, tmp_path, wandb_server_refusing_the_key, setting
):
    run = tmp_path / "run"
    proc = launch(
        "python",
        [*SHORT, f"logging.wandb={setting}", f"run.dir={run}"],
        {
            **without_wandb_settings(env),
            "WANDB_API_KEY": "0" * 40,
            "WANDB_INIT_TIMEOUT": "10",
            "WANDB_BASE_URL": wandb_server_refusing_the_key,
            "HOME": str(tmp_path),
        },
    )
    if setting == "auto":
        assert_ok(proc)
        assert "warning: wandb: could not start online (" in proc.stderr and "logging offline to " in proc.stderr
        assert len(wandb_files(run)) == 1 and [r["step"] for r in read_metrics(run)[0]] == [1, 2, 3, 4]
        assert "Traceback" not in proc.stderr
    else:
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]  # one line
        assert proc.stderr.startswith("error: config error: logging.wandb: is online but wandb could not start (")
        assert "user is not logged in" in proc.stderr and "set logging.wandb=offline" in proc.stderr
