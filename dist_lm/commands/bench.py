"""Throughput benchmark: the real training step through the DeepSpeed engine, per variant, beside
the same model in plain PyTorch (torch.compile, fused AdamW, bf16 autocast) on the same data.

    dist-lm bench --config h100-80gb [--steps 10 --warmup 5] [--accum 1] [--ranks 1,2] [--baseline]
        [--variant 'zero2: parallel.zero_stage=2'] [section.key=value ...]

Each variant is a real run of `dist-lm train` (engine forward, backward, step, data from
the sampler) for warmup + steps optimizer steps of --accum micro-batches each (1: every
micro-batch is an optimizer step, the engine's worst case; the presets accumulate 32-64). Its
figures are the training log's over the timed steps (tokens/s, TFLOP/s and MFU by the log's
own FLOPs-per-token formula, peak memory, step time),
plus the time from start to the first optimizer step and the memory model's predicted peak.
--ranks 1,2 runs every variant on one GPU and again on two under torchrun (NCCL), with the same
micro-batches per rank, and prints each variant's scaling: its tokens/s over its one-rank row's.
--baseline adds a row for plain PyTorch, measured in this process before the variants, with the
share of its step time spent waiting for data. It trains as the variants train (dist_lm.train.plain:
the same seed, data, AdamW settings and learning rate at every step).
--profile DIR: after the timed steps, each variant (and the baseline) runs 3 more under
torch.profiler; DIR/<variant>-ops.txt gets the costliest operations and how busy the GPU was
(dist_lm.observe.profiling), DIR/<variant>-trace.json.gz the Chrome trace. Profiled steps are not timed.
Prints one markdown table row per variant; a variant that fails, times out (--timeout) or runs no
timed step gets a row that says so, with its exit status and the last line of its log, and the
bench then ends with exit status 1 (after every row) so that a script does not read the table as whole.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dist_lm.commands.arguments import Parser, integer
from dist_lm.config.schema import UserError
from dist_lm.observe import metrics

PROFILED_STEPS = 3
DEFAULT_VARIANTS = [
    "zero1: parallel.zero_stage=1",
    "zero2: parallel.zero_stage=2",
    "zero1+compile: parallel.zero_stage=1 parallel.compile=true",
]


def file_name(variant: str) -> str:
    return re.sub(r"\W+", "-", variant.strip()).strip("-")


def batch_override(config: str, overrides: list[str], accum: int, ranks: int = 1) -> str:
    """train.global_batch_size for ``accum`` micro-batches per optimizer step on each of ``ranks`` GPUs."""
    from dist_lm.config.batch import BatchSizes
    from dist_lm.config.io import load_config

    micro = load_config(config, overrides).train.micro_batch_size
    return f"train.global_batch_size={BatchSizes(micro, accum, ranks).global_batch_size}"


def run_logged(cmd: list[str], log: Path, timeout: float) -> int | None:
    """Run ``cmd`` with its output in ``log``; its exit status, or None if it ran past ``timeout``
    seconds (then it and every process it started are killed: torchrun's ranks, compile workers)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def run_variant(
    config: str,
    overrides: list[str],
    variant: str,
    steps: int,
    warmup: int,
    accum: int,
    work: Path,
    profile_dir: Path | None,
    ranks: int = 1,
    label: str | None = None,
    timeout: float = 1800,
) -> dict:
    """One row: ``variant`` ('name: overrides') trained on ``ranks`` GPUs, shown as ``label``."""
    name, _, extra = variant.partition(":")
    name = label or name.strip()
    try:
        extra += " " + batch_override(config, [*overrides, *extra.split()], accum, ranks)
    except UserError as e:  # the variant's own config is bad: its row says why, the others run
        return {"variant": name, "ranks": ranks, "error": f"exit status 2: error: {e}"}
    run_dir = work / file_name(name)
    profiled = PROFILED_STEPS if profile_dir else 0
    if profiled:  # after the timed steps, in an interval of their own
        extra += f" logging.profile_start={warmup + steps + 1} logging.profile_steps={profiled}"
    args = [
        config,
        *overrides,
        *extra.split(),
        f"train.max_steps={warmup + steps + profiled}",
        f"train.log_interval={warmup}",
        "train.eval_interval=0",
        "checkpoint.interval=0",
        "checkpoint.save_at_end=false",
        "logging.wandb=disabled",
        "logging.progress=false",
        f"run.dir={run_dir}",
    ]
    launcher = (
        [sys.executable]
        if ranks == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    )
    launcher += ["-m", "dist_lm", "train"]
    log = work / f"{file_name(name)}.log"
    status = run_logged([*launcher, "--config", *args], log, timeout)
    if status != 0:
        what = f"timed out after {timeout:g} s" if status is None else f"exit status {status}"
        return {"variant": name, "ranks": ranks, "error": f"{what}: {last_line(log)}"}
    metrics_file = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.is_file() else []
    # the first interval holds the warm-up (and compilation); the profiled steps end the run
    timed = [r for r in rows if "loss" in r and warmup < r["step"] <= warmup + steps]
    if not timed:
        return {
            "variant": name,
            "ranks": ranks,
            "error": f"exit status 0 but no timed step in {metrics_file}: {last_line(log)}",
        }
    if profiled:
        profile_dir.mkdir(parents=True, exist_ok=True)
        for what in ("ops.txt", "trace.json.gz"):
            shutil.copy(run_dir / "profile" / f"rank0-{what}", profile_dir / f"{file_name(name)}-{what}")
    summary = metrics.RunSummary.read(run_dir)
    n = len(timed)
    return {
        "variant": name,
        "ranks": ranks,
        "tokens_per_s": sum(r["tokens_per_s"] for r in timed) / n,
        "mfu": sum(r["mfu"] or 0 for r in timed) / n,
        "step_s": sum(r["step_time"] for r in timed) / n,
        "peak_mem_gb": max(r["peak_mem_gb"] for r in timed),
        "first_step_s": summary.first_step_s,
        "predicted_mem_gb": summary.predicted_peak_mem_gb,
        "global_batch": summary.global_batch_size,
        "flops_per_token": summary.flops_per_token,
    }


def run_baseline(
    config: str, overrides: list[str], steps: int, warmup: int, accum: int, profile_dir: Path | None
) -> dict:
    """The same training in plain PyTorch (dist_lm.train.plain): torch.compile, fused AdamW, bf16
    autocast, and the variants' seed, data and learning rate at every step."""
    import torch

    from dist_lm.config.io import load_config
    from dist_lm.model.counts import flops_per_token
    from dist_lm.observe.profiling import StepProfiler
    from dist_lm.runtime import hardware
    from dist_lm.train.plain import PlainTraining

    profiled = PROFILED_STEPS if profile_dir else 0
    # train.max_steps as the variants have it (run_variant): the schedule spans the same steps
    cfg = load_config(
        config, [*overrides, batch_override(config, overrides, accum), f"train.max_steps={warmup + steps + profiled}"]
    )
    if not torch.cuda.is_available():
        raise UserError(
            "bench --baseline: plain PyTorch's row is measured on a CUDA GPU, and this machine has "
            "none; drop --baseline"
        )
    device = torch.device("cuda")
    plain = PlainTraining(cfg, device, compiled=True, autocast=True)
    cfg = plain.cfg
    torch.cuda.reset_peak_memory_stats()
    profiler = StepProfiler(warmup + steps + 1 if profiled else 0, profiled, profile_dir, "baseline", device)
    for i in range(warmup + steps + profiled):
        if i == warmup:
            torch.cuda.synchronize()
            start, plain.data_wait_s = time.perf_counter(), 0.0
        profiler.before_step(i + 1)
        plain.step()
        if i + 1 == warmup + steps:  # the timed steps end here; profiled ones may follow
            torch.cuda.synchronize()
            seconds, waiting = time.perf_counter() - start, plain.data_wait_s
        profiler.after_step(i + 1)
    plain.close()
    peak_mem_gb = torch.cuda.max_memory_allocated() / 1e9
    # The variants run after it in processes of their own: give their GPU memory back.
    del plain
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    tokens = steps * cfg.train.global_batch_size * cfg.model.seq_len
    peak = hardware.peak_flops(device)
    return {
        "variant": "plain PyTorch (compile, fused AdamW, autocast)",
        "tokens_per_s": tokens / seconds,
        "mfu": tokens / seconds * flops_per_token(cfg.model) / peak if peak else 0.0,
        "step_s": seconds / steps,
        "peak_mem_gb": peak_mem_gb,
        "first_step_s": None,
        "flops_per_token": flops_per_token(cfg.model),
        "data_wait_share": waiting / seconds,
    }


positive = integer(1)


def rank_counts(text: str) -> list[int]:
    counts = [positive(part.strip()) for part in text.split(",")]
    if len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"{text!r} names a rank count twice")
    return sorted(counts)


def scaling_lines(rows: list[dict]) -> list[str]:
    """Each variant's tokens/s at more ranks over its tokens/s at the fewest ranks; rows of one
    variant share a "base" key, its name without the rank count. Adds "scaling" to those rows."""
    lines = []
    for base in dict.fromkeys(r["base"] for r in rows if "base" in r):
        runs = sorted((r for r in rows if r.get("base") == base and "error" not in r), key=lambda r: r["ranks"])
        for r in runs[1:]:
            r["scaling"] = r["tokens_per_s"] / runs[0]["tokens_per_s"]
            lines.append(
                f"{base}: {r['ranks']} ranks run at {r['scaling']:.3f}x the tokens/s of "
                f"{runs[0]['ranks']} ({r['tokens_per_s']:,.0f} against {runs[0]['tokens_per_s']:,.0f})"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = Parser(__doc__)
    p.add_argument("--config", required=True, help="a preset or YAML file")
    p.add_argument("--variant", action="append", help="'name: override ...' (default: ZeRO-1, ZeRO-2, ZeRO-1 compiled)")
    p.add_argument("--steps", type=positive, default=10, help="timed steps (a multiple of --warmup)")
    p.add_argument("--warmup", type=positive, default=5, help="untimed steps first")
    p.add_argument("--accum", type=positive, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument(
        "--ranks",
        type=rank_counts,
        default=[1],
        help="GPUs per variant, e.g. 1,2: each variant on each count, torchrun above 1 (default 1)",
    )
    p.add_argument("--baseline", action="store_true", help="also run plain PyTorch in this process (GPU)")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--timeout", type=positive, default=1800, help="seconds one variant may run (default 1800)")
    p.add_argument("--profile", type=Path, metavar="DIR", help="profile 3 more steps per variant into DIR")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every variant")
    args = p.parse_args(argv)
    rows = []
    if args.baseline:  # first: a call cut short by its time limit still has the denominator
        try:
            rows.append(run_baseline(args.config, args.overrides, args.steps, args.warmup, args.accum, args.profile))
        except UserError as e:  # the variants' shared config: they would all fail the same way
            print(f"error: {e}", file=sys.stderr)
            return 2
    print("| variant | tokens/s | TFLOP/s | MFU | step | peak memory (predicted) | first step after |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print_row(row)
    with tempfile.TemporaryDirectory() as work:
        for variant in args.variant or DEFAULT_VARIANTS:
            base = variant.partition(":")[0].strip()
            for ranks in args.ranks:
                label = base if args.ranks == [1] else f"{base}, {ranks} rank{'s' if ranks > 1 else ''}"
                rows.append(
                    run_variant(
                        args.config,
                        args.overrides,
                        variant,
                        args.steps,
                        args.warmup,
                        args.accum,
                        Path(work),
                        args.profile,
                        ranks,
                        label,
                        args.timeout,
                    )
                    | {"base": base}
                )
                print_row(rows[-1])
    for line in scaling_lines(rows):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    failed = sum("error" in r for r in rows)
    if failed:
        print(f"bench: {failed} of {len(rows)} rows failed (their rows say why)", file=sys.stderr)
    return 1 if failed else 0


def print_row(r: dict) -> None:
    if "error" in r:
        print(f"| {r['variant']} | failed: {r['error']} | | | | | |", flush=True)
        return
    tflops = r["tokens_per_s"] * r["flops_per_token"] / 1e12  # the run's own count (run.json)
    first = f"{r['first_step_s']:.1f} s" if r.get("first_step_s") else "-"
    predicted = f" ({r['predicted_mem_gb']:.1f} GB)" if r.get("predicted_mem_gb") else ""
    extra = f" (data wait {100 * r['data_wait_share']:.2f}% of step time)" if "data_wait_share" in r else ""
    print(
        f"| {r['variant']}{extra} | {r['tokens_per_s']:,.0f} | {tflops:.1f} | {100 * r['mfu']:.1f}% | "
        f"{1000 * r['step_s']:.0f} ms | {r['peak_mem_gb']:.1f} GB{predicted} | {first} |",
        flush=True,
    )
