"""Predicted against measured peak GPU memory: dist_lm.plan.memory's estimate beside the training
log's peak (torch.cuda.max_memory_allocated) for a few model sizes and ZeRO stages.

    python tools/bench_memory.py [--nproc 2] [--case 'h100-80gb parallel.zero_stage=2' ...]

Each case is a real training run of a few steps (launchers/pretrain.py, with torchrun when
--nproc > 1) with two micro-batches of accumulation, on the embedded corpus. Cases run eager
(parallel.compile=false) unless they set parallel.compile=true: compiling takes minutes, and the
model counts the two ways apart (dist_lm.model.counts.saved_bytes_per_token).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from dist_lm.config.io import load_config
from dist_lm.config.schema import replaced
from dist_lm.data.checks import vocab_size_for
from dist_lm.plan.memory import GB, estimate

ROOT = Path(__file__).resolve().parent.parent
CASES = [
    "debug parallel.zero_stage=0",
    "debug parallel.zero_stage=1",
    "debug parallel.zero_stage=2",
    "debug parallel.zero_stage=3",
    "rtx-12gb parallel.activation_checkpointing=false train.micro_batch_size=16",
    "rtx-12gb parallel.activation_checkpointing=true train.micro_batch_size=8",
    "rtx-24gb parallel.zero_stage=0 parallel.activation_checkpointing=false train.micro_batch_size=4",
    "h100-80gb parallel.zero_stage=1 train.micro_batch_size=8",
    "h100-80gb parallel.zero_stage=2 parallel.activation_checkpointing=true train.micro_batch_size=8",
    "h100-80gb parallel.zero_stage=3 parallel.activation_checkpointing=true train.micro_batch_size=4",
    "rtx-24gb parallel.zero_stage=2 parallel.offload_optimizer=true train.micro_batch_size=4",
    # fp32 weights under autocast (the compiled plans were measured: docs/benchmarks.md, "Memory:
    # predicted against measured")
    "h100-80gb parallel.precision=bf16-autocast parallel.zero_stage=0 parallel.compile=true train.micro_batch_size=8",
]


def run_case(case: str, nproc: int, work: Path) -> dict:
    preset, *overrides = case.split()
    overrides = ["parallel.compile=false", "parallel.precision=bf16", *overrides]  # a case may set either
    overrides += [
        "train.max_steps=3",
        "train.log_interval=1",
        "train.eval_interval=0",
        "checkpoint.interval=0",
        "logging.wandb=disabled",
        "logging.progress=false",
    ]
    cfg = load_config(preset, overrides)
    micro = cfg.train.micro_batch_size
    overrides.append(f"train.global_batch_size={2 * micro * nproc}")  # two micro-batches accumulated
    cfg = load_config(preset, overrides)
    cfg = replaced(cfg, "model", vocab_size=vocab_size_for(cfg))
    predicted = estimate(cfg.model, cfg.parallel, cfg.parallel.precision, micro, nproc, z_loss=cfg.optim.z_loss > 0)
    run_dir = work / f"case{abs(hash(case))}"
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    proc = subprocess.run(
        [*launcher, str(ROOT / "launchers/pretrain.py"), "--config", preset, *overrides, f"run.dir={run_dir}"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return {"case": case, "error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = max(r["peak_mem_gb"] for r in rows if r.get("peak_mem_gb") is not None)
    return {
        "case": case,
        "ranks": nproc,
        "predicted_gb": predicted.total / GB,
        "measured_gb": measured,
        "error": predicted.total / GB / measured - 1,
        "breakdown": predicted.describe(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=1, help="ranks (GPUs) per case")
    p.add_argument("--case", action="append", help="'PRESET override ...' (default: the built-in list)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    results = []
    print("| case | ranks | predicted GB | measured GB | error |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for case in args.case or CASES:
            r = run_case(case, args.nproc, Path(work))
            results.append(r)
            if "measured_gb" in r:
                print(
                    f"| `{case}` | {r['ranks']} | {r['predicted_gb']:.2f} | {r['measured_gb']:.2f} "
                    f"| {r['error']:+.1%} |",
                    flush=True,
                )
                print(f"|   | | {r['breakdown']} | | |", flush=True)
            else:
                print(f"| `{case}` | failed: {r['error']} | | | |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
