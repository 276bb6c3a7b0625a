"""Stage 3's inputs: the prompts to sample (`eval.prompts`, tokenized like the cache) and the held-out cached pairs
that preference accuracy is measured on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.config import Config
from pipeline.data.rows import tokenize_prompts
from pipeline.data.sources import plan_source, read_shard
from pipeline.errors import UserError
from pipeline.store.cache_layout import find_cache, sources_dir
from pipeline.store.fingerprint import sha256_json
from pipeline.store.storage import Store


@dataclass
class Prompts:
    """The evaluation prompts, index-aligned: token ids, the dataset's chosen response (None where a row has
    none), the decoded prompt text; `sha256` keys their content, `rejected` counts unusable rows."""

    ids: list[list[int]]
    chosen: list[list[int] | None]
    texts: list[str]
    sha256: str
    rejected: int


def load_prompts(cfg: Config, tok, eval_dir: Store) -> Prompts:
    """`eval.prompts` (default: the eval split, else train) tokenized like the cache; rejects go to
    `<eval_dir>/prompt_rejects.jsonl`. At most `eval.num_prompts` (all when 0)."""
    src = cfg.eval.prompts or cfg.data.eval or cfg.data.train
    plan = plan_source(src, cfg.scoring.shard_size, sources_dir(cfg))
    items, rejects = [], []
    for shard in plan.shards:
        got, bad = tokenize_prompts(read_shard(plan, shard), tok, src.format, cfg.data.max_length,
                                    cfg.data.max_prompt_length, cfg.data.implicit_prompt_marker)
        items += got
        rejects += bad
        if cfg.eval.num_prompts and len(items) >= cfg.eval.num_prompts:
            break
    items = items[:cfg.eval.num_prompts] if cfg.eval.num_prompts else items
    eval_dir.write_bytes("prompt_rejects.jsonl", "".join(r.to_json() + "\n" for r in rejects).encode())
    if not items:
        raise UserError(f"no usable prompts in {src.path!r} ({len(rejects)} rejected, reasons in "
                        f"{eval_dir.uri}/prompt_rejects.jsonl); point eval.prompts at prompt data")
    return Prompts([i.prompt_input_ids for i in items], [i.chosen_input_ids for i in items],
                   tok.batch_decode([i.prompt_input_ids for i in items], skip_special_tokens=True),
                   sha256_json([[i.id, i.prompt_input_ids, i.chosen_input_ids] for i in items]), len(rejects))


@dataclass
class HeldOutPairs:
    """The cached held-out pairs that preference accuracy is measured on."""

    inputs: pa.Table  # prompt_input_ids, chosen_input_ids, rejected_input_ids
    ref_chosen: np.ndarray  # summed reference log-probs, from the cache
    ref_rejected: np.ndarray
    cache_key: str


def load_held_out_pairs(cfg: Config) -> HeldOutPairs | None:
    """The eval split's cached pairs when `eval.preference_accuracy` is on and there is an eval split, else None."""
    if not cfg.eval.preference_accuracy or cfg.data.eval is None:
        return None
    cache = find_cache(cfg, "eval")
    store = Store(cache.uri)
    table = pa.concat_tables([store.read_parquet(f.removeprefix(cache.uri + "/")) for f in cache.files])
    return HeldOutPairs(table.select(["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]),
                        table.column("ref_chosen_logps").to_numpy(), table.column("ref_rejected_logps").to_numpy(),
                        store.read_json("manifest.json")["key"])
