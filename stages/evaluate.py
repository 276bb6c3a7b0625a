"""Stage 3: evaluate checkpoints by sampling.

    select targets (the reference and checkpoints)
    -> per target, one vLLM engine in a Ray actor (released before the next; `eval.num_actors` at once): sample
       completions with their log-probs under the target, and score the held-out cached pairs
    -> score every sample under the reference with the stage-1 scorer (cached by content)
    -> rewards -> per-sample Parquet and summary per target -> report across targets, with plots

Layout under `<run_dir>/eval/`:

    <name>/sampled.parquet, sampled.json   after sampling: the resume point (sampled.json, written last, holds
                                           the sampling key)
    <name>/samples.parquet, result.json    final per-sample rows and summary; result.json (written last) holds
                                           the target's key
    summary.csv, summary.json, report.md, *.png
                                           every target evaluated with the current settings

Incremental: a target whose result.json holds the same key (same weights, prompts, sampling, reward and
reference) is not evaluated again, and the report covers every target evaluated with these settings.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.util import ActorPool

from pipeline.config import Config, to_yaml
from pipeline.data.models import load_tokenizer, read_chat_template, resolve_model, resolve_tokenizer
from pipeline.data.rows import tokenize_prompts
from pipeline.data.sources import plan_source, read_shard
from pipeline.dpo.batching import list_column
from pipeline.engines.actors import CheckpointEngine, ReferenceEngine, RewardEngine, engine_signature, sample_seed
from pipeline.engines.scorers import actor_options, scorer_kwargs
from pipeline.errors import UserError, error_line
from pipeline.evaluation.report import SUMMARY_COLUMNS, standard_error, win_rate, write_report
from pipeline.evaluation.rewards import build_reward, reward_identity
from pipeline.runtime import faults
from pipeline.runtime.cluster import spread
from pipeline.runtime.session import connect, progress_bar
from pipeline.store.cache_layout import find_cache, sources_dir
from pipeline.store.checkpoints import list_checkpoints
from pipeline.store.fingerprint import model_files_hash, sha256_json
from pipeline.store.storage import Store, local_copy


@dataclass
class Target:
    """One model to evaluate: the reference or a checkpoint."""

    name: str
    path: str
    step: int | None
    is_reference: bool = False
    error: str | None = None  # found unusable before any engine started


@dataclass
class EvalResult:
    eval_dir: str
    evaluated: list[str]
    reused: list[str]
    failures: list[dict[str, str]]
    report: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    prompts: int = 0
    prompt_rejects: int = 0  # unusable prompt rows, listed with their reason in <eval_dir>/prompt_rejects.jsonl
    engine_starts: int = 0  # sampling engines started (targets of one architecture share one)


# ---------------------------------------------------------------- selection (driver)


def _step_of(name: str) -> int | None:
    m = re.fullmatch(r"step_(\d+)", name)
    return int(m.group(1)) if m else None


def select_targets(cfg: Config) -> list[Target]:
    """`eval.checkpoints` (+ the reference) -> targets with unique names. Unusable paths become failed targets."""
    sel = cfg.eval.checkpoints
    targets: list[Target] = []
    if cfg.eval.include_reference_model:
        targets.append(Target("reference", resolve_model(cfg.model.path, cfg.model.revision).local_dir, 0, True))
    if isinstance(sel, str):
        root = f"{Store(cfg.run_dir).uri}/checkpoints"
        found = list_checkpoints(Store(cfg.run_dir))  # local paths or URIs, like run_dir
        if not found:
            raise UserError(f"no checkpoints in {root} for eval.checkpoints={sel}; train first "
                            f"(`dpo-pipeline train CONFIG`) or list checkpoint directories in eval.checkpoints")
        if sel == "last":
            found = found[-1:]
        elif sel.startswith("every:"):
            k = int(sel.removeprefix("every:"))
            found = found[k - 1::k] + ([found[-1]] if len(found) % k else [])
        entries = [(Path(p).name, p) for p in found]
    elif isinstance(sel, dict):
        entries = [(name, _target_path(p)) for name, p in sel.items()]
        bad = next((n for n in sel if not n or "/" in n or n in (".", "..")), None)
        if bad is not None:
            raise UserError(f"eval.checkpoints name {bad!r} cannot name a results directory; use a plain name "
                            f"such as beta0.1-step40")
    else:
        entries = [(Path(p).name, _target_path(p)) for p in sel]
    names = {t.name for t in targets}
    for name, path in entries:
        if name in names:  # same directory name from elsewhere: disambiguate by the path
            name = f"{name}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
        names.add(name)
        targets.append(Target(name, path, _step_of(Path(path).name), error=_checkpoint_problem(path)))
    return targets


def _target_path(path: str) -> str:
    """A checkpoint location as recorded: a URI as given, a local path made absolute."""
    return path.rstrip("/") if "://" in path else str(Path(path).resolve())


def _checkpoint_problem(path: str) -> str | None:
    """Why a checkpoint directory (local or URI) cannot be evaluated, or None."""
    store = Store(path)
    if not store.exists(""):
        return f"{path} does not exist"
    if not store.exists("config.json"):
        return f"{path} has no config.json: not a Hugging Face model directory"
    return None


# ---------------------------------------------------------------- prompts (driver)


@dataclass
class Prompts:
    ids: list[list[int]]
    chosen: list[list[int] | None]
    texts: list[str]
    sha256: str
    rejected: int


def load_prompts(cfg: Config, tok, eval_dir: Store) -> Prompts:
    """`eval.prompts` (default: the eval split, else train) tokenized like the cache; rejects go to a file."""
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


# ---------------------------------------------------------------- keys


def _weights_hash(target: Target, store: Store) -> str:
    """Content hash of a target's weights. Hashing a large model takes a while: the hash is recorded with the
    files' (size, mtime) and reused while they match."""
    stamp = sha256_json(Store(target.path).stamp())  # local or URI: the files' (path, size, mtime)
    if store.exists("identity.json"):
        rec = store.read_json("identity.json")
        if rec.get("stamp") == stamp:
            return rec["sha256"]
    digest = model_files_hash(local_copy(target.path))  # a checkpoint at a URI is downloaded once to hash it
    store.write_json("identity.json", {"path": target.path, "stamp": stamp, "sha256": digest})
    return digest


def _sequence_key(reference: dict[str, Any], sequences: list[np.ndarray], starts: list[int]) -> str:
    """Content key of the reference log-probs of these token sequences."""
    h = hashlib.sha256(json.dumps(reference, sort_keys=True).encode())
    for s, start in zip(sequences, starts):
        h.update(np.asarray([len(s), start], np.int64).tobytes())
        h.update(np.asarray(s, np.int32).tobytes())
    return h.hexdigest()[:24]


def preference_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> dict[str, Any]:
    """DPO's implicit reward r = β (log π − log π_ref) on held-out pairs: accuracy = P(r_chosen > r_rejected)."""
    margins = beta * ((np.asarray(policy_chosen) - ref_chosen) - (np.asarray(policy_rejected) - ref_rejected))
    return {"pref_accuracy": float((margins > 0).mean()) if len(margins) else None,
            "pref_margin_mean": float(margins.mean()) if len(margins) else None, "pref_pairs": int(len(margins))}


# ---------------------------------------------------------------- phases (driver)


@dataclass
class _Job:
    target: Target
    store: Store  # <eval_dir>/<name>
    sample_key: str
    key: str
    sampled: pa.Table | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _engine_max_length(cfg: Config) -> int:
    """Tokens an evaluation engine must hold: a prompt and its completion, or a held-out pair's sequence."""
    return max(cfg.data.max_length, cfg.data.max_prompt_length + cfg.eval.max_new_tokens)


class _Sampling:
    """Phase 1: `eval.num_actors` engine actors at once; chunked calls feed the progress bar. An actor that
    finishes a target takes the next queued target of the same architecture (`engine_signature`) and swaps its
    weights in place, so a run's checkpoints cost one engine start, not one each."""

    def __init__(self, cfg: Config, prompts: Prompts, pairs: pa.Table | None, eos: int | None, progress):
        self.cfg, self.e, self.prompts, self.progress = cfg, cfg.eval, prompts, progress
        self.pairs = ray.put(pairs) if pairs is not None else None
        self.seeds = [sample_seed(self.e.seed, i) for i in range(len(prompts.ids))]
        self.params = dict(n=self.e.samples_per_prompt, temperature=self.e.temperature, top_p=self.e.top_p,
                           max_tokens=self.e.max_new_tokens, stop_token_ids=[eos] if eos is not None else None)
        self.failures: dict[str, str] = {}
        self.engine_starts = 0

    def run(self, jobs: list[_Job]) -> None:
        actor_cls = ray.remote(CheckpointEngine)
        max_len = _engine_max_length(self.cfg)
        signature = {j.target.name: _signature(j.target) for j in jobs}
        queue, running, state = list(jobs), {}, {}
        try:
            self._loop(queue, running, state, actor_cls, max_len, signature)
        finally:  # on an error or an interrupt too: the engines go (finished targets' samples are saved)
            for st in state.values():
                if "actor" in st:
                    ray.kill(st["actor"])

    def _loop(self, queue, running, state, actor_cls, max_len, signature) -> None:
        while queue or running:
            while queue and len(state) < self.e.num_actors:
                job = queue.pop(0)
                kwargs = scorer_kwargs("vllm", self.e, job.target.path, self.cfg.model.dtype, max_len)
                kwargs["seed"] = self.e.seed
                log = f"{job.store.uri}/engine.log"
                actor = actor_cls.options(**actor_options(self.e, spread(self.cfg))).remote(kwargs, log)
                self.engine_starts += 1
                state[job.target.name] = self._fresh(actor, log)
                self._submit(job, state[job.target.name], running)
            done, _ = ray.wait(list(running), num_returns=1)
            job = running.pop(done[0])
            st = state[job.target.name]
            try:
                out = ray.get(done[0])
            except Exception as exc:  # this target alone fails (its engine goes with it); the others go on
                self.failures[job.target.name] = f"{error_line(exc)} (engine log: {st['log']})"
                total = self.e.samples_per_prompt * len(self.prompts.ids)
                self.progress.update(total - sum(len(p) for p in st["parts"]))  # the bar still ends at 100%
                ray.kill(st.pop("actor"))
                del state[job.target.name]
                continue
            if isinstance(out, dict):
                st["parts"].append(out["table"])
                st["seconds"] += out["seconds"]
                self.progress.update(len(out["table"]))
            else:
                st["pref"] = out
            if not self._submit(job, st, running):
                self._save(job, state.pop(job.target.name))
                sig = signature[job.target.name]
                nxt = next((j for j in queue if sig is not None and signature[j.target.name] == sig), None)
                if nxt is None:
                    ray.kill(st.pop("actor"))  # frees the engine before the next target starts
                else:
                    queue.remove(nxt)
                    state[nxt.target.name] = self._fresh(st.pop("actor"), st["log"])
                    self._submit(nxt, state[nxt.target.name], running)
                faults.reach("eval_target_sampled")

    @staticmethod
    def _fresh(actor, log: str) -> dict[str, Any]:
        return {"actor": actor, "log": log, "next": 0, "parts": [], "seconds": 0.0, "pref": None,
                "t0": time.perf_counter()}

    def _submit(self, job: _Job, st: dict[str, Any], running: dict) -> bool:
        n = len(self.prompts.ids)
        if st["next"] < n:
            lo, hi = st["next"], min(st["next"] + self.e.batch_prompts, n)
            fut = st["actor"].sample.remote(self.prompts.ids[lo:hi], self.seeds[lo:hi], self.params, lo,
                                            job.target.path)
            st["next"] = hi
        elif self.pairs is not None and not job.target.is_reference and st["pref"] is None:
            fut = st["actor"].score_pairs.remote(self.pairs, job.target.path)
        else:
            return False
        running[fut] = job
        return True

    def _save(self, job: _Job, st: dict[str, Any]) -> None:
        table = pa.concat_tables(st["parts"]).sort_by([("prompt_index", "ascending"), ("sample_index", "ascending")])
        tokens = int(pa.compute.sum(pa.compute.list_value_length(table.column("completion_ids"))).as_py() or 0)
        meta = {"sample_key": job.sample_key, "sampling_s": st["seconds"], "tokens": tokens,
                "wall_s": time.perf_counter() - st["t0"]}
        if st["pref"] is not None:
            meta["policy_chosen_logps"], meta["policy_rejected_logps"] = (v.tolist() for v in st["pref"])
        job.store.write_parquet("sampled.parquet", table)
        job.store.write_json("sampled.json", meta)
        job.sampled, job.meta = table, meta


def _signature(target: Target) -> str | None:
    """The target's `engine_signature`, read on the driver (local directory or URI)."""
    store = Store(target.path)
    try:
        config = store.read_json("config.json")
        gen = store.read_json("generation_config.json") if store.exists("generation_config.json") else None
    except (OSError, ValueError, UserError):
        return None
    return engine_signature(config, gen)


def _reference_logps(cfg: Config, reference: dict[str, Any], jobs: list[_Job], prompts: Prompts,
                     progress_factory) -> dict[str, list[np.ndarray]]:
    """Phase 2: per-token log π_ref of every sample, by the stage-1 scorer; cached by content under
    `<cache_dir>/eval-reference/<key>.parquet`, so samples scored once are never scored again."""
    cache = Store(cfg.cache_dir).child("eval-reference")
    result: dict[str, list[np.ndarray]] = {}
    todo = []
    for job in jobs:
        seqs, starts = _sequences(job.sampled, prompts)
        key = _sequence_key(reference, seqs, starts)
        if cache.exists(f"{key}.parquet"):
            result[job.target.name] = [np.asarray(v, np.float32) for v in
                                       cache.read_parquet(f"{key}.parquet").column("ref_token_logps").to_pylist()]
        else:
            todo.append((job, key, seqs, starts))
    if not todo:
        return result

    ref = cfg.scoring
    kwargs = scorer_kwargs(ref.engine, ref, _reference_dir(cfg), cfg.model.dtype, _engine_max_length(cfg),
                           cfg.model.trust_remote_code)
    actors = [ray.remote(ReferenceEngine).options(**actor_options(ref, spread(cfg))).remote(
        ref.engine, kwargs, f"{Store(cfg.run_dir).uri}/eval/reference-scorer-{i}.log")
        for i in range(min(ref.num_actors, sum(len(t[2]) for t in todo)))]
    size = max(1, ref.batch_size * 2)  # sequences per call: a scorer batch holds 2 per pair
    chunks = [(j, i) for j, t in enumerate(todo) for i in range(0, len(t[2]), size)]
    parts: list[list[np.ndarray]] = [[] for _ in todo]
    try:
        with progress_factory(total=sum(len(t[2]) for t in todo), desc=f"reference log-probs ({ref.engine})",
                              unit="sample") as bar:
            # The pool keeps every actor busy and yields results in submission order.
            results = ActorPool(actors).map(
                lambda a, c: a.token_logps.remote(todo[c[0]][2][c[1]:c[1] + size], todo[c[0]][3][c[1]:c[1] + size]),
                chunks)
            for (j, _), out in zip(chunks, results):
                parts[j] += out
                bar.update(len(out))
                job, key, seqs, _ = todo[j]
                if len(parts[j]) == len(seqs):
                    cache.write_parquet(f"{key}.parquet", pa.table({"ref_token_logps": pa.array(
                        parts[j], pa.list_(pa.float32()))}))
                    result[job.target.name] = parts[j]
    finally:
        for actor in actors:
            ray.kill(actor)
    return result


def _reference_dir(cfg: Config) -> str:
    return resolve_model(cfg.model.path, cfg.model.revision).local_dir


def _sequences(sampled: pa.Table, prompts: Prompts) -> tuple[list[np.ndarray], list[int]]:
    seqs, starts = [], []
    for pi, comp in zip(sampled.column("prompt_index").to_pylist(), list_column(sampled.column("completion_ids"))):
        p = prompts.ids[pi]
        seqs.append(np.concatenate([np.asarray(p, np.int32), comp.astype(np.int32)]))
        starts.append(len(p))
    return seqs, starts


def _reward_fn(cfg: Config):
    """Rules and callables run here; a reward model runs in a Ray actor (on a GPU with `reward.use_gpu`)."""
    r = cfg.eval.reward
    if r is None:
        return None, lambda: None
    if r.type != "model":
        return build_reward(r), lambda: None

    actor = ray.remote(RewardEngine).options(num_cpus=1, num_gpus=1 if r.use_gpu else 0).remote(
        r, "cuda" if r.use_gpu else "cpu")
    error = ray.get(actor.ready.remote())
    if error:
        ray.kill(actor)
        raise UserError(error)
    return (lambda p, c: ray.get(actor.score.remote(p, c))), lambda: ray.kill(actor)


def _chosen_rewards(store: Store, prompts: Prompts, tok, reward, reward_id) -> np.ndarray:
    """Rewards of the dataset's chosen responses (NaN where a prompt has none); recorded under their key."""
    key = sha256_json({"prompts": prompts.sha256, "reward": reward_id})
    if store.exists("chosen_rewards.json") and store.read_json("chosen_rewards.json")["key"] == key:
        return np.asarray(store.read_json("chosen_rewards.json")["rewards"], np.float64)
    have = [i for i, c in enumerate(prompts.chosen) if c is not None]
    out = np.full(len(prompts.ids), np.nan)
    if have:
        texts = tok.batch_decode([prompts.chosen[i] for i in have], skip_special_tokens=True)
        out[have] = np.asarray(reward([prompts.texts[i] for i in have], texts), np.float64)
    store.write_json("chosen_rewards.json", {"key": key, "rewards": [None if np.isnan(v) else v for v in out]})
    return out


def _finish(job: _Job, prompts: Prompts, completions: list[str], ref_logps: list[np.ndarray],
            rewards: np.ndarray | None, beta: float, pref_ref: tuple[np.ndarray, np.ndarray] | None,
            settings_key: str) -> None:
    """Phase 4 for one target: per-sample Parquet, then result.json (its commit point)."""
    t = job.sampled
    logps = [np.asarray(v, np.float64) for v in t.column("token_logps").to_pylist()]
    lp = np.array([v.sum() for v in logps])
    ref_lp = np.array([v.astype(np.float64).sum() for v in ref_logps])
    kl = lp - ref_lp  # Σ_t log π(y_t|·) − log π_ref(y_t|·) over the sampled tokens: an unbiased KL estimate
    comps = t.column("completion_ids").to_pylist()
    n_tok = np.array([len(c) for c in comps])
    pidx = t.column("prompt_index").to_numpy()
    table = t.append_column("prompt", pa.array([prompts.texts[i] for i in pidx], pa.string()))
    table = table.append_column("completion", pa.array(completions, pa.string()))
    table = table.append_column("ref_token_logps", pa.array(ref_logps, pa.list_(pa.float32())))
    for name, values in (("logp", lp), ("ref_logp", ref_lp), ("kl", kl),
                         ("reward", rewards if rewards is not None else np.full(len(t), np.nan))):
        table = table.append_column(name, pa.array(values, pa.float64()))
    job.store.write_parquet("samples.parquet", table)
    stats: dict[str, Any] = {
        "samples": len(t), "prompts": len(prompts.ids), "completion_tokens_mean": float(n_tok.mean()),
        "truncated_frac": float(np.mean([r == "length" for r in t.column("finish_reason").to_pylist()])),
        "reward_mean": float(rewards.mean()) if rewards is not None else None,
        "reward_se": standard_error(rewards) if rewards is not None else None,
        "kl_mean": float(kl.mean()), "kl_se": standard_error(kl),
        "pref_accuracy": None, "pref_margin_mean": None, "pref_pairs": None,
        "sampling_s": job.meta["sampling_s"],
        "sampling_tokens_per_s": job.meta["tokens"] / job.meta["sampling_s"] if job.meta["sampling_s"] else None}
    if pref_ref is not None and "policy_chosen_logps" in job.meta:
        stats.update(preference_metrics(job.meta["policy_chosen_logps"], job.meta["policy_rejected_logps"],
                                        *pref_ref, beta))
    job.store.write_json("result.json", {"key": job.key, "settings_key": settings_key, "name": job.target.name,
                                         "path": job.target.path, "step": job.target.step,
                                         "is_reference": job.target.is_reference, "stats": stats})


def _rows(eval_store: Store, settings_key: str, baseline: str, chosen: np.ndarray | None) -> list[dict[str, Any]]:
    """Summary rows of every target evaluated with these settings, with win rates against the baseline."""
    results = []
    for name in sorted(eval_store.listdir()):
        sub = eval_store.child(name)
        res = sub.read_json("result.json") if sub.exists("result.json") else None
        if res is not None and res["settings_key"] == settings_key:
            results.append((res, sub))
    base = None
    if baseline == "reference_model":
        ref = next((sub for res, sub in results if res["is_reference"]), None)
        if ref is not None:
            base = ref.read_parquet("samples.parquet").select(["prompt_index", "sample_index", "reward"])
    rows = []
    for res, sub in results:
        row = {"name": res["name"], "path": res["path"], "step": res["step"], **res["stats"],
               "win_rate": None, "win_rate_se": None}
        if res["stats"]["reward_mean"] is not None:
            t = sub.read_parquet("samples.parquet").select(["prompt_index", "sample_index", "reward"])
            if base is not None:
                joined = t.join(base, ["prompt_index", "sample_index"], right_suffix="_base")
                pair = (joined.column("reward").to_numpy(), joined.column("reward_base").to_numpy())
            elif chosen is not None:
                b = chosen[t.column("prompt_index").to_numpy()]
                keep = ~np.isnan(b)
                pair = (t.column("reward").to_numpy()[keep], b[keep])
            else:
                pair = None
            if pair is not None and len(pair[0]):
                row["win_rate"], row["win_rate_se"] = win_rate(*pair)
        rows.append({k: row.get(k) for k in SUMMARY_COLUMNS})
    return rows


# ---------------------------------------------------------------- run


def _preference_pairs(cfg: Config):
    """Held-out cached pairs for preference accuracy: (input columns, (ref chosen, ref rejected), cache key)."""
    if not cfg.eval.preference_accuracy or cfg.data.eval is None:
        return None, None, None
    ref = find_cache(cfg, "eval")
    store = Store(ref.uri)
    table = pa.concat_tables([store.read_parquet(f.removeprefix(ref.uri + "/")) for f in ref.files])
    pairs = table.select(["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"])
    return pairs, (table.column("ref_chosen_logps").to_numpy(), table.column("ref_rejected_logps").to_numpy()), \
        store.read_json("manifest.json")["key"]


@dataclass
class EvalPlan:
    """What `run` will do, resolved on the driver: targets to evaluate (`jobs`), kept ones, failed ones."""

    eval_store: Store
    tok: Any
    prompts: Prompts
    pairs: pa.Table | None
    pref_ref: tuple[np.ndarray, np.ndarray] | None
    reference: dict[str, Any]
    scoring: dict[str, Any]
    settings_key: str
    targets: list[Target]
    failures: dict[str, str]
    jobs: list[_Job]
    reused: list[str]

    @property
    def to_sample(self) -> list[_Job]:
        return [j for j in self.jobs if j.sampled is None]


def prepare(cfg: Config) -> EvalPlan:
    """Resolve prompts, settings and targets; find which targets are already evaluated with these settings."""
    e = cfg.eval
    eval_store = Store(cfg.run_dir).child("eval")
    eval_store.write_bytes("config.yaml", to_yaml(cfg).encode())
    tok_path = cfg.tokenizer.path or cfg.model.path
    tok = load_tokenizer(resolve_tokenizer(tok_path, cfg.model.revision if cfg.tokenizer.path is None else None)
                         .local_dir, read_chat_template(cfg.tokenizer.chat_template))
    prompts = load_prompts(cfg, tok, eval_store)
    pairs, pref_ref, pref_key = _preference_pairs(cfg)
    reference = {"model": resolve_model(cfg.model.path, cfg.model.revision).identity, "dtype": cfg.model.dtype}
    sampling = {"samples_per_prompt": e.samples_per_prompt, "max_new_tokens": e.max_new_tokens,
                "temperature": e.temperature, "top_p": e.top_p, "seed": e.seed, "prompts": prompts.sha256,
                "eos": tok.eos_token_id, "dtype": cfg.model.dtype, "preference_cache": pref_key}
    scoring = {"reference": reference, "reward": reward_identity(e.reward) if e.reward else None,
               "beta": cfg.train.loss.beta}
    settings_key = sha256_json({"sampling": sampling, "scoring": scoring})

    targets = select_targets(cfg)
    failures = {t.name: t.error for t in targets if t.error}
    jobs, reused = [], []
    for t in targets:
        if t.error:
            continue
        store = eval_store.child(t.name)
        sample_key = sha256_json({"sampling": sampling, "weights": _weights_hash(t, store)})
        key = sha256_json({"sample_key": sample_key, "scoring": scoring})
        if store.exists("result.json") and store.read_json("result.json")["key"] == key:
            reused.append(t.name)
            continue
        job = _Job(t, store, sample_key, key)
        if store.exists("sampled.json") and store.read_json("sampled.json")["sample_key"] == sample_key:
            job.sampled, job.meta = store.read_parquet("sampled.parquet"), store.read_json("sampled.json")
        jobs.append(job)
    return EvalPlan(eval_store, tok, prompts, pairs, pref_ref, reference, scoring, settings_key, targets, failures,
                    jobs, reused)


def run(cfg: Config, progress_factory=None) -> EvalResult:
    """Evaluate the selected targets not yet evaluated with these settings; rewrite the report over all."""
    progress_factory = progress_factory or progress_bar
    e = cfg.eval
    plan = prepare(cfg)
    eval_store, tok, prompts, failures = plan.eval_store, plan.tok, plan.prompts, dict(plan.failures)
    to_sample, engine_starts = plan.to_sample, 0
    if to_sample and importlib.util.find_spec("vllm") is None:
        raise UserError("evaluation samples with vLLM, which is not installed; install the `cpu` or `gpu` extra "
                        "(see README)")
    chosen = None
    if plan.jobs or (e.reward is not None and e.win_rate_baseline == "chosen"):
        connect(cfg)
    if to_sample:
        total = len(to_sample) * len(prompts.ids) * e.samples_per_prompt
        with progress_factory(total=total, desc="sampling (vLLM)", unit="sample") as bar:
            sampling_phase = _Sampling(cfg, prompts, plan.pairs, tok.eos_token_id, bar)
            sampling_phase.run(to_sample)
        failures.update(sampling_phase.failures)
        engine_starts = sampling_phase.engine_starts
    jobs = [j for j in plan.jobs if j.sampled is not None]
    reward, close = _reward_fn(cfg)
    try:
        ref_logps = _reference_logps(cfg, plan.reference, jobs, prompts, progress_factory) if jobs else {}
        for job in jobs:
            comps = tok.batch_decode(job.sampled.column("completion_ids").to_pylist(), skip_special_tokens=True)
            rewards = None
            if reward is not None:
                texts = [prompts.texts[i] for i in job.sampled.column("prompt_index").to_pylist()]
                rewards = np.asarray(reward(texts, comps), np.float64)
            _finish(job, prompts, comps, ref_logps[job.target.name], rewards, cfg.train.loss.beta, plan.pref_ref,
                    plan.settings_key)
            faults.reach("eval_target_finished")
        if reward is not None and e.win_rate_baseline == "chosen":
            chosen = _chosen_rewards(eval_store, prompts, tok, reward, plan.scoring["reward"])
    finally:
        close()

    rows = _rows(eval_store, plan.settings_key, e.win_rate_baseline, chosen)
    paths = {t.name: t.path for t in plan.targets}
    failed = [{"name": n, "path": paths[n], "error": msg} for n, msg in failures.items()]
    r = e.reward
    described = "none" if r is None else (r.rule if r.type == "rule" else r.function if r.type == "callable"
                                          else r.model)
    settings = {"prompts": len(prompts.ids), "samples_per_prompt": e.samples_per_prompt,
                "max_new_tokens": e.max_new_tokens, "temperature": e.temperature, "top_p": e.top_p, "seed": e.seed,
                "reward": f"{r.type}: {described}" if r else "none", "baseline": e.win_rate_baseline,
                "reference_engine": cfg.scoring.engine}
    report = write_report(eval_store, rows, failed, settings)
    return EvalResult(eval_store.uri, [j.target.name for j in jobs], reused=plan.reused, failures=failed,
                      report=str(report.report), rows=rows, prompts=len(prompts.ids),
                      prompt_rejects=prompts.rejected, engine_starts=engine_starts)
