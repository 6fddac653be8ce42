"""Where the GPU sat idle in a torch.profiler trace, and what the host was doing meanwhile.

    python tools/trace_gaps.py RUN/profile/rank0-trace.json.gz [MORE TRACES] [--min-gap-us 30]

For each Chrome trace (``logging.profile_start``, ``dist-lm bench --profile``): the span from
the first kernel to the last, the time at least one kernel or copy ran, the kernel count, the
idle gaps of at least --min-gap-us, and for the gaps the host operations that overlapped them,
largest total first. Given the engine's trace beside plain PyTorch's (``dist-lm bench --baseline
--profile DIR``), the difference in idle time is the step time the engine loses to its host.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter
from pathlib import Path

from dist_lm.observe.profiling import busy_and_idle

GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_WORK = ("cpu_op", "user_annotation", "cuda_runtime")


def load_events(path: Path) -> list[dict]:
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def report(path: Path, min_gap_us: float) -> str:
    events = load_events(path)
    gpu = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_WORK]
    if not gpu:
        return f"== {path}: no GPU work in the trace"
    host = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") in HOST_WORK]
    span = max(e for _, e in gpu) - min(s for s, _ in gpu)
    busy, gaps = busy_and_idle(gpu, min_gap_us)
    launches = Counter(e["name"] for e in events if e.get("cat") == "cuda_runtime")
    lines = [
        f"== {path}",
        f"  GPU span {span / 1000:.2f} ms, busy {busy / 1000:.2f} ms ({100 * busy / span:.1f}%), "
        f"{len(gpu)} kernels and copies; {len(gaps)} gaps of {min_gap_us:g} us or more, "
        f"{sum(b - a for a, b in gaps) / 1000:.2f} ms in all",
        "  runtime calls: " + ", ".join(f"{name} {n}" for name, n in launches.most_common(8)),
    ]
    # Each gap goes to the three host operations that overlapped it most (nested operations each
    # count their own overlap: a look at where the host was, not an exact split).
    blame: Counter[str] = Counter()
    for a, b in gaps:
        overlap: Counter[str] = Counter()
        for s, e, name in host:
            if s < b and e > a:
                overlap[name] += min(e, b) - max(s, a)
        blame[" | ".join(name for name, _ in overlap.most_common(3)) or "(no host operation)"] += b - a
    lines += [f"  {t / 1000:7.2f} ms  {who[:150]}" for who, t in blame.most_common(15)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+", type=Path)
    p.add_argument("--min-gap-us", type=float, default=30.0, help="shorter idle gaps are not listed")
    args = p.parse_args()
    for path in args.traces:
        print(report(path, args.min_gap_us))


if __name__ == "__main__":
    main()
