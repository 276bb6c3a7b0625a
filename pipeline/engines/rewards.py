"""Pluggable rewards for evaluation by sampling: built-in rules, a user's Python function, a reward model, or an
LLM judge (`pipeline.engines.judge`).

`build_reward(cfg)` returns `reward(prompts, completions, sources=None) -> float64 array [N]`, one reward per
completion. `prompts` are the prompts as the policy read them (rendered text); `sources`, when given, each prompt as
its source row holds it (a string, or a list of {role, content} messages; the prompt files' `prompt_source`). Only a
reward model reads `sources`: it renders a conversation with its own chat template (`reward_inputs`); and a judge,
whose `{prompt}` is the source's text. Rules and user functions are called as before, without them.
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
from pipeline.data.models import effective_template_sha, resolve_model, resolve_tokenizer
from pipeline.engines.judge import JudgeReward, judge_identity
from pipeline.errors import UserError
from pipeline.store.fingerprint import sha256_file

Reward = Callable[..., np.ndarray]  # reward(prompts, completions, sources=None)

# How a chat reward model's input is rendered (`reward_inputs`); part of its identity: bump when it changes.
CHAT_RENDERING = 1


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

    def __call__(self, prompts: list[str], completions: list[str], sources: list | None = None) -> np.ndarray:
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
    """The user's `fn(prompts, completions, **kwargs)`; its return value is checked, its exceptions propagate.
    `sources` are not passed: the function's signature is the documented one."""

    def __init__(self, cfg: RewardConfig):
        self.spec, self.kwargs = cfg.function, dict(cfg.kwargs)
        self.fn = load_function(cfg.function)

    def __call__(self, prompts: list[str], completions: list[str], sources: list | None = None) -> np.ndarray:
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


def _conversation(cfg: RewardConfig, tok, prompt: str, completion: str, source) -> list[dict] | None:
    """The messages a reward model's chat template renders for one sample, or None for plain text."""
    if cfg.text == "completion" or cfg.chat_template is False or not tok.chat_template:
        return None
    answer = {"role": "assistant", "content": completion}
    if isinstance(source, list):
        return [*source, answer]
    if cfg.chat_template:  # true: a text prompt is the user's one message
        return [{"role": "user", "content": source if isinstance(source, str) else prompt}, answer]
    return None


def _keep_end(ids: list[int], bos: int | None, max_length: int) -> list[int]:
    """The last `max_length` tokens, the first kept when it is BOS (as the plain-text encode keeps its BOS)."""
    if len(ids) <= max_length:
        return ids
    if bos is not None and ids[0] == bos:
        return ids[:1] + ids[len(ids) - max_length + 1:]
    return ids[len(ids) - max_length:]


def reward_inputs(cfg: RewardConfig, tok, prompts: list[str], completions: list[str],
                  sources: list | None = None) -> list[list[int]]:
    """The token ids a reward model scores for each sample. A conversation (`_conversation`: the prompt's messages
    and the completion as the assistant's turn) is `tok.apply_chat_template(messages, tokenize=False)` encoded
    without adding special tokens (the template writes its own BOS; the tokenizer adding one too would double
    it), i.e. exactly `apply_chat_template(messages, tokenize=True)`; otherwise the plain text prompt +
    completion (or the completion, `text: completion`) as the tokenizer encodes it. Inputs over `max_length`
    keep their end and a leading BOS (plain text: by the tokenizer, which `RewardModel` sets to truncate on the
    left)."""
    sources = [None] * len(prompts) if sources is None else sources
    if not len(prompts) == len(completions) == len(sources):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions, {len(sources)} sources")
    plain, chat = {}, {}
    for i, (prompt, completion, source) in enumerate(zip(prompts, completions, sources)):
        messages = _conversation(cfg, tok, prompt, completion, source)
        if messages is None:
            plain[i] = prompt + completion if cfg.text == "prompt_completion" else completion
            continue
        try:
            chat[i] = tok.apply_chat_template(messages, tokenize=False)
        except Exception as e:  # the policy's template took this conversation, the reward model's does not
            raise UserError(f"eval.reward.model {cfg.model!r}: its chat template failed on a conversation "
                            f"({str(e).splitlines()[0][:200]}); set eval.reward.chat_template: false to score "
                            f"plain text") from None
    ids: dict[int, list[int]] = {}
    if plain:
        encoded = tok(list(plain.values()), truncation=True, max_length=cfg.max_length)["input_ids"]
        ids.update(zip(plain, encoded))
    if chat:
        encoded = tok(list(chat.values()), add_special_tokens=False)["input_ids"]
        ids.update((i, _keep_end(x, tok.bos_token_id, cfg.max_length)) for i, x in zip(chat, encoded))
    return [ids[i] for i in range(len(prompts))]


def reward_dtype(cfg: RewardConfig, device: str) -> torch.dtype:
    """`eval.reward.dtype` resolved on `device`: auto is bfloat16 on a GPU, float32 on a CPU."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class RewardModel:
    """reward = logits[:, label] of a sequence-classification model reading `reward_inputs`: the conversation in
    its own chat template, or plain text."""

    def __init__(self, cfg: RewardConfig, device: str = "cpu"):
        self.cfg, self.device = cfg, device
        local = _resolve(cfg).local_dir
        model, info = AutoModelForSequenceClassification.from_pretrained(local, dtype=reward_dtype(cfg, device),
                                                                         output_loading_info=True)
        if info["missing_keys"]:  # e.g. a causal LM: its score head would be random, and so would the rewards
            raise UserError(f"eval.reward.model {cfg.model!r} is not a sequence-classification model (no weights for "
                            f"{sorted(info['missing_keys'])[:3]}); use a trained reward model")
        self.label = _label_index(cfg, model.config)
        tok = AutoTokenizer.from_pretrained(local)
        if cfg.chat_template and not tok.chat_template:
            raise _no_template(cfg)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        # The classifier pools the last token that is not padding: it must know which id that is.
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        # Keep the end of the completion, which the reward is about; right padding keeps positions as unpadded.
        tok.truncation_side, tok.padding_side = "left", "right"
        self.tok, self.model = tok, model.to(device).eval()

    def __call__(self, prompts: list[str], completions: list[str], sources: list | None = None) -> np.ndarray:
        inputs = reward_inputs(self.cfg, self.tok, prompts, completions, sources)
        out = np.empty(len(inputs), dtype=np.float64)
        # Batches of similar length waste less compute on padding.
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        with torch.inference_mode():
            for s in range(0, len(order), self.cfg.batch_size):
                idx = order[s:s + self.cfg.batch_size]
                width = max(len(inputs[i]) for i in idx)
                ids = torch.full((len(idx), width), self.tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, :len(inputs[i])] = torch.tensor(inputs[i])
                    mask[row, :len(inputs[i])] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                out[idx] = logits[:, self.label].double().cpu().numpy()
        return out


def _no_template(cfg: RewardConfig) -> UserError:
    return UserError(f"eval.reward.chat_template is true but the tokenizer of eval.reward.model {cfg.model!r} has "
                     f"no chat template; unset eval.reward.chat_template to score plain text")


# ---- entry points ------------------------------------------------------------------------------------------------

def build_reward(cfg: RewardConfig, device: str = "cpu") -> Reward:
    """`reward(prompts, completions, sources=None) -> np.ndarray[float64]`, one reward per completion."""
    if cfg.type == "rule":
        return RuleReward(cfg)
    if cfg.type == "callable":
        return CallableReward(cfg)
    if cfg.type == "judge":  # vLLM picks its own device (a GPU when the actor holds one)
        return JudgeReward(cfg)
    return RewardModel(cfg, device)


def reward_identity(cfg: RewardConfig) -> dict[str, Any]:
    """Everything the rewards depend on: rule parameters, the callable's source, the reward model's or judge's
    files and settings."""
    if cfg.type == "rule":
        params = {"lexicon": {"positive": sorted({w.lower() for w in cfg.positive}),
                              "negative": sorted({w.lower() for w in cfg.negative})},
                  "length": {}, "regex": {"pattern": cfg.pattern}}[cfg.rule]
        return {"type": "rule", "rule": cfg.rule, **params}
    if cfg.type == "callable":
        return {"type": "callable", "function": cfg.function, "kwargs": cfg.kwargs,
                "source_sha256": _source_sha(cfg.function)}
    if cfg.type == "judge":
        return judge_identity(cfg)

    # Tokenizer files are not in the model identity, but a different tokenization changes the rewards too.
    tokenizer = resolve_tokenizer(cfg.model)
    identity = {"type": "model", "model": _resolve(cfg).identity, "tokenizer": tokenizer.identity,
                "label": cfg.label, "text": cfg.text, "max_length": cfg.max_length}
    # The chat template is not in the tokenizer's identity. A reward model that reads plain text keeps the
    # identity it had before chat rendering existed (its results stay valid); one that may render conversations
    # adds the template and how it is used.
    template = effective_template_sha(tokenizer.local_dir, None) \
        if cfg.text == "prompt_completion" and cfg.chat_template is not False else None
    if cfg.chat_template and template is None:
        raise _no_template(cfg)
    if template is not None:
        identity.update(rendering=CHAT_RENDERING, chat_template=cfg.chat_template, template_sha256=template)
    return identity
