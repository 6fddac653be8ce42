"""Is the data what was prepared? Each shard's content against the hashes meta.json recorded
when it was written (dist-lm prepare), when a run starts or resumes; and, at every checkpoint,
whether a shard changed on disk while the run read it.

Sizes alone (what dist_lm.data.shards.open_split checks) miss a shard rewritten in place or
damaged without changing length. Hashing is the cost of reading the shards once: in full, every
byte (about 5 GB/s for one core from the page cache, less from a cold disk:
docs/reliability.md); sampled, a fixed 4 MiB of each shard (dist_lm.files.sampled_checksum),
which catches a rewrite but not damage outside the sampled blocks. data.verify=auto, the
default, checks in full up to FULL_CHECK_BYTES of shards and sampled above; ranks share the
shards between them. Datasets prepared before these hashes have the whole-file sha256 only:
checked in full, or by size alone where auto chooses sampled (with a warning).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dist_lm.data.checks import Source
from dist_lm.data.shards import sha256_file
from dist_lm.files import checksum, sampled_checksum

FULL_CHECK_BYTES = 16 << 30  # about 8 billion uint16 tokens: seconds to hash on a few ranks


@dataclass(frozen=True)
class Shard:
    path: Path
    recorded: dict  # its entry in meta.json

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def shards_of(sources: list[Source]) -> list[Shard]:
    """Every shard file of every split of the run's datasets, in a fixed order."""
    return [
        Shard(Path(s.dir) / shard["file"], shard)
        for s in sources
        for split in sorted(s.meta["splits"])
        for shard in s.meta["splits"][split]
    ]


def mode_for(verify: str, shards: list[Shard]) -> str:
    """data.verify resolved: auto is full up to FULL_CHECK_BYTES of shards, sampled above."""
    if verify != "auto":
        return verify
    return "full" if sum(s.size for s in shards) <= FULL_CHECK_BYTES else "sampled"


def content_problem(shard: Shard, mode: str) -> str | None:
    """Why the shard's content is not what meta.json recorded, or None (also when meta.json
    recorded nothing that ``mode`` can check)."""
    recorded = shard.recorded
    if mode == "full" and recorded.get("xxh3_128"):
        same = checksum(shard.path) == recorded["xxh3_128"]
    elif mode == "full" and recorded.get("sha256"):
        same = sha256_file(shard.path) == recorded["sha256"]
    elif mode == "sampled" and recorded.get("sample_xxh3_128"):
        same = sampled_checksum(shard.path) == recorded["sample_xxh3_128"]
    else:
        return None
    if same:
        return None
    return (
        f"data error: shard {shard.path} does not hold what meta.json recorded when it was prepared (its "
        f"{'content' if mode == 'full' else 'sampled blocks'} changed: rewritten or damaged); re-create the "
        "dataset, or restore the shard"
    )


def check_content(shards: list[Shard], mode: str, rank: int, world_size: int) -> str | None:
    """The first problem with this rank's share of the shards (every world_size-th), or None."""
    if mode == "none":
        return None
    for shard in shards[rank::world_size]:
        try:
            problem = content_problem(shard, mode)
        except OSError as e:
            problem = f"data error: shard {shard.path} cannot be read ({e.strerror or e})"
        if problem:
            return problem
    return None


HASHES = {"full": ("xxh3_128", "sha256"), "sampled": ("sample_xxh3_128",), "none": ()}


def checkable(shards: list[Shard], mode: str) -> tuple[int, int]:
    """(how many shards ``mode`` checks by content, how many it cannot although meta.json recorded
    hashes of them: a dataset prepared before the hash it needs). Shards without any hash (nanoGPT's
    train.bin) are neither: their sizes are all there is to check."""
    hashed = [s for s in shards if any(s.recorded.get(k) for k in HASHES["full"] + HASHES["sampled"])]
    checked = sum(any(s.recorded.get(k) for k in HASHES[mode]) for s in hashed)
    return checked, len(hashed) - checked


def stamps(shards: list[Shard], rank: int, world_size: int) -> dict[Path, tuple[int, int, int]]:
    """Size, modification and change time of this rank's share of the shards: what a rewrite moves."""
    out = {}
    for shard in shards[rank::world_size]:
        st = os.stat(shard.path)
        out[shard.path] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


def changed(before: dict[Path, tuple[int, int, int]]) -> str | None:
    """The error for the first shard of ``before`` (a :func:`stamps`) that changed on disk since,
    or None. Said before a checkpoint, which is not saved: the steps since the last one may have
    read other data."""
    for path, stamp in before.items():
        try:
            st = os.stat(path)
            now = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:
            now = None
        if now != stamp:
            return (
                f"data error: shard {path} {'is gone' if now is None else 'changed on disk'} while the run read it; "
                "no checkpoint is saved from these steps, the newest one is as it was: restore the data (or "
                "prepare it again and start a new run.name), then run again"
            )
    return None
