"""Where a run's files live: one object that knows the places under `cache_dir` and `run_dir`, so that a path is
decided here and nowhere else.

    cache_dir/<key>/               a reference cache (`cache(key)`; the key hashes every input)
    cache_dir/tokens-<key>/        the token files of a reference-free loss (`cache(token_key)`)
    cache_dir/sources/             `datasets` sources exported to Parquet, source plans (`sources`)
    cache_dir/eval-reference/      the reference's log-probs of evaluation samples (`eval_reference`)
    run_dir/                       training: checkpoints/, ray/, metrics, train.json (`run`)
    run_dir/eval/                  evaluation (`eval`)
    run_dir/pairs/                 generated pairs, unless `pairs.output_dir` (`pairs`)
    run_dir/round_<r>/             an iterative round's run directory (`round(r)`)

Each is a `Store` (a local path, resolved, or a URI), built once per layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

from pipeline.store.storage import Store


class _Roots(Protocol):
    cache_dir: str
    run_dir: str


@dataclass(frozen=True)
class RunLayout:
    cache_dir: str
    run_dir: str

    @classmethod
    def of(cls, roots: _Roots) -> RunLayout:
        """The layout of a config (anything with `cache_dir` and `run_dir`)."""
        return cls(roots.cache_dir, roots.run_dir)

    @cached_property
    def caches(self) -> Store:
        return Store(self.cache_dir)

    @cached_property
    def run(self) -> Store:
        return Store(self.run_dir)

    def cache(self, key: str) -> Store:
        return self.caches.child(key)

    @cached_property
    def sources(self) -> Store:
        return self.caches.child("sources")

    @cached_property
    def eval_reference(self) -> Store:
        return self.caches.child("eval-reference")

    @cached_property
    def eval(self) -> Store:
        return self.run.child("eval")

    @cached_property
    def pairs(self) -> Store:
        return self.run.child("pairs")

    def round(self, r: int) -> Store:
        return self.run.child(f"round_{r}")
