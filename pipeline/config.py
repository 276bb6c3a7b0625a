"""Typed, strict configuration: YAML file + dotted command-line overrides -> `Config`.

Every field carries its documentation (`description`), which `dpo-pipeline config-docs` renders into the README's
configuration reference. Unknown keys, wrong types and impossible values are `UserError`s with one line naming the
key and the fix.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import UserError


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


class TokenizerConfig(_Strict):
    path: str | None = Field(None, description="Tokenizer directory or hub id; default: `model.path`.")
    chat_template: str | None = Field(
        None, description="Chat template for conversational data: a path to a Jinja file or the template itself; "
                          "default: the tokenizer's own.")


class DataSource(_Strict):
    path: str = Field(description="A local `.jsonl`/`.json` or `.parquet` file, a directory saved with "
                                  "`datasets.save_to_disk`, or a `datasets` hub name.")
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
    """Ray actors hosting one vLLM engine each: shared by reference scoring (stage 1) and evaluation (stage 3)."""

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


class ReferenceConfig(EngineSettings):
    engine: Literal["vllm", "hf"] = Field(
        "vllm", description="`vllm`: vLLM prompt log-probs (fast); `hf`: a transformers forward (cross-check).")
    batch_size: int = Field(64, gt=0, description="Pairs handed to a scorer per call.")
    shard_size: int = Field(512, gt=0, description="Source rows per cache file: the unit of resume after a crash.")


class RewardConfig(_Strict):
    type: Literal["rule", "callable", "model"] = Field(
        description="`rule`: a built-in rule (`rule`); `callable`: your Python function (`function`); `model`: a "
                    "transformers sequence-classification reward model (`model`).")
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
    model: str | None = Field(None, description="`model`: directory or hub id of a sequence-classification model.")
    label: int | str | None = Field(
        None, description="`model`: the logit used as reward, by index or label name; default: the only one.")
    text: Literal["prompt_completion", "completion"] = Field(
        "prompt_completion", description="`model`: what the reward model reads: prompt + completion, or the "
                                         "completion alone.")
    batch_size: int = Field(32, gt=0, description="`model`: texts per forward pass.")
    max_length: int = Field(512, gt=1, description="`model`: longer inputs are truncated (on the left).")
    use_gpu: bool = Field(False, description="`model`: run the reward model on one GPU.")

    @model_validator(mode="after")
    def _complete(self) -> RewardConfig:
        need = {"rule": "rule", "callable": "function", "model": "model"}[self.type]
        if getattr(self, need) is None:
            raise ValueError(f"reward type {self.type!r} needs eval.reward.{need}; set it")
        if self.type == "rule" and self.rule == "regex" and self.pattern is None:
            raise ValueError("the regex rule needs eval.reward.pattern; set it")
        if self.type == "rule" and self.rule == "lexicon" and not (self.positive or self.negative):
            raise ValueError("the lexicon rule needs eval.reward.positive and/or eval.reward.negative word lists")
        return self


class EvalConfig(EngineSettings):
    checkpoints: str | list[str] | dict[str, str] = Field(
        "all", description="Which checkpoints of `run_dir` to evaluate: `all`, `last`, `every:K` (every K-th, "
                           "and the last), a list of checkpoint directories (from anywhere), or a mapping from "
                           "names (used in the report) to checkpoint directories.")
    include_reference: bool = Field(True, description="Also evaluate the reference model (`model.path`), the "
                                                      "baseline at step 0.")
    prompts: DataSource | None = Field(
        None, description="Prompts to sample from: preference data (its prompts; `chosen` is the `chosen` "
                          "baseline) or rows with just a `prompt`; default: `data.eval`, else `data.train`.")
    num_prompts: int | None = Field(None, gt=0, description="Use only the first N prompts.")
    samples_per_prompt: int = Field(1, gt=0, description="Completions sampled per prompt.")
    max_new_tokens: int = Field(64, gt=0, description="Max tokens per completion (generation stops at EOS).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0: greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    seed: int = Field(0, description="Sampling seed: the same seed gives the same samples, whatever the batching.")
    batch_prompts: int = Field(256, gt=0, description="Prompts per engine call: the unit of progress; larger calls "
                                                      "keep a GPU engine's batch fuller.")
    reward: RewardConfig | None = Field(None, description="How completions are scored; none: no reward or win rate.")
    baseline: Literal["reference", "chosen"] = Field(
        "reference", description="Win rate against the reference model's samples (same prompt and sample index) "
                                 "or the dataset's chosen responses, by reward; ties count one half.")
    preference_accuracy: bool = Field(True, description="Implicit-reward accuracy on the cached `data.eval` pairs "
                                                        "(needs its cache: `dpo-pipeline cache`).")

    @model_validator(mode="after")
    def _valid_selection(self) -> EvalConfig:
        if isinstance(self.checkpoints, str) and self.checkpoints not in ("all", "last"):
            every = self.checkpoints.removeprefix("every:")
            if every == self.checkpoints or not every.isdigit() or int(every) < 1:
                raise ValueError(f"checkpoints must be all, last, every:K (K >= 1) or a list of directories, not "
                                 f"{self.checkpoints!r}")
        if self.baseline == "reference" and not self.include_reference and self.reward is not None:
            raise ValueError("baseline=reference needs include_reference=true; set it, or baseline=chosen")
        return self


class LossConfig(_Strict):
    type: Literal["sigmoid", "ipo", "hinge", "robust", "sft"] = Field(
        "sigmoid", description="`sigmoid`: DPO; `ipo`; `hinge`: SLiC; `robust`: robust DPO; `sft`: Preferred-FT, "
                               "fine-tuning on the chosen responses only (see pipeline/dpo/losses.py).")
    beta: float = Field(0.1, gt=0, description="β: strength of the KL constraint to the reference.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε: assumed label-noise rate (`sigmoid`: "
                                                                   "conservative DPO; `robust`).")
    sft_weight: float = Field(0.0, ge=0, description="Weight of an SFT (mean token NLL) term on chosen responses.")


class TrainConfig(_Strict):
    num_workers: int = Field(1, gt=0, description="Ray Train workers (one process each; FSDP2 shards across them).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL and bf16 mixed precision; else CPU, gloo.")
    num_cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (its torch threads).")
    reference: Literal["cached", "in_loop"] = Field(
        "cached", description="`cached`: reference log-probs from the stage-1 cache, no reference model in memory; "
                              "`in_loop`: load the reference and compute them per batch (to measure the gain).")
    loss: LossConfig = Field(default_factory=LossConfig, description="The preference loss.")
    cache_path: str | None = Field(None, description="Train-split cache directory to use; default: found by key "
                                                     "in cache_dir. Refused if built for other inputs.")
    micro_batch_pairs: int = Field(2, gt=0, description="Pairs per forward pass on each worker.")
    global_batch_pairs: int = Field(8, gt=0, description="Pairs per optimizer step over all workers; a multiple of "
                                                         "micro_batch_pairs × num_workers (gradient accumulation).")
    epochs: int = Field(1, gt=0, description="Passes over the training pairs.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (default: epochs).")
    lr: float = Field(1e-6, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="LR after warm-up.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (null: no clipping).")
    seed: int = Field(0, description="Seed of the per-epoch shuffle.")
    shuffle: bool = Field(True, description="Shuffle pairs each epoch (seeded; identical for any worker count).")
    param_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="FSDP2 mixed precision: dtype of parameters in compute (gradients reduce in fp32).")
    activation_checkpointing: bool = Field(False, description="Recompute decoder-block activations in backward.")
    cpu_offload: bool = Field(False, description="Keep sharded parameters and optimizer state on CPU (GPU runs).")
    compile: bool = Field(False, description="torch.compile each decoder block (dynamic shapes; compiling takes a "
                          "minute or more at start). Measured on an H200: 1.6x faster steps (docs/GPU.md).")
    log_every: int = Field(1, gt=0, description="Log metrics every N steps.")
    eval_every: int | None = Field(None, gt=0, description="Eval loss/accuracy on the cached eval split every N steps.")
    checkpoint_every: int | None = Field(None, gt=0, description="Checkpoint every N steps (always at the end).")
    keep_checkpoints: int | None = Field(None, gt=0, description="Keep only the N newest checkpoints.")
    max_failures: int = Field(0, ge=-1, description="Restarts from the last checkpoint after a worker failure "
                                                    "(-1: unlimited).")

    @model_validator(mode="after")
    def _batches_divide(self) -> TrainConfig:
        per_step = self.micro_batch_pairs * self.num_workers
        if self.global_batch_pairs % per_step:
            raise ValueError(f"global_batch_pairs ({self.global_batch_pairs}) must be a multiple of "
                             f"micro_batch_pairs × num_workers ({per_step}); change train.global_batch_pairs")
        return self


class RayConfig(_Strict):
    address: str | None = Field(None, description="Ray cluster to join (`auto`, `ray://...`); default: the "
                                                  "`RAY_ADDRESS` variable, else a local Ray instance.")
    num_cpus: int | None = Field(None, gt=0, description="CPUs for a local Ray instance; default: all.")
    placement: Literal["default", "spread"] = Field(
        "default", description="`default`: Ray's placement (Ray Train packs workers onto few nodes, evaluation "
                               "actors go where resources are free); `spread`: Ray Train workers and evaluation "
                               "actors over as many nodes as possible (SPREAD). Stage-1 scorer actors always spread "
                               "(Ray Data's default).")


class Config(_Strict):
    model: ModelConfig = Field(description="The reference (and initial policy) model.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer and chat template.")
    data: DataConfig = Field(description="Preference data and truncation.")
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig,
                                       description="Reference log-prob scoring (stage 1).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="DPO training (stage 2).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Checkpoint evaluation by sampling (stage 3).")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray connection.")
    cache_dir: str = Field("cache", description="Root of the content-addressed reference cache: a local path or a "
                                                "`file://`, `s3://`, `gs://` URI; shared storage on several nodes.")
    run_dir: str = Field("runs/default", description="This run's directory (resolved config, logs, checkpoints, "
                                                     "evaluation): a local path or a `file://`, `s3://`, `gs://` URI; "
                                                     "shared storage on several nodes.")


# ---------------------------------------------------------------- loading


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> nested dict. Values are parsed as YAML scalars/flow values (`1`, `true`, `[1, 2]`)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not KEY=VALUE; write e.g. model.path=/models/my-model")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{prefix}{key}.")
        elif isinstance(value, dict) and key in out and out[key] is not None:
            raise UserError(f"config key '{prefix}{key}' is a value, not a section; override it as {prefix}{key}=...")
        else:
            out[key] = value
    return out


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names allowed at the section `loc` points into (for 'did you mean')."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    return list(model.model_fields)


def _one_line(err: ValidationError) -> str:
    errors = err.errors()
    # An unknown key usually also makes its intended key "missing": name the typo, it is the real problem.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc)
    more = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else \
            f"allowed here: {', '.join(allowed)}"
        return f"unknown config key '{key}': {hint}{more}"
    if first["type"] == "missing":
        return f"config key '{key}' is required: set it in the YAML file or pass {key}=VALUE{more}"
    if first["type"] == "value_error":  # our validators' messages name their fix
        msg = first["msg"].removeprefix("Value error, ")
        return f"config key '{key}': {msg}{more}" if key else f"invalid config: {msg}{more}"
    got = first.get("input")
    if first["type"] in ("model_type", "dict_type") and not isinstance(got, dict):
        return f"config key '{key}' is a section: write it as a mapping of its keys, not {got!r}{more}"
    got = "" if isinstance(got, dict) else f" (got {got!r})"
    msg = first["msg"].replace("Input should", "should", 1)
    return f"config key '{key}' {msg}{got}: set {key}=VALUE or fix it in the config file{more}"


# Credentials never belong in a config: it is written to the run directory (config.yaml) and its paths to logs,
# manifests and reports. Tokens and keys come from the environment (HF_TOKEN, AWS_*, GOOGLE_APPLICATION_CREDENTIALS).
_SECRETS = [
    (re.compile(r"://[^/\s@?#:]+:[^\s@?#]*@"), "a user:password in a URI"),
    (re.compile(r"[?&](access_key|secret_key|session_token|token|password|api_key|sig|signature|"
                r"x-amz-credential|x-amz-signature)=", re.I), "a credential in a URI's query"),
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}"), "a Hugging Face token"),
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,})"), "an API token"),
]
_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|apikey|credentials?)(_|$)|api_key|access_key", re.I)


def _find_secret(node: Any, key: str = "") -> tuple[str, str] | None:
    """(config key, what) of the first credential in a raw config tree, or None."""
    if isinstance(node, dict):
        for k, v in node.items():
            sub = f"{key}.{k}" if key else str(k)
            if _SECRET_KEY.search(str(k)) and isinstance(v, str) and v:
                return sub, "a secret-named setting"
            found = _find_secret(v, sub)
            if found:
                return found
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found = _find_secret(v, f"{key}[{i}]")
            if found:
                return found
    elif isinstance(node, str):
        return next(((key, what) for pattern, what in _SECRETS if pattern.search(node)), None)
    return None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or nothing), apply dotted overrides, validate strictly."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {str(path)!r} not found; pass the path of a YAML file such as "
                            f"configs/tiny.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"config file {str(path)!r} is not valid YAML{where}: fix the syntax there") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {str(path)!r} must be a YAML mapping (key: value), not a "
                            f"{type(data).__name__}")
    data = _merge(data, parse_overrides(overrides or []))
    secret = _find_secret(data)
    if secret:  # the value is not shown: it is the secret
        raise UserError(f"config key '{secret[0]}' holds {secret[1]}, which would be written to the resolved "
                        f"config and logs; remove it and set credentials in the environment instead (HF_TOKEN; "
                        f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; GOOGLE_APPLICATION_CREDENTIALS)")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise UserError(_one_line(e)) from None


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def reference_markdown() -> str:
    """The configuration reference table (README), generated from the field descriptions."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            subs = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
            key = f"{prefix}{name}"
            if subs:
                walk(subs[0], key + ".")
                continue
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:
                default = f"`{field.default_factory()!r}`"
            else:
                default = f"`{field.default!r}`"
            type_name = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "").replace("|", "\\|")
            rows.append(f"| `{key}` | `{type_name}` | {default} | {field.description} |".replace("\n", "\\n"))

    walk(Config, "")
    return "\n".join(rows) + "\n"
