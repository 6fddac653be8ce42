"""What runs and checkpoints there are, read from their metadata alone (config.yaml, each
checkpoint's state.json, file sizes): no tensor is loaded. `dist-lm runs` prints it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import yaml

from dist_lm.config.run_sections import CheckpointConfig
from dist_lm.store import checkpoints
from dist_lm.store.state import RunState


def _configured(run_dir: Path, section: str, key: str) -> str | None:
    """One text value of the run's config.yaml, or None where it is not there or unreadable."""
    try:
        value = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get(section, {}).get(key)
    except (OSError, yaml.YAMLError, AttributeError):
        value = None
    return str(value) if value else None


def _checkpoint_root(run_dir: Path) -> Path:
    return CheckpointConfig(dir=_configured(run_dir, "checkpoint", "dir")).root(run_dir)


def list_runs(root: Path) -> list[dict]:
    """One row per checkpoint (or per run without one) of the run directories under ``root``
    (or of ``root`` itself if it is a run directory)."""
    root = Path(root)
    run_dirs = (
        [root]
        if (root / "config.yaml").is_file()
        else sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.yaml").is_file())
        if root.is_dir()
        else []
    )
    rows = []
    for run_dir in run_dirs:
        ckpt_root = _checkpoint_root(run_dir)
        tags = (
            sorted(
                (p for p in ckpt_root.iterdir() if p.is_dir() and checkpoints.step_of(p) is not None),
                key=checkpoints.step_of,
            )
            if ckpt_root.is_dir()
            else []
        )
        latest, best = (_pointer(ckpt_root / name) for name in (checkpoints.LATEST, checkpoints.BEST))
        started_from = _configured(run_dir, "model", "init_from")  # a Hugging Face model, or None: from scratch
        if not tags:
            rows.append({"run": run_dir.name, "checkpoint": None, "init_from": started_from})
        for tag in tags:
            problem = checkpoints.problem_with(tag)
            state = asdict(RunState.read(tag)) if problem is None else {}
            rows.append(
                {
                    "run": run_dir.name,
                    "checkpoint": tag.name,
                    "latest": tag.name == latest,
                    "best": tag.name == best,
                    "problem": problem,
                    "precision": state.get("precision"),
                    "step": state.get("step"),
                    "tokens": state.get("tokens"),
                    "val_loss": state.get("val_loss"),
                    "best_val_loss": state.get("best_val_loss"),
                    "parameters": state.get("parameters"),
                    "world_size": state.get("world_size"),
                    "zero_stage": state.get("zero_stage"),
                    "init_from": started_from,
                    "bytes": sum(f.stat().st_size for f in tag.rglob("*") if f.is_file()),
                    "path": str(tag),
                }
            )
    return rows


def _pointer(path: Path) -> str | None:
    """The tag a pointer file (latest, best) names, if it is there."""
    return path.read_text().strip() if path.is_file() else None


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: list[dict]) -> str:
    header = [
        "run",
        "checkpoint",
        "step",
        "tokens",
        "val loss",
        "best val",
        "params",
        "precision",
        "ranks x ZeRO",
        "size",
        "started from",
    ]
    lines = [header]
    for r in rows:
        if r["checkpoint"] is None:
            lines.append([r["run"], "(none)"] + ["-"] * 8 + [r["init_from"] or "scratch"])
            continue
        marks = [mark for mark in ("latest", "best") if r[mark]]
        name = r["checkpoint"] + (f" ({', '.join(marks)})" if marks else "") + (" INCOMPLETE" if r["problem"] else "")
        ranks = f"{r['world_size']} x {r['zero_stage']}" if r["world_size"] is not None else "-"
        params = "-" if r["parameters"] is None else f"{r['parameters'] / 1e6:.1f}M"
        lines.append(
            [
                r["run"],
                name,
                _num(r["step"], "d"),
                _num(r["tokens"], ","),
                _num(r["val_loss"], ".4f"),
                _num(r["best_val_loss"], ".4f"),
                params,
                r["precision"] or "-",
                ranks,
                f"{r['bytes'] / 1e6:.1f} MB",
                r["init_from"] or "scratch",
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)
