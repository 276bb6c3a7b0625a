"""Pluggable rewards for evaluation by sampling: built-in rules, a user's Python function, or a reward model.

`build_reward(cfg)` returns `reward(prompts, completions) -> float64 array [N]`, one reward per completion.
`reward_identity(cfg)` is a JSON-able dict that changes whenever the rewards could change (part of a content key).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.config import RewardConfig
from pipeline.data.models import resolve_model, resolve_tokenizer
from pipeline.errors import UserError
from pipeline.store.fingerprint import sha256_file

Reward = Callable[[list[str], list[str]], np.ndarray]


# ---- rules: each maps the config to a function of one completion ------------------------------------------------

def _lexicon(cfg: RewardConfig) -> Callable[[str], float]:
    positive, negative = {w.lower() for w in cfg.positive}, {w.lower() for w in cfg.negative}

    def score(completion: str) -> float:
        words = re.findall(r"[\w']+", completion.lower())
        return sum(w in positive for w in words) - sum(w in negative for w in words)
    return score


def _length(cfg: RewardConfig) -> Callable[[str], float]:
    return lambda completion: len(completion.split())


def _regex(cfg: RewardConfig) -> Callable[[str], float]:
    try:
        pattern = re.compile(cfg.pattern)
    except re.error as e:
        raise UserError(f"eval.reward.pattern {cfg.pattern!r} is not a valid regular expression ({e}); "
                        f"fix it") from None
    return lambda completion: 1.0 if pattern.search(completion) else 0.0


RULES = {"lexicon": _lexicon, "length": _length, "regex": _regex}


class RuleReward:
    """A built-in rule applied to each completion; prompts are ignored."""

    def __init__(self, cfg: RewardConfig):
        self.score = RULES[cfg.rule](cfg)

    def __call__(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        return np.array([self.score(c) for c in completions], dtype=np.float64)


# ---- callables: `module:function` from the working directory or PYTHONPATH ---------------------------------------

def _split_spec(spec: str) -> tuple[str, str]:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UserError(f"eval.reward.function {spec!r} is not of the form module:function; write e.g. "
                        f"my_rewards:score for def score(prompts, completions) in my_rewards.py")
    # Console scripts (dpo-pipeline) do not put the working directory on sys.path; users expect their file there.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return module, name


def _not_found(spec: str, module: str) -> UserError:
    return UserError(f"eval.reward.function {spec!r}: module {module!r} not found; put {module.replace('.', '/')}.py "
                     f"in the working directory ({os.getcwd()}) or add its folder to PYTHONPATH")


def load_function(spec: str) -> Callable:
    module, name = _split_spec(spec)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        # Only the module itself (or its package) missing is a config problem; a missing import inside the
        # user's module is their bug, and its traceback says where.
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            raise _not_found(spec, module) from None
        raise
    fn = getattr(mod, name, None)
    if fn is None:
        raise UserError(f"eval.reward.function {spec!r}: module {module!r} ({getattr(mod, '__file__', None)}) has no "
                        f"attribute {name!r}; check the function name")
    if not callable(fn):
        raise UserError(f"eval.reward.function {spec!r}: {name!r} is a {type(fn).__name__}, not a function; point "
                        f"it at def {name}(prompts, completions, **kwargs)")
    return fn


class CallableReward:
    """The user's `fn(prompts, completions, **kwargs)`; its return value is checked, its exceptions propagate."""

    def __init__(self, cfg: RewardConfig):
        self.spec, self.kwargs = cfg.function, dict(cfg.kwargs)
        self.fn = load_function(cfg.function)

    def __call__(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        out = self.fn(list(prompts), list(completions), **self.kwargs)
        if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):  # numpy arrays, torch tensors
            out = out.tolist()
        bad = None
        if not isinstance(out, (list, tuple)):
            bad = f"returned a {type(out).__name__}"
        elif len(out) != len(completions):
            bad = f"returned {len(out)} values for {len(completions)} completions"
        else:
            bad = next((f"returned {x!r} at index {i}" for i, x in enumerate(out)
                        if not isinstance(x, numbers.Real) or not math.isfinite(x)), None)
        if bad:
            raise UserError(f"eval.reward.function {self.spec!r} {bad}; it must return a list of "
                            f"len(completions) finite numbers, one reward per completion")
        return np.array(out, dtype=np.float64)


def _source_sha(spec: str) -> str | None:
    module, _ = _split_spec(spec)
    try:
        found = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # a parent package is missing
        found = None
    if found is None:
        raise _not_found(spec, module)
    return sha256_file(found.origin) if found.has_location and found.origin else None


# ---- reward models: transformers sequence classification ---------------------------------------------------------

def _resolve(cfg: RewardConfig):
    return resolve_model(cfg.model, key="eval.reward.model")


def _label_index(cfg: RewardConfig, model_config) -> int:
    # transformers 5 often saves label2id as null: id2label is the one that is always there.
    label2id = {str(v): int(k) for k, v in (model_config.id2label or {}).items()}
    label2id.update(model_config.label2id or {})
    n = model_config.num_labels
    if cfg.label is None:
        if n == 1:
            return 0
        raise UserError(f"eval.reward.model {cfg.model!r} has {n} labels {sorted(label2id)}; set eval.reward.label "
                        f"to the one whose logit is the reward")
    if isinstance(cfg.label, str):
        if cfg.label not in label2id:
            raise UserError(f"eval.reward.label {cfg.label!r} is not a label of {cfg.model!r}; use one of "
                            f"{sorted(label2id)} or an index below {n}")
        return int(label2id[cfg.label])
    if not 0 <= cfg.label < n:
        raise UserError(f"eval.reward.label {cfg.label} is out of range: {cfg.model!r} has {n} labels; use 0..{n - 1}")
    return cfg.label


class RewardModel:
    """reward = logits[:, label] of a sequence-classification model reading prompt + completion (or completion)."""

    def __init__(self, cfg: RewardConfig, device: str = "cpu"):
        self.cfg, self.device = cfg, device
        local = _resolve(cfg).local_dir
        model, info = AutoModelForSequenceClassification.from_pretrained(local, dtype=torch.float32,
                                                                         output_loading_info=True)
        if info["missing_keys"]:  # e.g. a causal LM: its score head would be random, and so would the rewards
            raise UserError(f"eval.reward.model {cfg.model!r} is not a sequence-classification model (no weights for "
                            f"{sorted(info['missing_keys'])[:3]}); use a trained reward model")
        self.label = _label_index(cfg, model.config)
        tok = AutoTokenizer.from_pretrained(local)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        # The classifier pools the last token that is not padding: it must know which id that is.
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        # Keep the end of the completion, which the reward is about; right padding keeps positions as unpadded.
        tok.truncation_side, tok.padding_side = "left", "right"
        self.tok, self.model = tok, model.to(device).eval()

    def __call__(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        texts = [p + c for p, c in zip(prompts, completions)] if self.cfg.text == "prompt_completion" \
            else list(completions)
        out = np.empty(len(texts), dtype=np.float64)
        # Batches of similar length waste less compute on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for s in range(0, len(order), self.cfg.batch_size):
                idx = order[s:s + self.cfg.batch_size]
                enc = self.tok([texts[i] for i in idx], padding=True, truncation=True,
                               max_length=self.cfg.max_length, return_tensors="pt").to(self.device)
                logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
                out[idx] = logits[:, self.label].double().cpu().numpy()
        return out


# ---- entry points ------------------------------------------------------------------------------------------------

def build_reward(cfg: RewardConfig, device: str = "cpu") -> Reward:
    """`reward(prompts, completions) -> np.ndarray[float64]`, one reward per completion."""
    if cfg.type == "rule":
        return RuleReward(cfg)
    if cfg.type == "callable":
        return CallableReward(cfg)
    return RewardModel(cfg, device)


def reward_identity(cfg: RewardConfig) -> dict[str, Any]:
    """Everything the rewards depend on: rule parameters, the callable's source, or the reward model's files."""
    if cfg.type == "rule":
        params = {"lexicon": {"positive": sorted({w.lower() for w in cfg.positive}),
                              "negative": sorted({w.lower() for w in cfg.negative})},
                  "length": {}, "regex": {"pattern": cfg.pattern}}[cfg.rule]
        return {"type": "rule", "rule": cfg.rule, **params}
    if cfg.type == "callable":
        return {"type": "callable", "function": cfg.function, "kwargs": cfg.kwargs,
                "source_sha256": _source_sha(cfg.function)}

    # Tokenizer files are not in the model identity, but a different tokenization changes the rewards too.
    return {"type": "model", "model": _resolve(cfg).identity, "tokenizer": resolve_tokenizer(cfg.model).identity,
            "label": cfg.label, "text": cfg.text, "max_length": cfg.max_length}
