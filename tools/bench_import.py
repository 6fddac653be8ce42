"""Continued pretraining at 1B on a GPU, against a run from scratch of the same shape.

transformers makes a model of Llama-3.2-1B's shape (16 layers, d_model 2048, 32 heads, 8 key/value
heads, MLP 8192, vocabulary 128,256, tied embeddings, Llama 3.1's rotary scaling) with random
weights and saves it in bf16. dist-lm prepares text with its tokenizer, imports it
(model.init_from, checked against transformers' logits at start-up), trains --steps steps in
bf16 and saves; the export of that checkpoint is loaded by transformers and its logits compared
with ours (fp32, on the CPU). Then the same run from scratch: the same settings, the architecture
keys given as overrides. Each run is `python launchers/pretrain.py`, as a user starts one.

    python tools/bench_import.py --dir /tmp/work [--steps 20] [section.key=value ...]

Prints one JSON object: tokens/s of each run (the median of its steps after the first three)
and their ratio, each run's seconds from start to its first step, and the largest difference
between transformers' logits of the export and ours.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the models the tests make, at 1B here

LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
)
SETTINGS = [
    "model.seq_len=2048",
    "train.micro_batch_size=8",
    "train.global_batch_size=8",
    "parallel.precision=bf16",
    "parallel.zero_stage=1",
    "parallel.compile=false",  # (a minute or more of compiling per run; the two runs compare alike without it)
    "train.eval_interval=0",
    "train.log_interval=1",
    "train.sample_tokens=0",
    "checkpoint.interval=0",
    "logging.wandb=disabled",
    "logging.progress=false",
]


def train(name: str, work: Path, args: list[str]) -> dict:
    """One run; its tokens/s after warm-up and seconds to its first step, from its metrics and run.json."""
    run = work / name
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "pretrain.py"), *args, f"run.dir={run}"],
        capture_output=True,
        text=True,
    )
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(
            f"{name} run failed (exit {proc.returncode}): {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
        )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 3]
    summary = json.loads((run / "run.json").read_text())
    return {"tokens_per_s": statistics.median(speeds), "first_step_s": summary["first_step_s"], "run": str(run)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, required=True, help="where the model, data and runs go")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args()

    import torch
    from hf_models import make_model, texts
    from transformers import AutoModelForCausalLM

    from dist_lm.config import hugging_face
    from dist_lm.use.export import export_hf
    from dist_lm.use.inference import load_model

    work = args.dir
    work.mkdir(parents=True, exist_ok=True)
    made = time.perf_counter()
    model_dir = make_model(work / "llama-1b", "llama", torch.bfloat16, **LLAMA_1B)
    made = time.perf_counter() - made
    (work / "text.txt").write_text("\n\n".join(texts(10_000)))
    data = work / "data"
    subprocess.run(
        [sys.executable, "-m", "dist_lm", "prepare", str(work / "text.txt"), "--out", str(data)]
        + ["--tokenizer", str(model_dir), "--quiet"],
        check=True,
    )
    common = ["--config", "h100-80gb", f"data.dir={data}", f"train.max_steps={args.steps}", *SETTINGS, *args.overrides]
    imported = train("imported", work, [*common, f"model.init_from={model_dir}"])
    keys = hugging_face.model_keys(hugging_face.read_config(model_dir), model_dir)
    shape = [f"model.{k}={'null' if v is None else v}" for k, v in keys.items() if k != "layer_types"]
    scratch = train("scratch", work, [*common, *shape, "checkpoint.save_at_end=false"])

    export_hf(Path(imported["run"]), work / "export", dtype="fp32")
    ours, _, _ = load_model(Path(imported["run"]))
    hf = AutoModelForCausalLM.from_pretrained(work / "export", dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, mine = hf(ids).logits, ours(ids)
    print(
        json.dumps(
            {
                "model_made_s": round(made, 1),
                "imported_tokens_per_s": round(imported["tokens_per_s"]),
                "scratch_tokens_per_s": round(scratch["tokens_per_s"]),
                "ratio": round(imported["tokens_per_s"] / scratch["tokens_per_s"], 3),
                "imported_first_step_s": round(imported["first_step_s"], 1),
                "scratch_first_step_s": round(scratch["first_step_s"], 1),
                "export_logits_max_abs_diff": (theirs - mine).abs().max().item(),
                "export_logits_max_abs": mine.abs().max().item(),
                "within_tolerance": bool(torch.allclose(theirs, mine, atol=1e-4, rtol=1e-4)),
            }
        )
    )


if __name__ == "__main__":
    main()
