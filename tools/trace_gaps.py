"""Compare chrome traces: GPU busy, kernel count, idle gaps and what the host ran during them."""
import gzip, json, sys
from collections import Counter, defaultdict

def load(path):
    with gzip.open(path) if path.endswith(".gz") else open(path) as f:
        return json.load(f)["traceEvents"]

def analyze(path, min_gap_us=30):
    ev = [e for e in load(path) if e.get("ph") == "X"]
    gpu = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    cpu = [e for e in ev if e.get("cat") in ("cpu_op", "python_function", "user_annotation", "cuda_runtime", "cuda_driver")]
    t0, t1 = gpu[0][0], gpu[-1][1]
    busy, gaps, end = 0.0, [], None
    start = None
    for s, e, n in gpu:
        if end is None:
            start, end = s, e
        elif s > end:
            busy += end - start
            if s - end >= min_gap_us:
                gaps.append((end, s))
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    runtime = Counter(e["name"] for e in cpu if e.get("cat") == "cuda_runtime")
    print(f"== {path}\n  GPU span {(t1 - t0)/1000:.2f} ms, busy {busy/1000:.2f} ms ({100*busy/(t1-t0):.1f}%), kernels {len(gpu)}, "
          f"gaps>={min_gap_us}us: {len(gaps)} totalling {sum(b-a for a,b in gaps)/1000:.2f} ms")
    print("  runtime calls:", ", ".join(f"{n} {c}" for n, c in runtime.most_common(8)))
    # for each gap, the outermost cpu_op running on the host at the gap's start
    ops = sorted((e["ts"], e["ts"] + e["dur"], e["name"], e.get("cat")) for e in cpu if e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime"))
    blame = defaultdict(float)
    for a, b in gaps:
        # which host events overlap the gap: sum their overlap by name (innermost ones double count; fine for a look)
        names = Counter()
        for s, e, n, c in ops:
            if s < b and e > a:
                names[n] += min(e, b) - max(s, a)
        top = names.most_common(3)
        blame[" | ".join(n for n, _ in top) or "(host outside ops)"] += b - a
    for k, v in sorted(blame.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {v/1000:7.2f} ms  {k[:160]}")

for p in sys.argv[1:]:
    analyze(p)
