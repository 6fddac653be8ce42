"""Hyperparameter sweeps: a grid or random search over dotted config keys, one normal run
directory per trial, results in one CSV. A failed or diverged trial is recorded and the sweep
goes on; running the same sweep again skips the trials already recorded (and a trial that was
cut off mid-run resumes from its last checkpoint, like any run)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from dist_lm.config.schema import UserError
from dist_lm.observe.analysis import read_rows
from dist_lm.train.exits import Exit

DEFAULT_GRID = {"optim.lr": [6e-4, 8e-4, 1e-3, 1.2e-3, 1.5e-3], "optim.min_lr_ratio": [0.1, 0.3, 0.5, 0.7]}
RESULT_COLUMNS = ["status", "best_val_loss", "final_train_loss", "tokens", "seconds", "run_dir"]


@dataclass(frozen=True)
class Trial:
    name: str
    params: dict


def parse_values(text: str) -> tuple[str, list]:
    """'optim.lr=1e-3,2e-3' -> ('optim.lr', [0.001, 0.002]); values read as YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep or not raw:
        raise UserError(f"sweep: --param {text!r}: write KEY=v1,v2,... (e.g. optim.lr=6e-4,1e-3)")
    return key, [_scalar(v) for v in raw.split(",")]


def _scalar(text: str) -> object:
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_distribution(text: str) -> tuple[str, tuple]:
    """'optim.lr=loguniform:1e-4:3e-3' | 'KEY=uniform:a:b' | 'KEY=choice:a,b,c'."""
    key, _, spec = text.partition("=")
    kind, _, args = spec.partition(":")
    try:
        if kind in ("uniform", "loguniform"):
            low, high = (float(v) for v in args.split(":"))
            if kind == "loguniform" and low <= 0:
                raise ValueError
            return key, (kind, low, high)
        if kind == "choice":
            return key, ("choice", [_scalar(v) for v in args.split(",")])
    except ValueError:
        pass
    raise UserError(
        f"sweep: --param {text!r}: with --random write KEY=uniform:LOW:HIGH, KEY=loguniform:LOW:HIGH "
        "(LOW > 0) or KEY=choice:a,b,c"
    )


def grid_trials(axes: dict[str, list]) -> list[Trial]:
    keys = list(axes)
    return [
        Trial(f"trial-{i:03d}", dict(zip(keys, combo)))
        for i, combo in enumerate(itertools.product(*(axes[k] for k in keys)))
    ]


def random_trials(axes: dict[str, tuple], count: int, seed: int) -> list[Trial]:
    rng = random.Random(seed)
    trials = []
    for i in range(count):
        params = {}
        for key, (kind, *args) in axes.items():
            if kind == "uniform":
                params[key] = rng.uniform(*args)
            elif kind == "loguniform":
                params[key] = math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))
            else:
                params[key] = rng.choice(args[0])
        trials.append(Trial(f"trial-{i:03d}", params))
    return trials


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_results(path: Path, keys: list[str], rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["trial", *keys, *RESULT_COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def trial_result(run_dir: Path, returncode: int) -> dict:
    """status (ok, diverged or failed) and the figures of a finished trial's run directory."""
    rows = read_rows(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    train = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    final = train[-1] if train else None
    if returncode == Exit.DIVERGED and train:  # a divergence the trainer detected
        status = "diverged"
    elif returncode != 0:
        status = "failed"
    elif final is None or not math.isfinite(final) or any(v is None or not math.isfinite(v) for v in train):
        status = "diverged"
    else:
        status = "ok"
    finite_vals = [v for v in vals if math.isfinite(v)]
    return {
        "status": status,
        "best_val_loss": min(finite_vals) if finite_vals else "",
        "final_train_loss": final if final is not None else "",
        "tokens": rows[-1]["tokens"] if rows else "",
    }


def run(
    out: Path, config: str, overrides: list[str], trials: list[Trial], launcher: list[str], spec: dict, say=print
) -> list[dict]:
    """Run the trials not yet in OUT/results.csv, one after another. Returns all result rows."""
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / "sweep.json"
    if spec_path.is_file() and json.loads(spec_path.read_text()) != spec:
        raise UserError(
            f"sweep: {out} holds a sweep started with other settings ({spec_path}); "
            "use another --out, or the same arguments to resume it"
        )
    spec_path.write_text(json.dumps(spec, indent=1))
    keys = list(trials[0].params) if trials else []
    results_path = out / "results.csv"
    rows = read_results(results_path)
    done = {r["trial"] for r in rows}
    if done:
        say(f"sweep: {len(done)} of {len(trials)} trials already recorded in {results_path}; running the rest")
    (out / "logs").mkdir(exist_ok=True)
    for trial in trials:
        if trial.name in done:
            continue
        run_dir = out / trial.name
        args = [f"{k}={v}" for k, v in trial.params.items()]
        cmd = [
            *launcher,
            *train_module(launcher),
            "--config",
            config,
            *overrides,
            *args,
            f"run.dir={run_dir}",
            f"run.name={out.name}-{trial.name}",
            "logging.progress=false",
        ]
        say(f"sweep: {trial.name} {' '.join(args)}")
        start = time.perf_counter()
        with open(out / "logs" / f"{trial.name}.log", "w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        result = {
            "trial": trial.name,
            **trial.params,
            **trial_result(run_dir, code),
            "seconds": round(time.perf_counter() - start, 1),
            "run_dir": str(run_dir),
        }
        say(
            f"sweep: {trial.name} {result['status']}, best val loss {result['best_val_loss'] or '-'}"
            + (f" (see {out / 'logs' / (trial.name + '.log')})" if result["status"] != "ok" else "")
        )
        rows.append(result)
        rows.sort(key=lambda r: r["trial"])
        _write_results(results_path, keys, rows)  # after every trial: an interrupted sweep loses nothing
    return rows


def default_launcher() -> list[str]:
    return [sys.executable]


def train_module(launcher: list[str]) -> list[str]:
    """How ``launcher`` is told to run ``dist-lm train``: as a module (python -m, torchrun -m,
    deepspeed --module), so that an installed dist-lm needs no checkout."""
    return ["--module" if Path(launcher[0]).name == "deepspeed" else "-m", "dist_lm", "train"]
