"""The configuration schema: one typed, strict section per component, each field documented.

Every field carries its documentation (`description`), which `dpo-pipeline config-docs` renders into the README's
configuration reference. Validators raise `ValueError` with a message naming the fix; `pipeline.config.loading`
turns every problem into a one-line `UserError`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator


class _Strict(BaseModel):
    # coerce_numbers_to_str: `model.revision=1234567` on the command line parses as a YAML int; it is a string.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class ModelConfig(_Strict):
    path: str = Field(description="Reference model: a local directory or a Hugging Face hub id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids; resolved to "
                                                   "a commit, which is part of the cache key. Ignored for local dirs.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the reference model is scored in (part of the cache key).")
    trust_remote_code: bool = Field(False, description="Allow model code from the model directory/hub repo.")
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "flex_attention", "eager"] = Field("auto",
        description="Attention kernel of training (policy, in-loop reference); auto: flash_attention_2 on a GPU with "
                    "`flash-attn` installed (packed rows use its varlen kernel), else transformers' default (sdpa).")


class TokenizerConfig(_Strict):
    path: str | None = Field(None, description="Tokenizer directory or hub id; default: `model.path`.")
    chat_template: str | None = Field(
        None, description="Chat template for conversational data: a path to a Jinja file or the template itself; "
                          "default: the tokenizer's own.")


class DataSource(_Strict):
    path: str = Field(description="A JSON Lines (`.jsonl`, or `.json` holding JSON Lines; JSON arrays are refused) "
                                  "or `.parquet` file at a local path or a `file://`, `s3://`, `gs://` URI; or a "
                                  "local directory saved with `datasets.save_to_disk`, or a `datasets` hub name "
                                  "(exported to Parquet under `cache_dir`, where every node reads it).")
    format: Literal["auto", "standard", "conversational", "implicit"] = Field(
        "auto", description="`standard`: prompt/chosen/rejected strings; `conversational`: lists of "
                            "{role, content} messages; `implicit`: chosen/rejected whole transcripts sharing the "
                            "prompt as prefix; `auto`: detected per row.")
    split: str = Field("train", description="Split to read from a `datasets` name or directory.")
    subset: str | None = Field(None, description="`datasets` configuration name, if the dataset has several.")
    limit: int | None = Field(None, gt=0, description="Use only the first N rows (handy for smoke runs).")


class DataConfig(_Strict):
    train: DataSource = Field(description="Training preference pairs.")
    eval: DataSource | None = Field(None, description="Held-out preference pairs, cached like `train`.")
    max_length: int = Field(512, gt=1, description="Max tokens of prompt + response. Longer responses are "
                                                   "truncated on the right (part of the cache key).")
    max_prompt_length: int = Field(256, gt=0, description="Max prompt tokens. A longer prompt rejects the row "
                                                          "(reason `prompt_too_long`); prompts are never cut.")
    implicit_prompt_marker: str = Field(
        "\n\nAssistant:", description="`implicit` format: the prompt ends after the last occurrence of this "
                                      "marker in the transcripts' common prefix (HH-RLHF style).")

    @model_validator(mode="after")
    def _prompt_shorter_than_total(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                             f"({self.max_length}); lower data.max_prompt_length or raise data.max_length")
        return self


class EngineSettings(_Strict):
    """Ray actors hosting one engine each: shared by reference scoring (`scoring`) and evaluation (`eval`)."""

    num_actors: int = Field(1, gt=0, description="Actors (one engine each) running at once.")
    tensor_parallel_size: int = Field(1, gt=0, description="vLLM tensor-parallel size per actor (GPUs per actor).")
    use_gpu: bool = Field(False, description="Give each actor `tensor_parallel_size` GPUs.")
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per actor.")
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="vLLM memory fraction (of GPU memory; of host memory on CPU).")
    cpu_kv_cache_gb: int = Field(1, gt=0, description="vLLM KV-cache size in GiB on CPU (ignored on GPU).")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict,
                                          description="Extra keyword arguments for `vllm.LLM`.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each actor needs, e.g. `{scorer_node: 1}`: places the "
                                          "actors only on nodes that offer them (`ray start --resources`).")


class ScoringConfig(EngineSettings):
    """Stage 1's reference scorer: the engine that computes log π_ref of every cached response (and, in
    evaluation, of every sample)."""

    engine: Literal["vllm", "hf"] = Field(
        "vllm", description="`vllm`: vLLM prompt log-probs (fast); `hf`: a transformers forward (cross-check).")
    batch_size: int = Field(64, gt=0, description="Pairs handed to a scorer per call.")
    shard_size: int = Field(512, gt=0, description="Source rows per cache file: the unit of resume after a crash.")


class RewardConfig(_Strict):
    type: Literal["rule", "callable", "model", "judge"] = Field(
        description="`rule`: a built-in rule (`rule`); `callable`: your Python function (`function`); `model`: a "
                    "transformers sequence-classification reward model (`model`); `judge`: a causal LM (`model`) "
                    "served by vLLM: the expected value of `judge_choices` under its answer probabilities.")
    rule: Literal["lexicon", "length", "regex"] | None = Field(
        None, description="`lexicon`: count of `positive` words minus count of `negative` words; `length`: words in "
                          "the completion; `regex`: 1 if `pattern` matches the completion, else 0.")
    positive: list[str] = Field(default_factory=list, description="`lexicon` rule: words that add 1 each.")
    negative: list[str] = Field(default_factory=list, description="`lexicon` rule: words that subtract 1 each.")
    pattern: str | None = Field(None, description="`regex` rule: a Python regular expression.")
    function: str | None = Field(
        None, description="`callable`: `module:function`, called as f(prompts, completions, **kwargs) -> one float "
                          "per completion; the module is imported from the working directory or PYTHONPATH.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="`callable`: extra keyword arguments.")
    model: str | None = Field(None, description="`model`: directory or hub id of a sequence-classification model; "
                                                "`judge`: of a causal LM (with its tokenizer).")
    label: int | str | None = Field(
        None, description="`model`: the logit used as reward, by index or label name; default: the only one.")
    text: Literal["prompt_completion", "completion"] = Field(
        "prompt_completion", description="`model`: what the reward model reads: prompt + completion (as a "
                                         "conversation, see `chat_template`), or the completion alone as plain "
                                         "text.")
    chat_template: bool | None = Field(
        None, description="`model`: render the conversation (the prompt's messages and the completion as the "
                          "assistant's turn) with the reward model's own chat template. Default: when the prompt is "
                          "a list of messages and the reward model's tokenizer has a template, else plain text; "
                          "`false`: plain text always; `true`: always, a text prompt as one user message (the "
                          "tokenizer must have a template). `judge`: the filled `judge_template` as one user message "
                          "in the judge's chat template and its generation prompt (default: when it has one), else "
                          "plain text after BOS.")
    judge_template: str | None = Field(
        None, description="`judge`: the judge's prompt; `{prompt}` and `{completion}` (both required) are replaced "
                          "by the texts, other braces stay as written. E.g. \"Question: {prompt}\\nReply: "
                          "{completion}\\nIs the reply helpful? Answer Yes or No:\".")
    judge_choices: dict[str, float] = Field(
        default_factory=dict, description="`judge`: the answers (at least 2) and their values, e.g. `{'Yes': 1, "
                                          "'No': 0}` (quoted: YAML reads a bare Yes as true) or `{'1': 1, ..., '5': "
                                          "5}`; each answer is scored as the tokens the judge would write it with.")
    judge_engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="`judge`: its vLLM engine: `dtype` (default `auto`, vLLM's: the "
                                          "checkpoint's, but float32 runs in bf16/fp16; `float32` scores exactly), "
                                          "`gpu_memory_utilization` (0.3), `cpu_kv_cache_gb` (1), "
                                          "`tensor_parallel_size` (1), other `vllm.LLM` arguments.")
    batch_size: int = Field(32, gt=0, description="`model`: texts per forward pass; `judge`: completions per engine "
                                                  "call (one sequence per answer each).")
    max_length: int = Field(512, gt=1, description="`model`: longer inputs are truncated (on the left, keeping "
                                                   "a leading BOS); `judge`: judge prompt + answer, longer ones lose "
                                                   "the start of the prompt, then of the completion.")
    use_gpu: bool = Field(False, description="`model`, `judge`: run it on one GPU (a judge: `tensor_parallel_size`).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="`model`: its weights' "
        "dtype; auto: bfloat16 on a GPU (half the memory of float32: 16 GB for an 8B model), float32 on a CPU.")

    @field_validator("judge_choices", mode="before")
    @classmethod
    def _answers_are_text(cls, value: Any) -> Any:
        if isinstance(value, dict) and any(isinstance(k, bool) for k in value):
            raise ValueError("an answer was read as true/false (YAML reads bare Yes/No/On/Off so); quote the "
                             "answers, e.g. {'Yes': 1, 'No': 0}")
        return value

    @model_validator(mode="after")
    def _complete(self) -> RewardConfig:
        need = {"rule": "rule", "callable": "function", "model": "model", "judge": "model"}[self.type]
        if getattr(self, need) is None:
            raise ValueError(f"reward type {self.type!r} needs eval.reward.{need}; set it")
        if self.type == "rule" and self.rule == "regex" and self.pattern is None:
            raise ValueError("the regex rule needs eval.reward.pattern; set it")
        if self.chat_template and self.text == "completion":
            raise ValueError("eval.reward.chat_template: true renders the conversation, but eval.reward.text: "
                             "completion reads the completion alone; set one of them")
        if self.type == "rule" and self.rule == "lexicon" and not (self.positive or self.negative):
            raise ValueError("the lexicon rule needs eval.reward.positive and/or eval.reward.negative word lists")
        if self.type == "judge":
            _check_judge(self)
        return self


def _check_judge(cfg: RewardConfig) -> None:
    """What is wrong whatever the judge model (what depends on its tokenizer: `pipeline.engines.judge`)."""
    if cfg.judge_template is None:
        raise ValueError("reward type 'judge' needs eval.reward.judge_template, a prompt with {prompt} and "
                         "{completion}; set it")
    missing = [p for p in ("{prompt}", "{completion}") if p not in cfg.judge_template]
    if missing:
        raise ValueError(f"eval.reward.judge_template lacks {' and '.join(missing)}; put the placeholder(s) where "
                         f"the judge should read the text")
    if len(cfg.judge_choices) < 2:
        raise ValueError(f"eval.reward.judge_choices needs at least 2 answers with values, e.g. {{'Yes': 1, 'No': "
                         f"0}}; got {len(cfg.judge_choices)}")
    if "" in cfg.judge_choices:
        raise ValueError("eval.reward.judge_choices has an empty answer; every answer must be some text")
    bad = next((k for k, v in cfg.judge_choices.items() if not math.isfinite(v)), None)
    if bad is not None:
        raise ValueError(f"eval.reward.judge_choices[{bad!r}] is {cfg.judge_choices[bad]}; give it a finite value")
    fixed = sorted({"model", "max_model_len", "skip_tokenizer_init", "tokenizer"} & set(cfg.judge_engine_kwargs))
    if fixed:
        raise ValueError(f"eval.reward.judge_engine_kwargs sets {fixed}, which the judge sets itself (from "
                         f"eval.reward.model and max_length); remove them")


class SamplingSettings(EngineSettings):
    """How vLLM engines in Ray actors sample completions of prompts (evaluation, pair generation)."""

    num_prompts: int | None = Field(None, gt=0, description="Use only the first N prompts.")
    max_new_tokens: int = Field(64, gt=0, description="Max tokens per completion (generation stops at EOS).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0: greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    seed: int = Field(0, description="Sampling seed: the same seed gives the same samples, whatever the batching.")
    batch_prompts: int = Field(256, gt=0, description="Prompts per engine call: the unit of progress and of resume "
                                                      "after a crash; larger calls keep a GPU engine's batch fuller.")


class EvalConfig(SamplingSettings):
    checkpoints: str | list[str] | dict[str, str] = Field(
        "all", description="Which checkpoints of `run_dir` to evaluate: `all`, `last`, `every:K` (every K-th, "
                           "and the last), a list of checkpoint directories (from anywhere), or a mapping from "
                           "names (used in the report) to checkpoint directories.")
    include_reference_model: bool = Field(True, description="Also evaluate the reference model (`model.path`), "
                                                            "the baseline at step 0.")
    prompts: DataSource | None = Field(
        None, description="Prompts to sample from: preference data (its prompts; `chosen` is the `chosen` "
                          "baseline) or rows with just a `prompt`; default: `data.eval`, else `data.train`.")
    samples_per_prompt: int = Field(1, gt=0, description="Completions sampled per prompt.")
    reward: RewardConfig | None = Field(None, description="How completions are scored; none: no reward or win rate.")
    win_rate_baseline: Literal["reference_model", "chosen"] = Field(
        "reference_model", description="Win rate against the reference model's samples (same prompt and sample "
                                       "index) or the dataset's chosen responses, by reward; ties count one half.")
    preference_accuracy: bool = Field(True, description="Implicit-reward accuracy on the cached `data.eval` pairs "
                                                        "(needs its cache: `dpo-pipeline cache`).")

    @model_validator(mode="after")
    def _valid_selection(self) -> EvalConfig:
        if isinstance(self.checkpoints, str) and self.checkpoints not in ("all", "last"):
            every = self.checkpoints.removeprefix("every:")
            if every == self.checkpoints or not every.isdigit() or int(every) < 1:
                raise ValueError(f"checkpoints must be all, last, every:K (K >= 1) or a list of directories, not "
                                 f"{self.checkpoints!r}")
        if self.win_rate_baseline == "reference_model" and not self.include_reference_model and self.reward is not None:
            raise ValueError("win_rate_baseline=reference_model needs include_reference_model=true; set it, or "
                             "win_rate_baseline=chosen")
        return self


# Each loss type's own parameters (beyond `type`, `weight` and `beta`, which every type has). The functions are in
# pipeline/dpo/losses.py (one per type, the paper cited), the README lists them.
REFERENCE_FREE = ("sft", "simpo", "orpo")  # need no reference log-probs, so no cache
_MARGIN = ("sft_weight", "length_normalize", "ld_alpha", "wpo")  # any reference-based type
LOSS_PARAMS: dict[str, tuple[str, ...]] = {
    "sigmoid": ("label_smoothing", *_MARGIN),
    "ipo": _MARGIN,
    "hinge": _MARGIN,
    "robust": ("label_smoothing", *_MARGIN),
    "exo_pair": ("label_smoothing", *_MARGIN),
    "nca_pair": _MARGIN,
    "bco_pair": _MARGIN,
    "sppo_hard": _MARGIN,
    "aot": ("label_smoothing", "sft_weight", "length_normalize", "ld_alpha"),
    "aot_pair": ("label_smoothing", "sft_weight", "length_normalize", "ld_alpha"),
    "apo_zero": _MARGIN,
    "apo_down": _MARGIN,
    "discopop": ("discopop_tau", *_MARGIN),
    "f_divergence": ("divergence", "f_alpha", *_MARGIN),
    "sft": (),
    "simpo": ("gamma", "label_smoothing", "wpo"),
    "orpo": ("wpo",),
}


class LossConfig(_Strict):
    """One preference loss (a term of `train.loss`, which is one of these or a weighted list of them)."""

    type: Literal[tuple(LOSS_PARAMS)] = Field(  # type: ignore[valid-type]
        "sigmoid", description="The loss (README \"Preference losses\"): `sigmoid` (DPO; cDPO with label_smoothing), "
                               "`ipo`, `hinge` (SLiC), `robust` (rDPO), `exo_pair`, `nca_pair`, `bco_pair`, "
                               "`sppo_hard`, `aot`, `aot_pair`, `apo_zero`, `apo_down`, `discopop`, `f_divergence`, "
                               "`sft` (Preferred-FT); reference-free: `simpo`, `orpo`.")
    weight: float = Field(1.0, gt=0, description="Weight of this term in a list of losses (their weighted sum).")
    beta: float = Field(0.1, gt=0, description="β: strength of the KL constraint to the reference (`ipo`: τ; "
                                               "`simpo`: the reward scale, 2.0-2.5 in the paper; `orpo`: λ).")
    label_smoothing: float | None = Field(
        None, ge=0, lt=0.5, description="ε, the assumed label-noise rate: `sigmoid` (cDPO), `robust`, `aot`, "
                                        "`aot_pair`, `simpo` (default 0); `exo_pair` (default 1e-3, must be > 0).")
    sft_weight: float = Field(0.0, ge=0, description="Weight of an SFT term (the chosen response's mean token NLL) "
                                                     "added to a reference-based loss (RPO).")
    length_normalize: bool | None = Field(
        None, description="Mean instead of sum of token log-probs (policy and reference): length-normalized DPO. "
                          "Default: true for `ipo` (its authors' form, as TRL), else false.")
    ld_alpha: float | None = Field(
        None, ge=0, le=1, description="LD-DPO: tokens past the shorter response's length weigh α (policy and "
                                      "reference; reads the cache's per-token reference log-probs). 1: DPO.")
    wpo: bool = Field(False, description="WPO: weight each pair by the policy's own length-normalized probability of "
                                         "its two responses (no gradient through the weight).")
    discopop_tau: float = Field(0.05, gt=0, description="`discopop`: τ, the temperature of the mixing.")
    divergence: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = Field(
        "reverse_kl", description="`f_divergence`: the f-divergence to the reference (reverse_kl is DPO).")
    f_alpha: float = Field(0.5, gt=0, le=1, description="`f_divergence` with alpha_divergence: α of "
                                                        "f'(u) = (1 - u^-α)/α (→0: reverse KL, 1: forward KL).")
    gamma: float = Field(0.5, ge=0, description="`simpo`: γ, the target reward margin.")

    @model_validator(mode="after")
    def _own_parameters(self) -> LossConfig:
        allowed = {"type", "weight", "beta", *LOSS_PARAMS[self.type]}
        # Set to other than its default (a dumped config lists every field at its default: that is not a choice).
        stray = sorted(n for n in set(self.model_fields_set) - allowed
                       if getattr(self, n) != type(self).model_fields[n].default)
        if stray:
            raise ValueError(f"{', '.join(stray)} is not a parameter of the {self.type} loss; remove it (its "
                             f"parameters: {', '.join(sorted(allowed - {'type'}))})")
        if self.type == "exo_pair" and self.label_smoothing == 0:
            raise ValueError("exo_pair needs label_smoothing > 0 (the paper uses 1e-3); set it or leave it unset")
        if self.ld_alpha is not None and self.length_normalize:
            raise ValueError("ld_alpha and length_normalize are two ways to reduce token log-probs; set one")
        return self

    @property
    def smoothing(self) -> float:
        if self.label_smoothing is not None:
            return self.label_smoothing
        return 1e-3 if self.type == "exo_pair" else 0.0

    @property
    def normalized(self) -> bool:
        """Mean token log-probs: simpo and orpo always; ipo unless length_normalize=false."""
        if self.type in ("simpo", "orpo"):
            return True
        return self.length_normalize if self.length_normalize is not None else self.type == "ipo"

    @property
    def needs_reference(self) -> bool:
        return self.type not in REFERENCE_FREE


class ParallelConfig(_Strict):
    """Training resources and parallelism: Ray Train workers, FSDP2 precision and memory savers."""

    num_workers: int = Field(1, gt=0, description="Ray Train workers (one process each; FSDP2 shards across them).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL and bf16 mixed precision; else CPU, gloo.")
    num_cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (its torch threads).")
    param_dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="FSDP2 mixed precision: dtype "
        "of parameters in compute (gradients reduce in fp32); auto: bfloat16 with `use_gpu`, else float32.")
    activation_checkpointing: bool = Field(False, description="Recompute decoder-block activations in backward.")
    recompute_head: bool = Field(True, description="Recompute the LM head's fp32 logits chunk by chunk in backward "
                                 "instead of keeping every scored token's (docs/OPTIMIZATIONS.md).")
    cpu_offload: bool = Field(False, description="Keep sharded parameters and optimizer state on CPU (GPU runs).")
    gpu_memory_gb: float | None = Field(None, gt=0, description="Each worker's GPU memory, which the memory plan "
                                        "must fit (checked before anything starts); default: the driver's GPU's, "
                                        "unchecked when the driver has none.")
    compile: bool = Field(False, description="torch.compile each decoder block (dynamic shapes; compiling takes a "
                          "minute or more at start). Measured on an H200: 1.6x faster steps (docs/GPU.md).")


class OptimConfig(_Strict):
    """AdamW and its learning-rate schedule."""

    lr: float = Field(1e-6, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="LR after warm-up.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (null: no clipping).")


class CheckpointConfig(_Strict):
    """Checkpoints (Hugging Face exports + the sharded training state) and restarts after failures."""

    every: int | None = Field(None, gt=0, description="Checkpoint every N steps (always at the end).")
    keep: int | None = Field(None, gt=0, description="Keep only the N newest checkpoints.")
    max_failures: int = Field(0, ge=-1, description="Restarts from the last checkpoint after a worker failure "
                                                    "(-1: unlimited).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the exported Hugging Face weights. `auto`: the reference model's own (its "
                            "config.json; bfloat16 for most hub models, half the size of the fp32 master weights).")
    async_save: bool = Field(True, description="Write the sharded training state in the background "
                                               "(torch.distributed.checkpoint async save) and upload it to run_dir's "
                                               "storage in the background: steps wait only while it is copied to "
                                               "host memory.")
    staging_dir: str | None = Field(
        None, description="Node-local directory where each rank writes its part of the training state before it "
                          "is uploaded to run_dir's storage (deleted once uploaded). Checked for free space before "
                          "the first step: two copies of the rank's state under async_save (one uploading while the "
                          "next is written), else one. null: `train-state/` in the pipeline's node-local staging "
                          "directory (`$DPO_PIPELINE_STAGING`, default `~/.cache/dpo-pipeline/staging`).")


class LoraSettings(_Strict):
    """LoRA adapters (peft): the base model stays frozen, only the adapters train."""

    rank: int = Field(16, gt=0, description="Adapter rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha: adapter updates are scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules that get adapters: names (`[q_proj, v_proj]`), a regex, or "
                                  "`all-linear` (every linear layer but the output head).")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full beside the adapters (e.g. `[embed_tokens]`), saved with them. "
                          "vLLM does not serve such adapters: evaluate their merged model (`merge: true`).")
    merge: bool = Field(False, description="Also write each checkpoint's merged full model (base + adapters) in "
                                           "`merged/` (built on rank 0's host: one full model in its memory).")


class TrainConfig(_Strict):
    ref_logps: Literal["cached", "in_loop"] = Field(
        "cached", description="Where the reference log-probs come from. `cached`: the stage-1 cache, no reference "
                              "model in memory; `in_loop`: load the reference model and compute them per batch "
                              "(to measure the gain).")
    loss: Annotated[Annotated[LossConfig, Tag("term")] | Annotated[list[LossConfig], Tag("terms")],
                    Discriminator(lambda v: "terms" if isinstance(v, list) else "term")] = Field(
        default_factory=LossConfig, description="The preference loss, or a list of them trained on their weighted "
                                                "sum (e.g. MPO: sigmoid + bco_pair + sft).")
    cache_path: str | None = Field(None, description="Train-split cache directory to use; default: found by key "
                                                     "in cache_dir. Refused if built for other inputs.")
    micro_batch_pairs: int = Field(2, gt=0, description="Pairs per forward pass on each worker.")
    micro_batch_tokens: int | None = Field(None, gt=0, description="Instead: as many pairs per forward pass as fit "
                                           "in this many tokens (prompt twice + both responses; at least one).")
    packing: bool | Literal["auto"] = Field(
        "auto", description="Padding-free rows: a micro-batch's sequences packed into rows as long as its longest, "
                            "attention kept within each. `auto`: packed on CPU workers (measured faster there, "
                            "docs/OPTIMIZATIONS.md) when the model's attention keeps packed sequences apart, else "
                            "padded; padded on GPUs until measured there.")
    global_batch_pairs: int = Field(8, gt=0, description="Pairs per optimizer step over all workers; a multiple of "
                                                         "micro_batch_pairs × parallel.num_workers (gradient "
                                                         "accumulation).")
    epochs: int = Field(1, gt=0, description="Passes over the training pairs.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (default: epochs).")
    seed: int = Field(0, description="Seed of the per-epoch shuffle.")
    shuffle: bool = Field(True, description="Shuffle pairs each epoch (seeded; identical for any worker count).")
    dropout: bool = Field(False, description="Keep the model's dropout layers active in training. Off by default, "
                                             "as in the DPO paper: dropout makes the policy's log-probs noisy "
                                             "(GPT-2, OPT, Falcon and Phi-3 ship with it on).")
    log_every: int = Field(1, gt=0, description="Log metrics every N steps.")
    eval_every: int | None = Field(None, gt=0, description="Eval loss/accuracy on the cached eval split every N steps.")
    init_from: str | None = Field(None, description="The weights the policy starts from: a full model directory "
                                                    "of `model.path`'s architecture (e.g. a checkpoint); default: "
                                                    "`model.path`, the reference.")
    lora: LoraSettings | None = Field(None, description="Train LoRA adapters instead of every weight (set any "
                                                        "key, e.g. `train.lora.rank=16`); checkpoints are PEFT "
                                                        "adapters, evaluated by one vLLM engine of the base.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Workers and FSDP2 settings.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and learning-rate schedule.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig,
                                         description="Checkpointing and restarts.")

    @property
    def losses(self) -> list[LossConfig]:
        """`loss` as a list of terms."""
        return self.loss if isinstance(self.loss, list) else [self.loss]

    @property
    def needs_reference(self) -> bool:
        """Whether any term reads reference log-probs (else training needs no cache and no reference model)."""
        return any(term.needs_reference for term in self.losses)

    @property
    def loss_summary(self) -> str:
        """The loss in a few words, e.g. `sigmoid β=0.1` or `0.8×sigmoid + 0.2×bco_pair + sft` (for the plan)."""
        terms = self.losses
        if len(terms) == 1:
            return f"{terms[0].type} β={terms[0].beta:g}"
        return " + ".join(t.type if t.weight == 1 else f"{t.weight:g}×{t.type}" for t in terms)

    @property
    def reward_beta(self) -> float:
        """β of the implicit rewards reported (training metrics, evaluation): the first term's."""
        return self.losses[0].beta

    @model_validator(mode="after")
    def _batches_divide(self) -> TrainConfig:
        if isinstance(self.loss, list):
            if not self.loss:
                raise ValueError("train.loss is an empty list; give at least one {type: ...}")
            types = [t.type for t in self.loss]
            if len(set(types)) != len(types):
                raise ValueError(f"train.loss lists a type twice ({types}); give each type once with its weight")
        if self.init_from is not None and self.lora is not None:
            raise ValueError("train.init_from with train.lora: adapters start from model.path; merge the adapters "
                             "into a model and set model.path to it, or drop train.init_from")
        per_step = self.micro_batch_pairs * self.parallel.num_workers
        if self.global_batch_pairs % per_step:
            raise ValueError(f"global_batch_pairs ({self.global_batch_pairs}) must be a multiple of "
                             f"micro_batch_pairs × num_workers ({per_step}); change train.global_batch_pairs")
        return self
