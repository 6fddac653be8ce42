"""What the full-weights files cost a checkpoint: one real training step, then the same checkpoint
saved twice, without and with them (seconds each, and disk), and the time to read them back;
and what checking every file against the manifest's checksums costs (verify_checksums_s: a
resume's check, and about what hashing adds to a save, which hashes the files it just wrote).
Then what checkpoint.async_save holds training for, in parts: DeepSpeed's state dicts copied to
host memory by the staging engine, the first time into host buffers it allocates (stage_s), then
into those buffers (stage_again_s; dist_lm.runtime.host_buffers); and the same bytes of the
optimizer's and the model's tensors copied three ways (host_copy, on a GPU only): into fresh
pageable memory; into pinned memory that torch's allocator gives (``pin_memory=True``, its
allocation timed on its own); into that pinned memory again.

    python tools/bench_checkpoint.py --config h100-80gb [section.key=value ...]
    torchrun --nproc_per_node 2 tools/bench_checkpoint.py --config h100-80gb   # the share per rank

Prints one JSON object (rank 0). Each save is dist_lm.train.checkpoint.save, as the trainer calls it;
the first passes no weights, as checkpoints were written before the weights files existed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a preset or YAML file")
    p.add_argument("--dir", type=Path, help="where to write (default: a temporary directory; it is removed)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args()

    from dist_lm.commands.arguments import MEASURING_RUN
    from dist_lm.config.io import load_config
    from dist_lm.runtime import distributed, engine
    from dist_lm.store import checkpoints
    from dist_lm.train import checkpoint, restore
    from dist_lm.train.loop import Trainer
    from dist_lm.train.session import start

    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        cfg = load_config(
            args.config,
            [
                *args.overrides,
                "train.max_steps=1",
                *MEASURING_RUN,
                f"run.dir={work}/run",
            ],
        )
        trainer = Trainer(start(cfg))
        trainer.fit()
        model_engine = trainer.model_engine
        rank, world = trainer.session.dist_env.rank, trainer.session.dist_env.world_size
        root, state = Path(work) / "checkpoints", trainer.state_dict()

        def timed_save(step: int, weights) -> float:
            distributed.barrier()
            start = time.perf_counter()
            checkpoint.save(
                model_engine, root, step, state, rank, world, weights, engine.tied_names(model_engine.module)
            )
            return time.perf_counter() - start

        without = timed_save(1, dict)
        gather_start = time.perf_counter()
        engine.master_weights(model_engine, rank, world)
        gather = time.perf_counter() - gather_start
        with_weights = timed_save(2, lambda: engine.master_weights(model_engine, rank, world))
        distributed.barrier()
        verify_start = time.perf_counter()  # what a resume's check of every file costs (page cache warm)
        assert checkpoints.checksum_problem_together(root / checkpoints.tag_for(2)) is None
        verify = time.perf_counter() - verify_start
        # the run's own staging engine where it saves asynchronously (a GPU run by default)
        staging = trainer.staging or engine.install_staging(
            model_engine, max(1, trainer.session.dist_env.local_world_size)
        )

        def timed_stage(step: int) -> float:
            staging.staged, staging.written = [], []
            distributed.barrier()
            start = time.perf_counter()
            model_engine.save_checkpoint(str(root), tag=checkpoints.tag_for(step), save_latest=False)
            return time.perf_counter() - start

        stage = timed_stage(3)  # (this run has not saved before: its buffers are allocated here)
        stage_again = timed_stage(4)
        staged_bytes = sum(engine.tensor_bytes(state_dict) for state_dict, _ in staging.staged)
        staging.staged = None
        host_copy = host_copy_rates(model_engine)
        if distributed.is_rank0():
            path = root / checkpoints.tag_for(2)
            read_start = time.perf_counter()
            weights = restore.consolidated_weights(path)
            read = time.perf_counter() - read_start
            sizes = checkpoints.RunState.read(path).manifest
            weight_bytes = sum(v for k, v in sizes.items() if k.startswith("weights-rank"))
            print(
                json.dumps(
                    {
                        "config": args.config,
                        "overrides": args.overrides,
                        "ranks": world,
                        "precision": trainer.session.precision,
                        "zero_stage": cfg.parallel.zero_stage,
                        "parameters": sum(v.numel() for v in weights.values()),
                        "save_s_without_weights": round(without, 2),
                        "save_s_with_weights": round(with_weights, 2),
                        "gather_s": round(gather, 2),
                        "read_weights_s": round(read, 2),
                        "verify_checksums_s": round(verify, 2),
                        "checkpoint_bytes_without_weights": sum(sizes.values()) - weight_bytes,
                        "weights_bytes": weight_bytes,
                        "stage_s": round(stage, 2),
                        "stage_again_s": round(stage_again, 2),
                        "staged_bytes": staged_bytes,
                        "staged_in_place": len(staging.written),
                        "host_copy": host_copy,
                    }
                )
            )
        trainer.close()
        distributed.teardown()


def host_copy_rates(model_engine) -> dict[str, float] | None:
    """GB/s of copying this rank's GPU-resident optimizer state and module tensors to the host:
    into fresh pageable memory; into pinned memory allocated for it (the allocation timed on its
    own); into that pinned memory again. None on a CPU run."""
    import torch
    from torch.utils import _pytree as pytree

    from dist_lm.runtime.engine import tensor_bytes

    states = (model_engine.optimizer.state_dict(), model_engine.module.state_dict())
    tensors = [t for t in pytree.tree_leaves(states) if isinstance(t, torch.Tensor) and t.is_cuda]
    if not tensors:
        return None
    gb = tensor_bytes(tensors) / 1e9
    buffers: list = []

    def timed(copy) -> float:  # what ``copy`` returns is dropped, but for the pinned buffers
        torch.cuda.synchronize()
        start = time.perf_counter()
        copy()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    pageable = timed(lambda: [t.to("cpu") for t in tensors])
    allocate = timed(lambda: buffers.extend(torch.empty_like(t, device="cpu", pin_memory=True) for t in tensors))
    pinned = timed(lambda: [b.copy_(t, non_blocking=True) for b, t in zip(buffers, tensors)])
    again = timed(lambda: [b.copy_(t, non_blocking=True) for b, t in zip(buffers, tensors)])
    return {
        "gb": round(gb, 2),
        "pageable_gb_per_s": round(gb / pageable, 2),
        "pin_allocate_s": round(allocate, 2),
        "pinned_gb_per_s": round(gb / pinned, 2),
        "pinned_again_gb_per_s": round(gb / again, 2),
    }


if __name__ == "__main__":
    main()
