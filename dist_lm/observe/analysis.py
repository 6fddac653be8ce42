"""Plots and rankings of runs and sweeps (the library behind `dist-lm analyze`), with matplotlib.

A run directory gets PNGs of loss (train and validation), learning rate, tokens/s and MFU over
steps; several run directories one plot of their training losses and a table of their gaps; a
sweep directory a heatmap of the best validation loss over its two axes, the learning
curves of its best trials, a ranked table and the recommended overrides.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def read_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (None where a figure was not finite)."""
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(run_dir: Path, out: Path) -> list[Path]:
    rows = read_rows(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(rows, "loss"), label="train")
    steps, val = _series(rows, "val_loss")
    if val:
        ax.plot(steps, val, "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss", title=f"{Path(run_dir).name}: loss")
    ax.legend()
    ax.grid(alpha=0.3)
    written.append(_save(fig, out / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(*_series(rows, "lr"))
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax.grid(alpha=0.3)
    written.append(_save(fig, out / "lr.png"))

    fig, left = plt.subplots(figsize=(7, 3))
    left.plot(*_series(rows, "tokens_per_s"), color="tab:blue")
    left.set(xlabel="step", ylabel="tokens/s", title="throughput")
    steps, mfu = _series(rows, "mfu")
    if mfu:  # MFU is known on GPUs of the peak-FLOPs table only
        right = left.twinx()
        right.plot(steps, [100 * m for m in mfu], color="tab:orange")
        right.set_ylabel("MFU %")
    left.grid(alpha=0.3)
    written.append(_save(fig, out / "throughput.png"))
    return written


def checkpoint_summary(rows: list[dict]) -> str | None:
    """What a run's saves cost (the rows each completed checkpoint adds), or None without any:
    how to tell whether checkpoint.async_save or a longer checkpoint.interval would pay."""
    saves = [r for r in rows if r.get("checkpoint_step") is not None]
    if not saves:
        return None
    stood = sum(r["checkpoint_stall_s"] for r in saves)
    elapsed = max(r["elapsed_s"] for r in rows if r.get("elapsed_s") is not None)
    return (
        f"checkpoints: {len(saves)} saved; training stood still {stood:.1f} s for them "
        f"({100 * stood / elapsed:.1f}% of {elapsed:,.1f} s); the longest took "
        f"{max(r['checkpoint_s'] for r in saves):.1f} s to complete"
    )


def compare_runs(run_dirs: list[Path], out: Path) -> tuple[list[dict], Path]:
    """The training losses of several runs on one plot (compare.png), and per run its loss at
    the last step all of them logged, with its gap to the first run's there: how two precisions,
    recipes or settings are compared on the same data."""
    names = [Path(d).name for d in run_dirs]
    if len(set(names)) < len(names):  # runs/a/run against runs/b/run: the paths tell them apart
        names = [str(d) for d in run_dirs]
    series = {name: dict(zip(*_series(read_rows(Path(d)), "loss"))) for name, d in zip(names, run_dirs)}
    shared = set.intersection(*(set(points) for points in series.values()))
    last = max(shared) if shared else None
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in series.items():
        ax.plot(list(points), list(points.values()), label=name)
    ax.set(xlabel="step", ylabel="training loss", title="training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    reference = series[names[0]].get(last)
    table = [
        {
            "run": name,
            "step": last,
            "loss": points.get(last),
            "gap": points[last] / reference - 1 if last is not None and reference else None,
        }
        for name, points in series.items()
    ]
    return table, _save(fig, out / "compare.png")


def comparison_table(table: list[dict]) -> str:
    lines = ["| run | step | training loss | against the first |", "| --- | --- | --- | --- |"]
    for r in table:
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        gap = "-" if r["gap"] is None else f"{100 * r['gap']:+.2f}%"
        lines.append(f"| {r['run']} | {r['step'] if r['step'] is not None else '-'} | {loss} | {gap} |")
    return "\n".join(lines)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _number(text: str) -> float:
    return float(text) if text not in ("", None) else math.nan


def analyze_sweep(sweep_dir: Path, out: Path) -> dict:
    """Plots into ``out``; returns {keys, ranking, failed, best, recommended, files}."""
    spec = json.loads((sweep_dir / "sweep.json").read_text())
    with open(sweep_dir / "results.csv", newline="") as f:
        results = list(csv.DictReader(f))
    keys = spec["keys"]
    ok = [r for r in results if r["status"] == "ok" and math.isfinite(_number(r["best_val_loss"]))]
    ranking = sorted(ok, key=lambda r: _number(r["best_val_loss"]))
    out.mkdir(parents=True, exist_ok=True)
    files = [_heatmap(results, keys, out / "heatmap.png"), _curves(ranking[:5], keys, out / "curves.png")]
    best = ranking[0] if ranking else None
    return {
        "keys": keys,
        "ranking": ranking,
        "failed": [r for r in results if r not in ok],
        "best": best,
        "files": files,
        "recommended": " ".join(f"{k}={best[k]}" for k in keys) if best else None,
    }


def _heatmap(results: list[dict], keys: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 5))
    loss = {
        tuple(r[k] for k in keys): _number(r["best_val_loss"]) if r["status"] == "ok" else math.nan for r in results
    }
    if len(keys) == 2:
        xs = sorted({r[keys[1]] for r in results}, key=_number_or_text)
        ys = sorted({r[keys[0]] for r in results}, key=_number_or_text)
        grid = [[loss.get((y, x), math.nan) for x in xs] for y in ys]
        cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="lightgray")  # failed cells in grey
        image = ax.imshow(grid, cmap=cmap, aspect="auto")
        ax.set_xticks(range(len(xs)), xs)
        ax.set_yticks(range(len(ys)), ys)
        ax.set(xlabel=keys[1], ylabel=keys[0], title="best validation loss (x: failed or diverged)")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if math.isnan(value):
                    ax.text(j, i, "x", ha="center", va="center", color="k")
                else:  # dark text on the light (low-loss) end of the colour map, light text on the dark end
                    light = image.norm(value) < 0.5
                    ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="k" if light else "w")
        fig.colorbar(image)
    else:  # one axis, or more than two: best validation loss against the first
        points = sorted((_number_or_text(k[0]), v) for k, v in loss.items())
        ax.plot([p[0] for p in points], [p[1] for p in points], "o")
        ax.set(xlabel=keys[0], ylabel="best validation loss", title="sweep")
    return _save(fig, path)


def _number_or_text(value: str):
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.inf  # text values sort last


def _curves(top: list[dict], keys: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in top:
        rows = read_rows(Path(r["run_dir"]))
        steps, val = _series(rows, "val_loss")
        if not val:
            steps, val = _series(rows, "loss")
        ax.plot(steps, val, "o-", label=f"{r['trial']}: " + " ".join(f"{k.split('.')[-1]}={r[k]}" for k in keys))
    ax.set(xlabel="step", ylabel="validation loss", title=f"top {len(top)} trials")
    ax.grid(alpha=0.3)
    if top:
        ax.legend(fontsize=8)
    return _save(fig, path)


def ranking_table(ranking: list[dict], keys: list[str]) -> str:
    lines = [
        "| rank | trial | " + " | ".join(keys) + " | best val loss | final train loss |",
        "| --- | --- | " + " | ".join("---" for _ in keys) + " | --- | --- |",
    ]
    for i, r in enumerate(ranking, 1):
        lines.append(
            f"| {i} | {r['trial']} | "
            + " | ".join(r[k] for k in keys)
            + f" | {_number(r['best_val_loss']):.4f} | {_number(r['final_train_loss']):.4f} |"
        )
    return "\n".join(lines)
