"""Preference rows: formats, validation and tokenization.

Tokenization rules (identical prompt tokens for chosen and rejected, by construction):
- `standard` / `implicit` text: the prompt is encoded with the tokenizer's special tokens (BOS), each response
  without, and EOS is appended to each response.
- `conversational`: the prompt messages are rendered with the chat template and `add_generation_prompt=True`;
  each response is the rest of the rendering of prompt + response messages (it ends with the template's
  end-of-turn), tokenized in context: the tokens of the whole rendering after the prompt's tokens, so that
  prompt + response are the tokens of the rendering. Nothing is added.
- Truncation: a prompt longer than `max_prompt_length` rejects the row (`prompt_too_long`); responses are cut on
  the right so that prompt + response <= `max_length` (a cut response loses its EOS).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pipeline.data.sources import Reject

ROLES = {"system", "user", "assistant", "tool"}


# ---------------------------------------------------------------- formats


# How rows become tokens, for the cache key: 2 = a chat response is the rendering's tokens after the prompt's
# (before: the response encoded alone, which added a leading-space token with SentencePiece tokenizers).
TOKENIZATION_VERSION = 2

class _Bad(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class _Texts:
    """A row normalised to text: what to tokenize, and how."""

    prompt: str
    chosen: str
    rejected: str
    chat: bool  # rendered by the chat template: no special tokens added, no EOS appended
    source: Any = None  # the prompt as the row holds it (a string, or the prompt messages): for datasets built from it


def detect_format(row: dict[str, Any]) -> str:
    chosen = row.get("chosen")
    if isinstance(chosen, list) or isinstance(row.get("prompt"), list):
        return "conversational"
    if "prompt" in row:
        return "standard"
    if "chosen" in row or "rejected" in row:
        return "implicit"
    raise _Bad("unrecognised_format", "expected prompt/chosen/rejected, or chosen/rejected transcripts")


def _text(row: dict[str, Any], key: str) -> str:
    if key not in row or row[key] is None:
        raise _Bad("missing_field", f"field {key!r} is missing")
    value = row[key]
    if not isinstance(value, str):
        raise _Bad("wrong_type", f"field {key!r} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise _Bad("empty_field", f"field {key!r} is empty")
    return value


def _messages(row: dict[str, Any], key: str) -> list[dict[str, str]]:
    if key not in row or row[key] is None:
        raise _Bad("missing_field", f"field {key!r} is missing")
    msgs = row[key]
    if not isinstance(msgs, list):
        raise _Bad("wrong_type", f"field {key!r} must be a list of messages, not {type(msgs).__name__}")
    if not msgs:
        raise _Bad("empty_field", f"field {key!r} has no messages")
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _Bad("bad_message", f"field {key!r} holds a message that is not {{role: str, content: str}}")
        if m["role"] not in ROLES:
            raise _Bad("bad_message", f"field {key!r} has unknown role {m['role']!r} (known: {sorted(ROLES)})")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _split_implicit(chosen: str, rejected: str, marker: str) -> tuple[str, str, str]:
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    common = chosen[:n]
    cut = common.rfind(marker)
    if cut >= 0:
        n = cut + len(marker)
    else:  # no turn marker: do not split a word between prompt and response
        while n > 0 and not chosen[n - 1].isspace():
            n -= 1
    prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
    if not prompt.strip():
        raise _Bad("no_common_prompt", "chosen and rejected share no prompt prefix")
    if not c.strip() or not r.strip():
        raise _Bad("empty_response", "a transcript has no response after the shared prompt")
    return prompt, c, r


def _chat_texts(row: dict[str, Any], tok) -> _Texts:
    chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
    if isinstance(row.get("prompt"), list):
        prompt = _messages(row, "prompt")
        # Some datasets repeat the prompt at the start of each response list (ultrafeedback_binarized).
        chosen = chosen[len(prompt):] if chosen[: len(prompt)] == prompt else chosen
        rejected = rejected[len(prompt):] if rejected[: len(prompt)] == prompt else rejected
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if not prompt:
        raise _Bad("empty_field", "the conversation has no prompt messages")
    if not chosen or not rejected:
        raise _Bad("empty_response", "chosen or rejected has no messages after the prompt")
    if chosen == rejected:
        raise _Bad("chosen_equals_rejected", "chosen and rejected are identical")
    for side, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[0]["role"] != "assistant":
            raise _Bad("bad_message", f"{side} response must start with an assistant message, not "
                                      f"{msgs[0]['role']!r}")
    try:
        p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full_c = tok.apply_chat_template(prompt + chosen, tokenize=False)
        full_r = tok.apply_chat_template(prompt + rejected, tokenize=False)
    except Exception as e:  # template errors are per-row data problems (e.g. role order the template refuses)
        raise _Bad("chat_template_error", f"the chat template failed on this row: {str(e)[:200]}") from None
    if not (full_c.startswith(p) and full_r.startswith(p)):
        raise _Bad("chat_template_error", "the rendered conversation does not start with the rendered prompt")
    return _Texts(p, full_c[len(p):], full_r[len(p):], chat=True, source=prompt)


def normalise(row: Any, fmt: str, tok, marker: str) -> _Texts:
    """One raw row -> prompt/chosen/rejected texts, or `_Bad` with a reason."""
    if not isinstance(row, dict):
        raise _Bad("not_an_object", f"row must be an object, not {type(row).__name__}")
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt == "conversational" or (fmt == "implicit" and isinstance(row.get("chosen"), list)):
        return _chat_texts(row, tok)
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if chosen == rejected:
        raise _Bad("chosen_equals_rejected", "chosen and rejected are identical")
    if fmt == "standard":
        return _Texts(_text(row, "prompt"), chosen, rejected, chat=False, source=_text(row, "prompt"))
    prompt, c, r = _split_implicit(chosen, rejected, marker)
    return _Texts(prompt, c, r, chat=False, source=prompt)


# ---------------------------------------------------------------- tokenization


@dataclass
class Pair:
    index: int
    id: str
    prompt_input_ids: list[int]
    chosen_input_ids: list[int]
    rejected_input_ids: list[int]


# C0 control characters other than tab, newline, form feed and carriage return: binary junk in a text field.
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f]")


def text_problem(text: str) -> str | None:
    """The reason a row with this text would be rejected (`invalid_utf8`, `control_characters`), or None."""
    if not _is_text(text):
        return "invalid_utf8"
    return "control_characters" if _CONTROL.search(text) else None


def _is_text(s: str) -> bool:
    """False for strings with lone surrogates: valid JSON escapes, but no tokenizer (or Arrow) accepts them."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _row_id(row: Any, index: int) -> str:
    if isinstance(row, dict) and row.get("id") is not None:
        rid = row["id"]
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or (isinstance(rid, str) and not rid.strip()):
            raise _Bad("bad_id", f"field 'id' must be a non-empty string or an integer, not {rid!r}"[:200])
        if not _is_text(str(rid)):
            raise _Bad("bad_id", "field 'id' holds a lone surrogate escape (\\ud800-\\udfff), which is not text")
        return str(rid)
    return str(index)


def _encode(tok, texts: list[str], special: bool) -> list[list[int]]:
    return tok(texts, add_special_tokens=special)["input_ids"] if texts else []


def _encode_prompts(tok, texts: list[_Texts]) -> list[list[int]]:
    """Prompt token ids: plain prompts get the tokenizer's special tokens (BOS); rendered chat prompts already
    hold them. Two encode calls (batched, in Rust), results put back in row order."""
    plain_ids = iter(_encode(tok, [t.prompt for t in texts if not t.chat], special=True))
    chat_ids = iter(_encode(tok, [t.prompt for t in texts if t.chat], special=False))
    return [next(chat_ids) if t.chat else next(plain_ids) for t in texts]


def _encode_responses(tok, texts: list[_Texts], prompt_ids: list[list[int]], responses: list[str]) -> list[list[int]]:
    """Response token ids, in row order. A plain response is encoded alone (EOS is appended later). A chat response
    is encoded in context: the whole rendering, minus the prompt's tokens. Encoded alone, its first token can differ
    from the one the model sees after its generation prompt: SentencePiece tokenizers (Mistral, Phi-3; Metaspace
    with prepend_scheme="first") prepend "▁" to the start of a text, so "<|assistant|>\n" + "The" gives an extra
    "▁" token that neither the rendering nor generation ever has. Each chat prompt is tokenized once more per
    response (batched, in Rust). Where the rendering's tokens do not start with the prompt's (a merge across the
    boundary), the response is encoded alone, so that chosen and rejected keep the prompt's tokens."""
    ids: list[list[int]] = [[] for _ in texts]
    plain = [i for i, t in enumerate(texts) if not t.chat]
    chat = [i for i, t in enumerate(texts) if t.chat and responses[i]]  # prompt-only rows have no response
    for i, r in zip(plain, _encode(tok, [responses[i] for i in plain], special=False)):
        ids[i] = r
    for i, whole in zip(chat, _encode(tok, [texts[i].prompt + responses[i] for i in chat], special=False)):
        p = prompt_ids[i]
        ids[i] = whole[len(p):] if whole[:len(p)] == p else _encode(tok, [responses[i]], special=False)[0]
    return ids


def _normalised(rows: list[tuple[int, Any]], to_texts) -> tuple[list[tuple[int, str, _Texts, Any]], list[Reject]]:
    """Rows -> (index, id, texts, row) of the usable ones, and rejects with their reason; `to_texts(row)` raises
    `_Bad` for an unusable row."""
    ok: list[tuple[int, str, _Texts, Any]] = []
    rejects: list[Reject] = []
    for index, row in rows:
        if isinstance(row, Reject):
            rejects.append(row)
            continue
        rid = None
        try:
            rid = _row_id(row, index)
            texts = to_texts(row)
            if not all(map(_is_text, (texts.prompt, texts.chosen, texts.rejected))):
                raise _Bad("invalid_utf8", "the row's text holds a lone surrogate escape (\\ud800-\\udfff), "
                                           "which is not text")
            ctrl = next((m for t in (texts.prompt, texts.chosen, texts.rejected) if (m := _CONTROL.search(t))), None)
            if ctrl:
                raise _Bad("control_characters", f"the row's text holds control character "
                                                 f"U+{ord(ctrl.group()):04X} (binary data in a text field?)")
            ok.append((index, rid, texts, row))
        except _Bad as bad:
            rejects.append(Reject(index, rid, bad.reason, bad.detail, row))
    return ok, rejects


def tokenize_rows(rows: list[tuple[int, Any]], tok, fmt: str, max_length: int, max_prompt_length: int,
                  marker: str) -> tuple[list[Pair], list[Reject]]:
    """Normalise, tokenize (batched, in the tokenizer's Rust code) and truncate; return pairs and rejects."""
    ok, rejects = _normalised(rows, lambda row: normalise(row, fmt, tok, marker))
    if not ok:
        return [], rejects

    row_texts = [t for _, _, t, _ in ok]
    prompt_ids = _encode_prompts(tok, row_texts)
    chosen_ids = _encode_responses(tok, row_texts, prompt_ids, [t.chosen for t in row_texts])
    rejected_ids = _encode_responses(tok, row_texts, prompt_ids, [t.rejected for t in row_texts])

    pairs: list[Pair] = []
    eos = tok.eos_token_id
    for (index, rid, texts, row), p, c, r in zip(ok, prompt_ids, chosen_ids, rejected_ids):
        if len(p) > max_prompt_length:
            rejects.append(Reject(index, rid, "prompt_too_long",
                                  f"prompt has {len(p)} tokens > data.max_prompt_length={max_prompt_length}", row))
            continue
        if not texts.chat and eos is not None:
            c, r = c + [eos], r + [eos]
        room = max_length - len(p)
        c, r = c[:room], r[:room]
        if c == r:
            rejects.append(Reject(index, rid, "identical_after_truncation",
                                  f"chosen and rejected have the same first {room} tokens", row))
            continue
        pairs.append(Pair(index, rid, p, c, r))
    return pairs, rejects


# ---------------------------------------------------------------- prompts (stage 3)


@dataclass
class PromptItem:
    index: int
    id: str
    prompt_input_ids: list[int]
    chosen_input_ids: list[int] | None  # the dataset's chosen response, when the row has one
    source: str = "null"  # JSON: the prompt as the row holds it (a string, or a list of messages)


def _prompt_texts(row: Any, fmt: str, tok, marker: str) -> _Texts:
    """A preference row (its prompt and chosen response) or a prompt-only row (empty chosen and rejected)."""
    if isinstance(row, dict) and "prompt" in row and "chosen" not in row and "rejected" not in row:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            msgs = _messages(row, "prompt")
            try:
                text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            except Exception as e:
                raise _Bad("chat_template_error", f"the chat template failed on this row: {str(e)[:200]}") from None
            return _Texts(text, "", "", chat=True, source=msgs)
        return _Texts(_text(row, "prompt"), "", "", chat=False, source=_text(row, "prompt"))
    return normalise(row, fmt, tok, marker)


def tokenize_prompts(rows: list[tuple[int, Any]], tok, fmt: str, max_length: int, max_prompt_length: int,
                     marker: str) -> tuple[list[PromptItem], list[Reject]]:
    """Prompts to sample from: the prompt (and chosen response, truncated like the cache) of preference rows, or
    rows holding only a `prompt` (a string or a list of messages). Same reasons for rejects as `tokenize_rows`."""
    ok, rejects = _normalised(rows, lambda row: _prompt_texts(row, fmt, tok, marker))
    row_texts = [t for _, _, t, _ in ok]
    prompt_ids = _encode_prompts(tok, row_texts)
    chosen_ids = _encode_responses(tok, row_texts, prompt_ids, [t.chosen for t in row_texts])
    items: list[PromptItem] = []
    eos = tok.eos_token_id
    for (index, rid, texts, row), p, c in zip(ok, prompt_ids, chosen_ids):
        has_chosen = bool(texts.chosen)  # prompt-only rows have none
        if len(p) > max_prompt_length:
            rejects.append(Reject(index, rid, "prompt_too_long",
                                  f"prompt has {len(p)} tokens > data.max_prompt_length={max_prompt_length}", row))
            continue
        if has_chosen and not texts.chat and eos is not None:
            c = c + [eos]
        items.append(PromptItem(index, rid, p, c[:max_length - len(p)] if has_chosen else None,
                                json.dumps(texts.source, ensure_ascii=False)))
    return items, rejects
