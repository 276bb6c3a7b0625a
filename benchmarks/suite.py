"""The benchmark suite (`make bench`): every comparison in one run, on the same models, data and batch sizes.

Prints one table and writes docs/bench.json and docs/BENCHMARKS.md. Sections:

- scoring: our cache stage with the vLLM engine and the hf engine beside TRL's precompute pass, tokens/s and
  efficiency = tokens/s x 2 x params / the machine's measured fp32 matmul FLOP/s;
- training: our cached-reference and in-loop modes beside TRL `DPOTrainer` with and without a precomputed
  reference: pairs/s, tokens/s, peak RSS per worker;
- sampling: vLLM (the evaluation stage's engine) vs transformers `generate`, tokens/s; sample_curve: vLLM's
  tokens/s against concurrent sequences and KV-cache size (benchmarks/bench_sample_curve.py);
- scaling: whole cache + training cost against the number of pairs, and 1 vs 2 training workers;
- lora: full fine-tuning vs LoRA; losses: what the loss variants cost per step beside DPO's;
- packing: the trainer padded vs padding-free (`train.packing`): pairs/s, tokens/s, padding fraction;
- head: the LM head's logits kept vs recomputed in backward at a 128k vocabulary (benchmarks/bench_head.py);
- memory: peak RSS per worker, cached vs in-loop reference, on a 165M model, with and without activation
  checkpointing.

Models are built from configs (no download): the mid-size one (8 x 512 Llama, head_dim 64, ~28M params) for
every section, the tiny one (`dpo-pipeline tiny-assets`) for scoring and training beside TRL. Data: generated
pairs with prompts of 8-96 words and responses of 8-160 words (~20-330 tokens a sequence).

    python benchmarks/suite.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import transformers
from bench_cache import ROOT, build_data, build_model, matmul_flops, run_engine
from bench_gpu_step import padding_fraction
from bench_sample import build_prompts, run_hf, run_vllm
from bench_train import measure
from bench_trl import scored_tokens, trl_run
from transformers import AutoModelForCausalLM

from pipeline.config import ScoringConfig, load_config
from pipeline.demo.tiny import build_tiny_assets
from pipeline.engines.scorers import ENGINES, scorer_kwargs
from stages import cache, train

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
# Ray starts its workers at niceness 15; TRL runs in a plain process at 0. The same priority for both, so that any
# other load on the machine slows both alike.
os.environ.setdefault("RAY_worker_niceness", "0")

TARGETS = [  # (key in `ratios`, wanted, what)
    ("train_cached_over_trl_precomputed", 1.5, "training pairs/s, cached / TRL precomputed reference"),
    ("train_cached_over_in_loop", 1.3, "training pairs/s, cached / our in-loop reference"),
    ("rss_cached_over_in_loop", 0.6, "peak RSS per worker, cached / in-loop (at most)"),
    ("rss_cached_over_in_loop_large", 0.6, "the same on a 165M model, the lower of its two (section Memory)"),
    ("scoring_over_trl_precompute", 1.5, "reference scoring tokens/s, our best engine / TRL precompute pass"),
    ("scoring_efficiency", 0.6, "reference scoring efficiency, our best engine"),
    ("sampling_vllm_over_generate", 5.0, "sampling tokens/s, vLLM / transformers generate"),
]


def _trl_child(work: str, args: dict, precompute: bool, queue) -> None:
    row = trl_run(Path(work), SimpleNamespace(**args), precompute)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(row)


def trl(work: Path, args, precompute: bool) -> dict:
    """TRL's DPOTrainer in a process of its own (so its peak RSS is its own)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_trl_child, args=(str(work), vars(args), precompute, queue))
    proc.start()
    row = queue.get()
    proc.join()
    return row


def training(work: Path, args, params: int, with_in_loop: bool) -> dict:
    tokens = scored_tokens(work)
    pairs = args.pairs
    t_pre, t_in = trl(work, args, True), trl(work, args, False) if with_in_loop else None
    ours = measure(work, args, ("cached", "in_loop") if with_in_loop else ("cached",))
    # The default rows are packed on a CPU (`train.packing: auto`); padded ones too, for the before/after.
    padded = {**measure(work, args, ("cached",), ("train.packing=false",), tag="-padded")[0], "mode": "cached_padded"}
    rows = [ours[0], padded, *ours[1:], t_pre] + ([t_in] if t_in else [])
    for r in rows:
        if r["mode"].startswith("trl"):  # the same pairs: real tokens per pair as ours count them
            r["tokens_per_s"] = r["pairs_per_s"] * tokens / pairs
    t_pre["precompute_s"] = t_pre["setup_s"] - (t_in or trl(work, args, False))["setup_s"]
    t_pre["precompute_tokens"] = tokens
    t_pre["precompute_tokens_per_s"] = tokens / t_pre["precompute_s"]
    return {"params": params, "rows": rows}


LORA = ("train.lora.rank=16", "train.lora.alpha=32")


def lora(work: Path, args) -> list[dict]:
    """Full fine-tuning vs LoRA (rank 16 on every linear layer) on the same model, data and batches: one Ray Train
    worker, cached reference; the optimizer state is what the worker's AdamW holds after the last step."""
    rows = []
    for name, extra in (("full", ()), ("lora", LORA)):
        row = measure(work, args, ("cached",), extra, tag=f"-{name}")[0]
        run_dir = work / f"cached-{name}"
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        rows.append({**row, "mode": name, "optim_state_mb": last["optim_state_mb"]})
    return rows


LOSS_VARIANTS = (  # (name, train.loss overrides)
    ("sigmoid", ()),
    ("mpo: 0.8 sigmoid + 0.2 bco_pair + sft", (
        "train.loss=[{type: sigmoid, weight: 0.8}, {type: bco_pair, weight: 0.2}, {type: sft}]",)),
    ("sigmoid, ld_alpha 0.5", ("train.loss.ld_alpha=0.5",)),
    ("sigmoid, wpo", ("train.loss.wpo=true",)),
    ("simpo", ("train.loss.type=simpo", "train.loss.beta=2.0")),
)


def losses(work: Path, args) -> list[dict]:
    """What a loss variant costs per step beside DPO's: the same model, data and batches, one Ray Train worker,
    cached reference. LD-DPO reads the per-token reference log-probs too; WPO computes log Σ p² over the vocabulary
    at every response token; the MPO mix adds two terms on the same forward."""
    rows = []
    for i, (name, extra) in enumerate(LOSS_VARIANTS):
        row = measure(work, args, ("cached",), extra, tag=f"-loss{i}")[0]
        last = json.loads((work / f"cached-loss{i}" / "metrics.jsonl").read_text().splitlines()[-1])
        rows.append({**row, "mode": name, "data_read_mb": last["data/read_mb"]})
    return rows


def packing(work: Path, args) -> list[dict]:
    """The trainer on the same pairs padded and packed (`train.packing: true`, the same micro-batches): one Ray
    Train worker, cached reference. Padding: the share of forward positions that are padding, over the cached
    pairs in global batches as the step groups them (by length, then micro-batches)."""
    rows = []
    for name, extra in (("padded", ("train.packing=false",)), ("packed", ("train.packing=true",))):
        rows.append({**measure(work, args, ("cached",), extra, tag=f"-packing-{name}")[0], "mode": name})
    uri = json.loads((work / "cache-run" / "cache.json").read_text())["train"]["uri"]  # (bench_train.measure)
    columns = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]
    table = pa.concat_tables(pq.read_table(f, columns=columns) for f in sorted(Path(uri).rglob("*.parquet")))
    batches = [table.slice(i, args.global_batch) for i in range(0, table.num_rows, args.global_batch)]
    for row in rows:
        row["padding"] = padding_fraction(batches, args.micro_batch, row["mode"] == "packed")
    return rows


MEMORY_MODEL = dict(hidden=1024, layers=12, pairs=48, steps=4)  # Llama 12 x 1024: 165M params


def memory(work: Path, args) -> dict:
    """Peak RSS per worker, cached vs in-loop reference, on a model large enough that its state, not the worker's
    runtime (Ray, torch, the data path), dominates: `MEMORY_MODEL`, one Ray Train worker, fp32, AdamW."""
    d = work / "large"
    d.mkdir()
    params = build_model(d / "model", MEMORY_MODEL["hidden"], MEMORY_MODEL["layers"])
    build_data(d / "data.jsonl", MEMORY_MODEL["pairs"])
    a = SimpleNamespace(**{**vars(args), "pairs": MEMORY_MODEL["pairs"], "steps": MEMORY_MODEL["steps"]})
    rows = [{**row, "activation_checkpointing": ac}
            for ac in (False, True)
            for row in measure(d, a, ("cached", "in_loop"), (f"train.parallel.activation_checkpointing={ac}",),
                               tag="-ac" if ac else "")]
    return {"params": params, **MEMORY_MODEL, "rows": rows}


def sample_curve(work: Path) -> list[dict]:
    """benchmarks/bench_sample_curve.py (vLLM sampling tokens/s against max_num_seqs and the CPU KV cache, each
    point in a fresh process): its rows."""
    out = work / "sample_curve.json"
    subprocess.run([sys.executable, str(Path(__file__).parent / "bench_sample_curve.py"), "--out", str(out)],
                   check=True)
    return json.loads(out.read_text())["rows"]


def head(args) -> list[dict]:
    """benchmarks/bench_head.py in its own processes (peak RSS only grows), at 320 and 960 tokens a row (the
    growth per scored token): its JSON lines."""
    rows = []
    for tokens in (320, 960):
        out = subprocess.run([sys.executable, str(Path(__file__).parent / "bench_head.py"), "--tokens", str(tokens),
                              "--repeats", "1"], capture_output=True, text=True, check=True)
        rows += json.loads(out.stdout.strip().splitlines()[-1])
    return rows


def engine_rate(engine: str, model_dir: Path, data_uri: str, batch_pairs: int = 64) -> dict:
    """Our scorer itself, in this process (as TRL's pass runs): the cache's rows in batches of `batch_pairs`,
    exactly as the stage's actor gets them, after one small warm-up batch. Tokens: prompt + response, both sides."""
    table = pq.read_table(data_uri).select(["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"])
    table = table.append_column("reject", pa.nulls(len(table), pa.string()))
    prompt = pc.sum(pc.list_value_length(table.column("prompt_input_ids"))).as_py()
    tokens = 2 * prompt + sum(pc.sum(pc.list_value_length(table.column(c))).as_py()
                              for c in ("chosen_input_ids", "rejected_input_ids"))
    t0 = time.perf_counter()
    scorer = ENGINES[engine](**scorer_kwargs(engine, ScoringConfig(), str(model_dir), "float32", 512))
    start_s = time.perf_counter() - t0
    try:
        scorer(table.slice(0, 4))  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(table), batch_pairs):
            scorer(table.slice(i, batch_pairs))
        seconds = time.perf_counter() - t0
    finally:
        if engine == "vllm":
            scorer.llm.llm_engine.engine_core.shutdown()
    del scorer
    gc.collect()
    return {"engine_start_s": start_s, "engine_s": seconds, "engine_tokens_per_s": tokens / seconds}


def scoring(work: Path, args, engines: tuple[str, ...]) -> list[dict]:
    ns = SimpleNamespace(batch_size=64, shard_size=64, actor_cpus=2, ray_cpus=args.ray_cpus)
    rows = [run_engine(e, work / "model", work / "data.jsonl", work / "scoring", ns) for e in engines]
    for r in rows:
        r.update(engine_rate(r["engine"], work / "model", r.pop("data_uri")))
    return rows


def sampling(work: Path, args) -> list[dict]:
    ns = SimpleNamespace(engine_kwargs={}, prompt_len=64, new_tokens=128, samples_per_prompt=2, threads=2,
                         hf_batch=16)
    prompts = build_prompts(work / "sampling", work / "model", args.sample_prompts, ns.prompt_len)
    rows = [{"engine": "vllm", **run_vllm(work / "model", prompts, ns)},
            {"engine": "hf", **run_hf(work / "model", prompts, ns)}]
    for r in rows:
        r["tokens_per_s"] = r["tokens"] / r["sampling_s"]
    return rows


def scaling(work: Path, args) -> dict:
    """Whole cache (hf engine) + one training epoch at several dataset sizes; 1 vs 2 training workers."""
    sizes = []
    for n in args.scaling_pairs:
        d = work / f"scale-{n}"
        d.mkdir()
        (d / "model").symlink_to(work / "model")
        build_data(d / "data.jsonl", n, seed=1)
        base = [f"model.path={d / 'model'}", f"data.train.path={d / 'data.jsonl'}", "data.max_length=512",
                "data.max_prompt_length=192", f"cache_dir={d / 'cache'}", "scoring.engine=hf",
                f"ray.num_cpus={args.ray_cpus}", f"train.global_batch_pairs={args.global_batch}",
                f"train.micro_batch_pairs={args.micro_batch}", f"train.parallel.num_cpus_per_worker={args.worker_cpus}",
                "train.optim.lr=1e-5", f"train.checkpoint.every={10 ** 6}", f"run_dir={d / 'run'}"]
        cfg = load_config(None, base)
        t0 = time.perf_counter()
        cache.run(cfg)
        t1 = time.perf_counter()
        train.run(cfg)
        t2 = time.perf_counter()
        sizes.append({"pairs": n, "cache_s": t1 - t0, "train_s": t2 - t1})
    workers = []
    for w, cpus in ((1, 2), (2, 1)):
        ns = SimpleNamespace(**{**vars(args), "worker_cpus": cpus})
        (row,) = measure(work, ns, ("cached",), extra=(f"train.parallel.num_workers={w}",), tag=f"-{w}w")
        workers.append({"workers": w, "cpus_per_worker": cpus, **row})
    return {"sizes": sizes, "workers": workers}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: checks that the suite runs (figures noisy)")
    p.add_argument("--sections",
                   default="scoring,training,sampling,sample_curve,scaling,lora,losses,packing,head,memory")
    p.add_argument("--json", default=str(ROOT / "docs" / "bench.json"))
    p.add_argument("--md", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    p.add_argument("--render", metavar="JSON", help="only rewrite the Markdown from a saved JSON file")
    return p


def settings(quick: bool) -> SimpleNamespace:
    return SimpleNamespace(
        pairs=64 if quick else 256, steps=4 if quick else 8, global_batch=8,
        micro_batch=4, worker_cpus=2, ray_cpus=3, sample_prompts=16 if quick else 64,
        scaling_pairs=(16, 32) if quick else (64, 128, 256), hidden=512, layers=8)


def main() -> None:
    cli = parser().parse_args()
    if cli.render:
        finish(json.loads(Path(cli.render).read_text()), cli)
        return
    args = settings(cli.quick)
    sections = set(cli.sections.split(","))

    torch.set_num_threads(2)
    out: dict = {"machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                             "transformers": transformers.__version__, "vllm": _version("vllm"),
                             "ray": _version("ray"), "trl": _version("trl"),
                             "matmul_gflops_start": peak_gflops()},
                 "settings": vars(args), "quick": cli.quick, "started": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                       time.gmtime())}
    partial = sections != set(parser().get_default("sections").split(",")) and Path(cli.json).exists()
    if partial:
        # A partial run (--sections) updates those sections of the last full run's figures; the full run's machine
        # figures (its matmul rate: the efficiencies' denominator) and duration stay, the update is recorded.
        full = json.loads(Path(cli.json).read_text())
        update = {"at": out["started"], "sections": sorted(sections),
                  "matmul_gflops": out["machine"]["matmul_gflops_start"], "trl": out["machine"]["trl"]}
        update_list = [u for u in full.get("updates", []) if set(u["sections"]) - sections] + [update]
        out = {**full, "settings": out["settings"], "quick": out["quick"], "updates": update_list}
    out.setdefault("section_seconds", {})

    def save(section: str, t0: float) -> None:  # after every section: a crash later loses nothing measured
        out["section_seconds"][section] = time.perf_counter() - t0
        Path(cli.json).write_text(json.dumps(out, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = {}
        for name in ("mid", "tiny"):
            d = work / name
            d.mkdir()
            if name == "mid":
                params = build_model(d / "model", args.hidden, args.layers)
            else:
                build_tiny_assets(d / "model")
                params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(d / "model").parameters())
            models[name] = {"params": params, "dir": d}
        out["models"] = {k: v["params"] for k, v in models.items()}
        mid, tiny = models["mid"]["dir"], models["tiny"]["dir"]
        if "scoring" in sections:
            t0 = time.perf_counter()
            for d in (mid, tiny):  # the training set below: TRL's precompute pass scores the same pairs
                build_data(d / "data.jsonl", args.pairs)
            out["scoring"] = {"mid": scoring(mid, args, ("vllm", "hf")), "tiny": scoring(tiny, args, ("hf",))}
            save("scoring", t0)
        if "training" in sections:
            t0 = time.perf_counter()
            for d in (mid, tiny):
                build_data(d / "data.jsonl", args.pairs)
            out["training"] = {"mid": training(mid, args, models["mid"]["params"], with_in_loop=True),
                               "tiny": training(tiny, args, models["tiny"]["params"], with_in_loop=False)}
            save("training", t0)
        if "sampling" in sections:
            t0 = time.perf_counter()
            (mid / "sampling").mkdir()
            out["sampling"] = sampling(mid, args)
            save("sampling", t0)
        # The sections that train on the mid model's pairs (each rebuilds them: the same file, the same cache key).
        for name, section in (("lora", lora), ("losses", losses), ("packing", packing), ("scaling", scaling)):
            if name in sections:
                t0 = time.perf_counter()
                build_data(mid / "data.jsonl", args.pairs)
                out[name] = section(mid, args)
                save(name, t0)
        if "head" in sections:
            t0 = time.perf_counter()
            out["head"] = head(args)
            save("head", t0)
        if "sample_curve" in sections:
            t0 = time.perf_counter()
            out["sample_curve"] = sample_curve(work)
            save("sample_curve", t0)
        if "memory" in sections:
            t0 = time.perf_counter()
            out["memory"] = memory(work, args)
            save("memory", t0)
    if not partial:
        out["seconds"] = sum(out["section_seconds"].values())
        out["machine"]["matmul_gflops_end"] = peak_gflops()
    finish(out, cli)


def peak_gflops(trials: int = 5) -> float:
    """The machine's fp32 matmul rate: the best of a few trials (other load only ever lowers it)."""
    return max(matmul_flops() for _ in range(trials)) / 1e9


def finish(out: dict, cli) -> None:
    m = out["machine"]
    # Efficiency is against the best rate measured: at the start and at the end of the run.
    m["matmul_gflops"] = max(v for k, v in m.items() if k.startswith("matmul_gflops_") and v)
    out["ratios"] = ratios(out)
    Path(cli.json).write_text(json.dumps(out, indent=2) + "\n")
    md = render(out)
    Path(cli.md).write_text(md)
    print(md)
    print(f"written: {cli.json}, {cli.md}")


def _version(name: str) -> str | None:
    for n in (name, f"{name}-cpu"):
        try:
            return version(n)
        except PackageNotFoundError:
            pass
    return None


def _steady(e: dict) -> float:
    """An engine's scoring rate by itself (`engine_rate`)."""
    return e["engine_tokens_per_s"]


def ratios(out: dict) -> dict:
    r: dict[str, float] = {}
    flops = out["machine"]["matmul_gflops"] * 1e9
    if "training" in out:
        by = {row["mode"]: row for row in out["training"]["mid"]["rows"]}
        r["train_cached_over_trl_precomputed"] = by["cached"]["pairs_per_s"] / by["trl_precomputed"]["pairs_per_s"]
        r["train_cached_over_trl_in_loop"] = by["cached"]["pairs_per_s"] / by["trl_in_loop"]["pairs_per_s"]
        r["train_cached_over_in_loop"] = by["cached"]["pairs_per_s"] / by["in_loop"]["pairs_per_s"]
        r["rss_cached_over_in_loop"] = by["cached"]["peak_rss_mb"] / by["in_loop"]["peak_rss_mb"]
        if "cached_padded" in by:
            r["train_padded_over_trl_precomputed"] = (by["cached_padded"]["pairs_per_s"]
                                                      / by["trl_precomputed"]["pairs_per_s"])
        tiny = {row["mode"]: row for row in out["training"]["tiny"]["rows"]}
        r["tiny_train_cached_over_trl_precomputed"] = (tiny["cached"]["pairs_per_s"]
                                                       / tiny["trl_precomputed"]["pairs_per_s"])
    if "scoring" in out and "training" in out:
        trl_rate = {row["mode"]: row for row in out["training"]["mid"]["rows"]}["trl_precomputed"]
        best = max(out["scoring"]["mid"], key=_steady)
        r["scoring_best_engine"] = best["engine"]
        r["scoring_over_trl_precompute"] = _steady(best) / trl_rate["precompute_tokens_per_s"]
        r["scoring_stage_over_trl_precompute"] = best["stage_tokens_per_s"] / trl_rate["precompute_tokens_per_s"]
    if "scoring" in out:
        best = max(out["scoring"]["mid"], key=_steady)
        r["scoring_efficiency"] = _steady(best) * 2 * out["models"]["mid"] / flops
    if "sampling" in out:
        s = {row["engine"]: row for row in out["sampling"]}
        r["sampling_vllm_over_generate"] = s["vllm"]["tokens_per_s"] / s["hf"]["tokens_per_s"]
    if "memory" in out:
        by = {(row["mode"], row.get("activation_checkpointing", False)): row for row in out["memory"]["rows"]}
        r["rss_cached_over_in_loop_large"] = min(by["cached", ac]["peak_rss_mb"] / by["in_loop", ac]["peak_rss_mb"]
                                                 for ac in (False, True) if ("cached", ac) in by)
    if "scaling" in out:
        w = {row["workers"]: row for row in out["scaling"]["workers"]}
        r["two_workers_over_one"] = w[2]["pairs_per_s"] / w[1]["pairs_per_s"]
    return r


def _f(x, fmt="{:,.0f}") -> str:
    return "—" if x is None else fmt.format(x)


def render(out: dict) -> str:
    m = out["machine"]
    flops = m["matmul_gflops"] * 1e9
    L = ["# Benchmarks", "",
         f"Measured by `make bench` (`python benchmarks/suite.py{' --quick' if out['quick'] else ''}`) on "
         f"{out['started']}, in one run of {out.get('seconds', 0) / 60:.0f} min; raw figures in `docs/bench.json`. "
         f"Machine: {m['cpu_count']} CPU cores, fp32 matmul **{m['matmul_gflops']:.0f} GFLOP/s** (measured: 2048² "
         f"matmuls, 2 threads, the best of 5 trials at the start and at the end of the run); torch {m['torch']}, "
         f"transformers {m['transformers']}, vLLM {m['vllm']}, "
         f"Ray {m['ray']}, TRL {m['trl'] or '(version not recorded)'} (benchmark-only)."
         + "".join(f" Sections {', '.join(u['sections'])} measured again on {u['at']} (`--sections`"
                   + (f"; fp32 matmul {u['matmul_gflops']:.0f} GFLOP/s then" if u.get("matmul_gflops") else "")
                   + (f", TRL {u['trl']}" if u.get("trl") else "")
                   + ")." for u in out.get("updates", [])), "",
         "Absolute times on a shared 2-core machine move by ±10-20% between runs; the ratios, measured side by "
         "side in one run, are what count. Models are built from configs: **mid** = Llama 8 × 512 (head_dim 64, "
         f"{out['models']['mid'] / 1e6:.1f}M params), **tiny** = `dpo-pipeline tiny-assets` "
         f"({out['models']['tiny'] / 1e6:.2f}M params); data: generated pairs, prompts of 8-96 words and "
         "responses of 8-160 words (~20-330 tokens a sequence). GPU figures: [GPU.md](GPU.md). How each "
         "optimization was measured: [OPTIMIZATIONS.md](OPTIMIZATIONS.md).", ""]
    r = out["ratios"]
    L += ["## Targets", "", "| target | wanted | measured | |", "|---|---:|---:|---|"]
    for key, want, what in TARGETS:
        got = r.get(key)
        if got is None:
            continue
        ok = got <= want if key.startswith("rss") else got >= want
        unit = "" if key == "scoring_efficiency" else "×"
        val = f"{got:.0%}" if key == "scoring_efficiency" else f"{got:.2f}{unit}"
        wanted = f"{'≤' if key.startswith('rss') else '≥'} {want:.0%}" if key == "scoring_efficiency" or False \
            else f"{'≤' if key.startswith('rss') else '≥'} {want:g}×"
        L.append(f"| {what} | {wanted} | {val} | {'met' if ok else '**not met**'} |")
    L.append("")
    if "scoring" in out:
        L += ["## Reference scoring", "",
              "Our cache stage (`dpo-pipeline cache`, one scorer actor with 2 CPUs, batches of 64 pairs) beside TRL's "
              "precompute pass (`DPOTrainer(precompute_ref_log_probs=True)`, timed as the difference of the set-up "
              "times with and without it; same model and training pairs). Tokens: every sequence a pass runs "
              "through the model (prompt + response, chosen and rejected). "
              "Efficiency = tokens/s × 2 × params ÷ matmul FLOP/s. *whole stage*: the full command (Ray start, "
              "engine start, tokenization, writing Parquet); *engine*: our scorer by itself in the benchmark's "
              "process, on the cache's rows in the actor's batches of 64 pairs, after a warm-up (as TRL's pass "
              "is timed: in process, without start-up).",
              "", "| model | engine | pairs | whole stage s | stage tok/s | engine tok/s | engine efficiency |",
              "|---|---|---:|---:|---:|---:|---:|"]
        for name in ("mid", "tiny"):
            for e in out["scoring"].get(name) or []:
                eff = _steady(e) * 2 * out["models"][name] / flops
                L.append(f"| {name} | ours, `{e['engine']}` | {e['pairs']} | {e['stage_s']:.1f} | "
                         f"{e['stage_tokens_per_s']:,.0f} | {_steady(e):,.0f} | {eff:.0%} |")
            if "training" in out:
                t = {row["mode"]: row for row in out["training"][name]["rows"]}["trl_precomputed"]
                eff = t["precompute_tokens_per_s"] * 2 * out["models"][name] / flops
                L.append(f"| {name} | TRL precompute pass | {out['settings']['pairs']} | {t['precompute_s']:.1f} | "
                         f"{t['precompute_tokens_per_s']:,.0f} | {t['precompute_tokens_per_s']:,.0f} | {eff:.0%} |")
        L.append("")
    if "training" in out:
        s = out["settings"]
        L += ["## Training", "",
              f"Global batch {s['global_batch']} pairs, micro-batch {s['micro_batch']}, {s['pairs']} pairs, "
              f"AdamW, fp32 on both sides (TRL's `bf16` default is turned off), 2 torch threads, {s['steps']} steps; "
              "medians over the steps after the first two. Ours: one Ray Train worker (FSDP2 over gloo); TRL: one "
              "plain process. Tokens/s counts real (unpadded) tokens. Peak RSS: the worker process (ours, includes "
              "Ray's worker runtime), the whole TRL process (TRL's). Ours run with the defaults: padding-free rows "
              "on a CPU (`train.packing: auto`), except the row marked padded (TRL pads: its padding-free mode is "
              "disabled since its DPO refactor).", "",
              "| model | trainer | pairs/s | tokens/s | peak RSS MB | ours cached ÷ it |",
              "|---|---|---:|---:|---:|---:|"]
        names = {"cached": "ours, cached reference", "cached_padded": "ours, cached reference, padded rows",
                 "in_loop": "ours, in-loop reference",
                 "trl_precomputed": "TRL, precomputed reference", "trl_in_loop": "TRL, in-loop reference"}
        for name in ("mid", "tiny"):
            rows = out["training"][name]["rows"]
            ours = {row["mode"]: row for row in rows}["cached"]["pairs_per_s"]
            for row in rows:
                ratio = "—" if row["mode"] == "cached" else f"{ours / row['pairs_per_s']:.2f}×"
                L.append(f"| {name} | {names[row['mode']]} | {row['pairs_per_s']:.2f} | {row['tokens_per_s']:,.0f} | "
                         f"{row['peak_rss_mb']:,.0f} | {ratio} |")
        L.append("")
    if "sampling" in out:
        L += ["## Evaluation sampling", "",
              f"{out['settings']['sample_prompts']} prompts (≤ 64 tokens) × 2 samples × exactly 128 new tokens, "
              "temperature 1. vLLM: the evaluation stage's `CheckpointEngine.sample` (per-prompt seeds, sampled-token "
              "log-probs); transformers: `generate` on length-sorted, left-padded batches of 16 prompts with the KV "
              "cache. One warm-up call each; engine start reported apart.", "",
              "| engine | start s | sampling s | tokens/s |", "|---|---:|---:|---:|"]
        for row in out["sampling"]:
            L.append(f"| {row['engine']} | {row['start_s']:.1f} | {row['sampling_s']:.2f} | "
                     f"{row['tokens_per_s']:,.0f} |")
        L.append("")
    if "sample_curve" in out:
        rows = out["sample_curve"]
        L += ["## Sampling against concurrent sequences", "",
              f"vLLM alone (`benchmarks/bench_sample_curve.py`: the mid model, {rows[0]['sequences']} sequences of 64 "
              "new tokens, each point in a fresh process) as `max_num_seqs` (sequences decoded together) and the CPU "
              "KV cache (`eval.cpu_kv_cache_gb`) vary.", "",
              "| max_num_seqs | KV cache GiB | tokens/s | sampling s | engine start s |", "|---:|---:|---:|---:|---:|"]
        for row in rows:
            L.append(f"| {row['max_num_seqs']} | {row['kv_cache_gb']} | {row['tokens_per_s']:,.0f} | "
                     f"{row['sampling_s']:.2f} | {row['start_s']:.1f} |")
        L.append("")
    if "lora" in out:
        s = out["settings"]
        L += ["## LoRA vs full fine-tuning", "",
              f"The mid model, one Ray Train worker (2 torch threads), cached reference, global batch "
              f"{s['global_batch']}, micro-batch {s['micro_batch']}, {s['steps']} steps, fp32; LoRA rank 16, alpha 32 "
              "on every linear layer (`train.lora`), the base frozen. Optimizer state: AdamW's moments the worker "
              "holds after the last step.", "",
              "| training | pairs/s | tokens/s | peak RSS MB per worker | optimizer state MB |",
              "|---|---:|---:|---:|---:|"]
        for row in out["lora"]:
            L.append(f"| {row['mode']} | {row['pairs_per_s']:.2f} | {row['tokens_per_s']:,.0f} | "
                     f"{row['peak_rss_mb']:,.0f} | {row['optim_state_mb']:,.1f} |")
        L.append("")
    if "losses" in out:
        s = out["settings"]
        L += ["## Loss variants", "",
              f"The mid model, one Ray Train worker (2 torch threads), cached reference, global batch "
              f"{s['global_batch']}, micro-batch {s['micro_batch']}, {s['steps']} steps, fp32 (`train.loss`). Cache "
              "MB read: by the worker over the run.", "",
              "| loss | pairs/s | tokens/s | peak RSS MB per worker | cache MB read |", "|---|---:|---:|---:|---:|"]
        for row in out["losses"]:
            L.append(f"| {row['mode']} | {row['pairs_per_s']:.2f} | {row['tokens_per_s']:,.0f} | "
                     f"{row['peak_rss_mb']:,.0f} | {row['data_read_mb']:.2f} |")
        L += ["", "What a variant adds to DPO's step: WPO one logsumexp over the vocabulary per response token, a "
              "list of losses more terms on the same forward, LD-DPO the per-token reference log-probs read from the "
              "cache (about as many bytes as the token ids). Differences in pairs/s within this machine's "
              "run-to-run noise (±10%) are no difference.", ""]
    if "packing" in out:
        s = out["settings"]
        L += ["## Padding-free packing", "",
              f"The mid model, one Ray Train worker (2 torch threads), cached reference, global batch "
              f"{s['global_batch']}, micro-batch {s['micro_batch']}, {s['steps']} steps, fp32: padded rows "
              "(length-grouped) against `train.packing: true` (each micro-batch's sequences packed into rows as long "
              "as its longest; attention masked per sequence). Padding: share of forward positions.", "",
              "| rows | pairs/s | tokens/s | peak RSS MB per worker | padding |", "|---|---:|---:|---:|---:|"]
        for row in out["packing"]:
            L.append(f"| {row['mode']} | {row['pairs_per_s']:.2f} | {row['tokens_per_s']:,.0f} | "
                     f"{row['peak_rss_mb']:,.0f} | {row['padding']:.1%} |")
        L.append("")
    if "head" in out:
        r0 = out["head"][0]
        L += ["## The LM head in training", "",
              "One forward + backward of the response log-probs (`selective_token_logps`) of 8 rows, vocabulary "
              f"{r0['vocab']:,}, a 2-layer 256-wide Llama otherwise (so the head dominates); each case in a fresh "
              "process. Memory: growth of peak RSS in the first pass (it includes the gradients, "
              f"{r0['grads_mb']:,.0f} MB); time: the pass after it.", "",
              "| scored tokens | their fp32 logits MB | LM head | forward MB | forward + backward MB | seconds |",
              "|---:|---:|---|---:|---:|---:|"]
        for row in out["head"]:
            name = "recomputed in backward (`train.parallel.recompute_head`)" if row["recompute"] else \
                "logits kept for backward"
            L.append(f"| {row['scored_tokens']:,} | {row['logits_mb']:,.0f} | {name} | {row['forward_mb']:,.0f} | "
                     f"{row['step_mb']:,.0f} | {row['seconds']:.2f} |")
        L.append("")
    if "memory" in out:
        mem = out["memory"]
        L += ["## Memory", "",
              f"Peak RSS per worker on a model whose state outweighs the worker's runtime: Llama {mem['layers']} × "
              f"{mem['hidden']} "
              f"({mem['params'] / 1e6:.0f}M params), one Ray Train worker, fp32, AdamW, {mem['pairs']} pairs, "
              f"{mem['steps']} steps, global batch {out['settings']['global_batch']}, micro-batch "
              f"{out['settings']['micro_batch']}. fp32 model-sized copies per worker: cached 4 (weights, gradients, "
              "AdamW's two moments), in-loop 5 (the reference's weights too): for the model's state alone the ratio "
              "tends to 0.8 (worked out; LoRA's in-loop reference is the policy with its adapters off: no copy). "
              "The policy's saved activations come on top in both modes, unless activation checkpointing "
              "(`train.parallel.activation_checkpointing`) recomputes them.", "",
              "| reference | activation checkpointing | pairs/s | peak RSS MB per worker | model state MB (worked "
              "out: 16 or 20 B/param) |", "|---|---|---:|---:|---:|"]
        for row in mem["rows"]:
            state = mem["params"] * (16 if row["mode"] == "cached" else 20) / 2 ** 20
            ac = "on" if row.get("activation_checkpointing") else "off"
            L.append(f"| {row['mode'].replace('_', '-')} | {ac} | {row['pairs_per_s']:.2f} | "
                     f"{row['peak_rss_mb']:,.0f} | {state:,.0f} |")
        L.append("")
    if "scaling" in out:
        sc = out["scaling"]
        L += ["## Scaling", "", "Whole `cache` (hf engine) and `train` (one epoch, cached reference) commands "
              "against the number of pairs (each a fresh dataset: nothing cached):", "",
              "| pairs | cache s | train s | total s | marginal s per pair |", "|---:|---:|---:|---:|---:|"]
        prev = None
        for row in sc["sizes"]:
            total = row["cache_s"] + row["train_s"]
            marg = "—" if prev is None else f"{(total - prev[1]) / (row['pairs'] - prev[0]):.3f}"
            L.append(f"| {row['pairs']} | {row['cache_s']:.1f} | {row['train_s']:.1f} | {total:.1f} | {marg} |")
            prev = (row["pairs"], total)
        L += ["", "Training workers (cached reference, same global batch, the machine's 2 cores split):", "",
              "| workers × CPUs | pairs/s | tokens/s | peak RSS MB per worker |", "|---|---:|---:|---:|"]
        for row in sc["workers"]:
            L.append(f"| {row['workers']} × {row['cpus_per_worker']} | {row['pairs_per_s']:.2f} | "
                     f"{row['tokens_per_s']:,.0f} | {row['peak_rss_mb']:,.0f} |")
        L.append("")
    L += ["## Notes", "", "See [OPTIMIZATIONS.md](OPTIMIZATIONS.md) for what stands between a figure and its target, "
          "and each optimization's before/after measurement.", ""]
    return "\n".join(L)


if __name__ == "__main__":
    main()
