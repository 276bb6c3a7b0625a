"""The embedded demo's world: the DPO paper's controlled sentiment task (Rafailov et al. 2023, §6.1, Fig. 2) in
miniature, with nothing downloaded.

- `review()`: a deterministic generator of short movie reviews whose sentiment words follow a per-review latent
  mood, so a review that starts negative tends to stay negative (as on IMDb).
- `reward()`: the ground-truth sentiment reward, a lexicon score (positive minus negative words): the stand-in for
  the paper's sentiment classifier. The evaluation stage computes the same score with its `lexicon` rule.
- `build_sft_model()`: a tiny Llama and a tokenizer built from scratch and fine-tuned (plain next-token
  prediction) on generated reviews: π_SFT, which is also π_ref.

The experiment itself (sampling pairs from π_SFT, the DPO sweep, Preferred-FT, the frontier) is in
`pipeline/demo/experiment.py`.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.config import RewardConfig
from pipeline.demo.tiny import TinyModelSpec, build_model, build_tokenizer
from pipeline.engines.rewards import RULES
from pipeline.runtime.console import progress_bar

# The lexicon: the ground truth of the demo. Adjectives and verbs, so both kinds of slots carry sentiment.
POSITIVE = ("great", "good", "wonderful", "brilliant", "moving", "charming", "funny", "delightful", "superb",
            "beautiful", "loved", "enjoyed")
NEGATIVE = ("bad", "boring", "awful", "dull", "terrible", "weak", "clumsy", "tedious", "flat", "messy", "hated",
            "disliked")
_POS_ADJ, _NEG_ADJ = POSITIVE[:10], NEGATIVE[:10]
_NEUTRAL_ADJ = ("long", "short", "slow", "loud", "quiet", "old", "simple", "strange", "familiar", "dark")
_NOUNS = ("movie", "film", "story", "plot", "acting", "cast", "script", "ending", "music", "dialogue", "pacing",
          "director", "villain", "soundtrack", "camera work", "lead actor")
_ADVERBS = ("", "", "", "very ", "quite ", "really ", "rather ", "truly ", "so ")
_FILM = ("movie", "film", "story")
_VERBS = {1: ("loved", "enjoyed"), -1: ("hated", "disliked"), 0: ("watched", "remember", "saw")}


def _adjective(rng: random.Random, mood: float, charged: float = 0.75) -> str:
    """A sentiment-bearing adjective with probability `charged` (positive with probability `mood`), else neutral."""
    if rng.random() > charged:
        return rng.choice(_NEUTRAL_ADJ)
    return rng.choice(_POS_ADJ if rng.random() < mood else _NEG_ADJ)


def _verb(rng: random.Random, mood: float) -> str:
    if rng.random() < 0.3:
        return rng.choice(_VERBS[0])
    return rng.choice(_VERBS[1] if rng.random() < mood else _VERBS[-1])


def _sentence(rng: random.Random, mood: float) -> str:
    n1, n2 = rng.sample(_NOUNS, 2)
    a1, a2 = _adjective(rng, mood), _adjective(rng, mood)
    adv = rng.choice(_ADVERBS)
    film = rng.choice(_FILM)
    return rng.choice((
        f"the {n1} was {adv}{a1}.",
        f"i thought the {n1} was {adv}{a1}.",
        f"the {n1} felt {a1} and the {n2} was {a2}.",
        f"it is a {adv}{a1} {film}.",
        f"i {_verb(rng, mood)} this {film}.",
        f"the {n1} was {a1}, but the {n2} was {a2}.",
        f"{a1} {n1}, {a2} {n2}.",
        f"overall, {adv}{a1}.",
    ))


def review(rng: random.Random) -> str:
    """One review: 2-4 sentences sharing a latent mood (the probability that a charged word is positive)."""
    mood = rng.choice((0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95))
    return " ".join(_sentence(rng, mood) for _ in range(rng.randint(2, 4)))


def reviews(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [review(rng) for _ in range(n)]


def prompt_of(text: str, rng: random.Random) -> str:
    """A prompt the paper's way: a prefix of a review, here its first 2-5 words."""
    return " ".join(text.split()[:rng.randint(2, 5)])


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [prompt_of(review(rng), rng) for _ in range(n)]


@functools.cache
def _lexicon():
    return RULES["lexicon"](RewardConfig(type="rule", rule="lexicon", positive=list(POSITIVE),
                                         negative=list(NEGATIVE)))


def reward(completion: str) -> float:
    """Ground truth: positive minus negative lexicon words, scored by the evaluation stage's `lexicon` rule."""
    return float(_lexicon()(completion))


# ---------------------------------------------------------------- π_SFT


@dataclass(frozen=True)
class SftSpec:
    """The demo's reference model: shape, data and plain next-token training. Part of the build stamp."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4  # head_dim 32: vLLM's CPU kernels need >= 32
    num_kv_heads: int = 2
    vocab_size: int = 384
    reviews: int = 8000
    epochs: int = 2
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    generator_version: int = 1  # bump when the generator changes: the stamp then rebuilds everything downstream


def build_sft_model(out_dir: str | Path, spec: SftSpec = SftSpec(), log=print) -> Path:
    """Tokenizer + randomly initialised tiny Llama, fine-tuned on generated reviews; saved as a HF directory.

    Skipped when `out_dir` holds a build with the same spec (`SFT.json`, written last)."""
    out = Path(out_dir)
    stamp = {"spec": asdict(spec)}
    if (out / "SFT.json").is_file() and json.loads((out / "SFT.json").read_text())["stamp"] == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    texts = reviews(spec.reviews, spec.seed)
    tok = build_tokenizer(out, vocab_size=spec.vocab_size, corpus=texts[:2000])
    shape = TinyModelSpec(hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                          num_layers=spec.num_layers, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                          initializer_range=0.02, seed=spec.seed)
    model = build_model(out, vocab_size=len(tok), spec=shape, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
                        pad_id=tok.pad_token_id)
    torch.manual_seed(spec.seed)
    # BOS review EOS: a review is a whole response, so sampling from a prefix stops by itself.
    ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    t0 = time.perf_counter()
    loss = _fit(model, ids, spec, tok.pad_token_id, log)
    model.save_pretrained(str(out), safe_serialization=True)
    record = {"stamp": stamp, "final_loss": loss, "seconds": round(time.perf_counter() - t0, 1),
              "tokens": sum(map(len, ids)) * spec.epochs}
    (out / "SFT.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def _fit(model, ids: list[list[int]], spec: SftSpec, pad_id: int, log) -> float:
    """Mean-token cross-entropy, AdamW with cosine decay, length-sorted batches (little padding)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = [order[i:i + spec.batch_size] for i in range(0, len(order), spec.batch_size)]
    total = len(batches) * spec.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    rng = random.Random(spec.seed)
    model.train()
    ema = None
    with progress_bar(total, "SFT of the reference model", "step") as bar:
        for _ in range(spec.epochs):
            rng.shuffle(batches)
            for batch in batches:
                width = max(len(ids[i]) for i in batch)
                x = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, i in enumerate(batch):
                    x[r, :len(ids[i])] = torch.tensor(ids[i])
                    mask[r, :len(ids[i])] = 1
                labels = x.masked_fill(mask == 0, -100)
                loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
                bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
                bar.update(1)
    model.eval()
    log(f"SFT done: {total} steps, final loss {ema:.3f} nats/token")
    return float(ema)
