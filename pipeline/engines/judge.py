"""An LLM judge as a reward (`eval.reward.type: judge`): a causal LM served by vLLM rates each completion, and the
reward is read from the log-probs of its possible answers, never parsed from generated text.

For a completion c of prompt p, the judge prompt is `judge_template` with `{prompt}` and `{completion}` filled in
(`{prompt}`: the prompt as its source row holds it, a conversation as its messages' text, see `prompt_text`).
With the answers a (`judge_choices`, value v_a), each scored as its exact tokens after the judge prompt,

    ℓ_a    = log p_judge(answer tokens of a | judge prompt)          (a sum over the answer's tokens)
    reward = Σ_a softmax(ℓ)_a · v_a  =  Σ_a v_a · exp(ℓ_a) / Σ_b exp(ℓ_b)

the judge's expected value with its answer distribution restricted to the choices (as G-Eval's probability-weighted
score, Liu et al. 2023). ℓ_a comes from vLLM prompt log-probs of the sequence judge_prompt_ids + answer_ids
(`VllmScorer.token_logps`), one sequence per completion and answer: K answers cost K judge prompts' compute.

Tokenization (`JudgePrompts`): with a chat template (`chat_template`, default: when the judge tokenizer has one) the
filled template is one user message rendered with the generation prompt (`add_generation_prompt=True`), tokenized
without adding special tokens (the template writes them); without, the plain text after BOS when the tokenizer adds
one. Each answer's tokens are those the judge tokenizer gives the answer written right after the prompt (the
tokens of prompt + answer past the prompt's), so a leading space or a multi-token answer is scored exactly as the
judge would write it; they are found once, after the template's own ending (a plain-text template must not end with
a placeholder), and an answer that would merge with that ending into other tokens is refused. A judge prompt
longer than `max_length` (with the longest answer) loses tokens from the start of the prompt text, then of the
completion text; the template's own text is always kept.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import RewardConfig
from pipeline.data.models import effective_template_sha, load_tokenizer, resolve_model, resolve_tokenizer
from pipeline.engines.scorers import VllmScorer
from pipeline.errors import UserError

_PLACEHOLDER = re.compile(r"\{(prompt|completion)\}")
# How the judge's input is built (`prompt_text`, `JudgePrompts`); part of its identity: bump when it changes.
JUDGE_RENDERING = 1
# `judge_engine_kwargs` keys that are `VllmScorer` arguments; the others go to `vllm.LLM`.
SCORER_SETTINGS = ("dtype", "gpu_memory_utilization", "cpu_kv_cache_gb", "tensor_parallel_size", "seed")
_NOT_CAUSAL = ("ForSequenceClassification", "ForTokenClassification", "ForMaskedLM", "ForQuestionAnswering")


def prompt_text(prompt: str, source: Any = None) -> str:
    """What `{prompt}` reads: the prompt as its source row holds it (`prompt_source`): a text as it is, one message
    its content, a conversation its messages as "role: content" paragraphs; without a source, the prompt as the
    policy read it (rendered in its template)."""
    if isinstance(source, str):
        return source
    if isinstance(source, list) and source:
        if len(source) == 1:
            return str(source[0].get("content", ""))
        return "\n\n".join(f"{m.get('role')}: {m.get('content', '')}" for m in source)
    return prompt


def expected_value(choice_logps: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Σ_a softmax(ℓ)_a · v_a per row: the judge's expected value restricted to its answers.

    choice_logps: [N, K] log p(answer k | judge prompt n); values: [K]. Returns float64 [N]. Only differences
    between a row's log-probs matter (the softmax is shift-invariant): the mass outside the answers drops out."""
    logps = np.asarray(choice_logps, dtype=np.float64)
    weights = np.exp(logps - logps.max(axis=1, keepdims=True))
    return (weights / weights.sum(axis=1, keepdims=True)) @ np.asarray(values, dtype=np.float64)


class JudgePrompts:
    """Token ids of judge prompts and of the answers after them, for one judge tokenizer and `RewardConfig`."""

    def __init__(self, tok, cfg: RewardConfig):
        self.tok, self.template, self.max_length = tok, cfg.judge_template, cfg.max_length
        self.chat = bool(tok.chat_template) if cfg.chat_template is None else cfg.chat_template
        if self.chat and not tok.chat_template:
            raise UserError(f"eval.reward.chat_template is true but the tokenizer of the judge {cfg.model!r} has no "
                            f"chat template; unset eval.reward.chat_template to give the judge plain text")
        if not self.chat and re.search(r"\{(prompt|completion)\}$", self.template):
            raise UserError("eval.reward.judge_template ends with a placeholder: in plain text (no chat template) "
                            "the answer would run on from the filled-in text; end it with the question, e.g. "
                            "'...\\nAnswer:'")
        # BOS before plain text when the tokenizer adds one (not an EOS it may append: the answer follows).
        first = tok("").input_ids[:1]
        self.lead = first if not self.chat and tok.bos_token_id is not None and first == [tok.bos_token_id] else []
        context = self.render("", "")
        self.answers = [self._answer_ids(context, a) for a in cfg.judge_choices]
        self.room = max(len(a) for a in self.answers)
        bare = len(self.encode(context)) + self.room
        if bare > self.max_length:
            raise UserError(f"eval.reward.judge_template with its longest answer is {bare} tokens, more than "
                            f"eval.reward.max_length ({self.max_length}); raise max_length well above {bare}")

    def render(self, prompt: str, completion: str) -> str:
        text = _PLACEHOLDER.sub(lambda m: {"prompt": prompt, "completion": completion}[m.group(1)], self.template)
        if not self.chat:
            return text
        try:
            return self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=False)
        except Exception as e:
            raise UserError(f"the judge's chat template failed on a user message ({str(e)[:200]}); set "
                            f"eval.reward.chat_template: false for plain text") from None

    def encode(self, text: str) -> list[int]:
        return self.lead + self.tok(text, add_special_tokens=False).input_ids

    def _answer_ids(self, context: str, answer: str) -> list[int]:
        before = self.tok(context, add_special_tokens=False).input_ids
        after = self.tok(context + answer, add_special_tokens=False).input_ids
        if after[:len(before)] != before:
            raise UserError(f"eval.reward.judge_choices: {answer!r} merges with the end of the judge prompt into "
                            f"other tokens; add or remove a leading space, or end judge_template differently")
        if len(after) == len(before):
            raise UserError(f"eval.reward.judge_choices: {answer!r} tokenizes to nothing after the judge prompt; "
                            f"use visible text")
        return after[len(before):]

    def _drop_start(self, text: str, n: int) -> tuple[str, int]:
        """`text` without its first `n` tokens, and how many of the `n` it could not give."""
        ids = self.tok(text, add_special_tokens=False).input_ids
        if n >= len(ids):
            return "", n - len(ids)
        return self.tok.decode(ids[n:], clean_up_tokenization_spaces=False), 0

    def prompt_ids(self, prompt: str, completion: str) -> list[int]:
        """The judge prompt's ids, shortened (see the module doc) until the longest answer fits in max_length."""
        for _ in range(8):  # decoded cuts re-tokenize to about as many tokens as were kept: few rounds
            ids = self.encode(self.render(prompt, completion))
            over = len(ids) + self.room - self.max_length
            if over <= 0:
                return ids
            prompt, over = self._drop_start(prompt, over)
            completion, _ = self._drop_start(completion, over)
        raise RuntimeError(f"could not shorten a judge prompt to eval.reward.max_length ({self.max_length})")

    def sequences(self, prompts: list[str], completions: list[str],
                  sources: list | None = None) -> tuple[list[np.ndarray], list[int]]:
        """For each completion and then each answer: judge prompt + answer ids, and where the answer starts."""
        sources = [None] * len(prompts) if sources is None else sources
        if not len(prompts) == len(completions) == len(sources):
            raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions, {len(sources)} sources")
        sequences, starts = [], []
        for prompt, completion, source in zip(prompts, completions, sources):
            ids = self.prompt_ids(prompt_text(prompt, source), completion)
            for answer in self.answers:
                sequences.append(np.array(ids + answer, dtype=np.int64))
                starts.append(len(ids))
        return sequences, starts


def _check_causal(local_dir: str, name: str) -> None:
    archs = json.loads((Path(local_dir) / "config.json").read_text()).get("architectures") or []
    if archs and all(a.endswith(_NOT_CAUSAL) for a in archs):
        raise UserError(f"eval.reward.model {name!r} ({', '.join(archs)}) is not a causal LM, which a judge must be; "
                        f"point it at one, or use type: model for a sequence-classification reward model")


def judge_scorer_kwargs(cfg: RewardConfig, model_dir: str) -> dict[str, Any]:
    """`VllmScorer` arguments of the judge's engine (`judge_engine_kwargs`, split between the scorer and vLLM)."""
    extra = dict(cfg.judge_engine_kwargs)
    own = {k: extra.pop(k) for k in SCORER_SETTINGS if k in extra}
    return {"model_dir": model_dir, "dtype": "auto", "max_length": cfg.max_length, **own, "engine_kwargs": extra}


class JudgeReward:
    """`reward(prompts, completions)` by the judge (see the module doc). `scorer`: anything with `token_logps`
    (tests); default: a vLLM engine started here (in the reward actor, `engines.actors.RewardEngine`)."""

    def __init__(self, cfg: RewardConfig, scorer=None):
        local = resolve_model(cfg.model, key="eval.reward.model").local_dir
        _check_causal(local, cfg.model)
        self.prompts = JudgePrompts(load_tokenizer(local), cfg)
        self.values = np.array(list(cfg.judge_choices.values()), dtype=np.float64)
        self.batch_size = cfg.batch_size
        self.scorer = scorer if scorer is not None else VllmScorer(**judge_scorer_kwargs(cfg, local))

    def shutdown(self) -> None:
        getattr(self.scorer, "shutdown", lambda: None)()

    def choice_logps(self, prompts: list[str], completions: list[str], sources: list | None = None) -> np.ndarray:
        """[N, K] log p(answer k | judge prompt of completion n), summed over the answer's tokens."""
        k = len(self.values)
        out = np.empty((len(completions), k), dtype=np.float64)
        for lo in range(0, len(completions), self.batch_size):
            hi = min(lo + self.batch_size, len(completions))
            part = None if sources is None else sources[lo:hi]
            sequences, starts = self.prompts.sequences(prompts[lo:hi], completions[lo:hi], part)
            logps = self.scorer.token_logps(sequences, starts)
            out[lo:hi] = np.array([lp.astype(np.float64).sum() for lp in logps]).reshape(hi - lo, k)
        return out

    def __call__(self, prompts: list[str], completions: list[str], sources: list | None = None) -> np.ndarray:
        sources = None if sources is None else list(sources)
        return expected_value(self.choice_logps(list(prompts), list(completions), sources), self.values)


def judge_identity(cfg: RewardConfig) -> dict[str, Any]:
    """Everything the judge's rewards depend on: weights, tokenizer files and chat template (the tokenizer's
    identity leaves the template out), judge template, answers and values, the chat choice, max_length, how the
    input is built, and the engine settings (dtype among them)."""
    tokenizer = resolve_tokenizer(cfg.model)
    template = effective_template_sha(tokenizer.local_dir, None) if cfg.chat_template is not False else None
    return {"type": "judge", "model": resolve_model(cfg.model, key="eval.reward.model").identity,
            "tokenizer": tokenizer.identity, "chat_template": cfg.chat_template, "template_sha256": template,
            "rendering": JUDGE_RENDERING, "judge_template": cfg.judge_template,
            "choices": sorted(cfg.judge_choices.items()), "max_length": cfg.max_length,
            "engine": cfg.judge_engine_kwargs}
