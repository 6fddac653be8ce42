"""The scaling model (dist_lm.plan.scaling) and `dist-lm plan --link`: the published anchors within
the errors docs/planner.md states, the table there as the code computes it, and the ranking."""

from __future__ import annotations

import pytest

from conftest import ROOT
from dist_lm.commands import plan as plan_command
from dist_lm.config.io import load_config
from dist_lm.config.layout import parallel_layout
from dist_lm.plan.planner import make_plan
from dist_lm.plan.ranking import rank_layouts
from dist_lm.plan.scaling import (
    CHECKPOINT_GB_PER_S,
    GB,
    LINKS,
    STAGING_GB_PER_S,
    Cluster,
    checkpoint_bytes,
    step_time,
)
from dist_lm.plan.scaling_anchors import ANCHORS, LLAMA_31_8B, anchor_table
from dist_lm.runtime.hardware import Machine
from dist_lm.runtime.precision import Precision


@pytest.mark.parametrize("anchor", ANCHORS, ids=lambda a: a.name)
def test_the_published_anchors_within_the_stated_error(anchor):
    predicted, published = anchor.predict()
    assert abs(predicted / published - 1) <= anchor.error_bound, (predicted, published)


def test_the_planner_page_holds_the_anchor_table_as_computed():
    page = (ROOT / "docs" / "planner.md").read_text()
    for row in anchor_table():
        assert row in page, f"docs/planner.md lacks (or has another) row: {row}"


def step(link: str, nodes: int = 4, **parallel) -> float:
    keys = [f"parallel.{k}={str(v).lower()}" for k, v in parallel.items()]
    cfg = load_config(None, [*LLAMA_31_8B, "train.global_batch_size=128", *keys])
    cluster = Cluster(nodes, 8, "H100", LINKS[link])
    layout = parallel_layout(cfg.parallel, cfg.model, cluster.world_size)
    return step_time(cfg, layout, cluster, Precision.BF16)


def test_slower_links_and_more_bytes_never_make_a_step_faster():
    zero3 = [step(link).seconds for link in ("ib-400", "ib-200", "eth-100")]
    assert zero3 == sorted(zero3) and zero3[0] < zero3[-1]
    plain, quantized = step("eth-100"), step("eth-100", zero_quantized_weights=True, zero_quantized_gradients=True)
    assert sum(quantized.exposed.values()) < sum(plain.exposed.values())
    hpz = step("eth-100", zero_hpz_partition_size=8)
    assert "ZeRO-3 backward all-gather (hpZ)" in hpz.exposed and hpz.seconds < plain.seconds
    assert step("eth-100", zero_stage=1).seconds < plain.seconds  # one reduction a step, not three a micro-batch
    # one GPU moves nothing; tensor parallelism's all-reduces are on the critical path
    alone = step("nvlink", nodes=1, zero_stage=1)
    assert alone.compute > 0
    tp = step("ib-400", zero_stage=1, tensor_parallel_size=8)
    assert tp.exposed["tensor all-reduce"] > 0


def test_a_save_holds_training_for_its_copy_with_async_save_and_its_write_without():
    """The checkpoint term: GPU runs save asynchronously unless told not to (checkpoint.async_save
    auto), and then a save holds training only for its copy to host memory."""
    cluster = Cluster(2, 8, "H100", LINKS["ib-400"])
    held = {}
    for value in ("auto", "true", "false"):
        cfg = load_config(
            None,
            [*LLAMA_31_8B, "train.global_batch_size=128", "checkpoint.interval=500", f"checkpoint.async_save={value}"],
        )
        layout = parallel_layout(cfg.parallel, cfg.model, cluster.world_size)
        held[value] = step_time(cfg, layout, cluster, Precision.BF16).checkpoint * cfg.checkpoint.interval
        saved = sum(checkpoint_bytes(cfg, layout, Precision.BF16)) / GB
    assert held["auto"] == held["true"] == pytest.approx(saved / STAGING_GB_PER_S)
    assert held["false"] == pytest.approx(saved / CHECKPOINT_GB_PER_S) and held["false"] > held["true"]


def test_one_gpu_has_no_communication():
    cfg = load_config(None, [*LLAMA_31_8B, "parallel.zero_stage=1", "train.global_batch_size=2"])
    one = step_time(
        cfg, parallel_layout(cfg.parallel, cfg.model, 1), Cluster(1, 1, "H100", LINKS["nvlink"]), Precision.BF16
    )
    assert one.exposed == {} and one.hidden == 0 and one.seconds == one.compute


def test_the_ranking_is_deterministic_and_fastest_first():
    machine = Machine(8, "H100", 80.0, (9, 0), nodes=4)
    plan = make_plan(machine, ["model.vocab_size=32000"])
    first, again = (rank_layouts(plan, LINKS["ib-200"], {"model.vocab_size"}) for _ in range(2))
    assert [c.describe() for c in first] == [c.describe() for c in again] and len(first) > 10
    seconds = [c.step.seconds for c in first]
    assert seconds == sorted(seconds)
    assert all(c.memory_gb <= plan.budget_gb for c in first)


def test_plan_with_a_link_prints_the_ranking_and_launches_the_fastest(capsys):
    assert plan_command.main(["--nodes", "2", "--gpus-per-node", "8", "--gpu-name", "H100", "--link", "eth-100"]) == 0
    out = capsys.readouterr().out
    assert "scaling model, over eth-100" in out and "chosen by the scaling model over eth-100" in out
    ranking = out.split("\nmachine:")[0].splitlines()[2:]
    best = ranking[0].split(",")[0].split()  # e.g. ZeRO-3 qwZ+qgZ
    sbatch = next(line for line in out.splitlines() if line.strip().startswith("sbatch"))
    assert "--nodes=2 --gpus-per-node=8" in sbatch and f"parallel.zero_stage={best[0][-1]}" in sbatch
    assert ("parallel.zero_quantized_weights=true" in sbatch) == ("qwZ+qgZ" in best)


def test_plan_with_a_link_needs_a_gpu_it_knows(capsys):
    assert plan_command.main(["--gpus", "8", "--gpu-name", "Mystery 9000", "--link", "ib-400"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--gpu-name" in err
