"""`dpo-pipeline`: the command line. User errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
from pathlib import Path

from pipeline.config import Config, load_config, reference_markdown, to_yaml
from pipeline.data.models import check_model_path
from pipeline.data.sources import check_local_source
from pipeline.errors import RunFailed, UserError
from pipeline.runtime.console import NATIVE_STDERR, VERBOSE_ENV
from pipeline.store.storage import Store, staging_dir, storage_error

# The stages, the orchestration and the demo are imported inside the command that runs them: they load torch,
# Ray and transformers (~8 s), which `config`, `config-docs` and a config error should not wait for.


def _load(args, data: bool = True) -> Config:
    """The config, its model path (and with `data`, its local data files) checked before a stage is imported: a
    wrong path is reported in a second, not after the imports."""
    cfg = load_config(args.config, args.overrides)
    check_model_path(cfg.model.path)
    for src in (cfg.data.train, cfg.data.eval) if data else ():
        if src is not None:
            check_local_source(src)
    return cfg


def _cache(args) -> None:
    cfg = _load(args)
    from stages import cache  # noqa: PLC0415 (lazy: torch, Ray, transformers; see the top)

    for r in cache.run(cfg):
        c = r.counts
        if r.repaired:
            print(f"[{r.split}] damaged file(s) found by checksum: {', '.join(r.repaired)}; recomputed "
                  f"{r.shards_computed}/{r.shards_total} shard(s), kept the others")
        elif r.reused:
            print(f"[{r.split}] cache hit, nothing to compute: {r.uri} ({c['pairs']} pairs)")
        else:
            resumed = f", resumed: {r.shards_total - r.shards_computed} shard(s) were already done" \
                if r.shards_computed < r.shards_total else ""
            print(f"[{r.split}] cache written: {r.uri} ({r.shards_computed}/{r.shards_total} shard(s) "
                  f"computed{resumed})")
        reasons = ", ".join(f"{k}: {v}" for k, v in c["reasons"].items()) or "none"
        print(f"[{r.split}] rows {c['rows']}, pairs {c['pairs']}, rejected {c['rejected']} ({reasons})"
              + (f"; rejects in {r.rejects_uri}" if c["rejected"] else ""))
    print(f"resolved config: {cfg.run_dir}/config.yaml")


def _train(args) -> None:
    cfg = _load(args)
    from stages import train  # noqa: PLC0415 (lazy: torch, Ray, transformers; see the top)

    r = train.run(cfg)
    shown = " ".join(f"{k}={v:.4g}" for k, v in r.final_metrics.items() if isinstance(v, float))
    print(f"trained {r.steps} step(s); final: {shown}")
    print(f"checkpoints (Hugging Face format): {', '.join(r.checkpoints) or 'none'}")
    print(f"metrics: {r.run_dir}/metrics.jsonl, TensorBoard: {r.run_dir}/tensorboard")
    print(f"Ray, Ray Train and vLLM logs: {r.run_dir}/logs/")


def _headline(row: dict) -> str:
    from pipeline.store.run_status import headline  # noqa: PLC0415 (lazy: torch; see the top)

    return headline(row)


def _eval(args) -> int:
    cfg = _load(args, data=False)
    from stages import evaluate  # noqa: PLC0415 (lazy: torch, Ray, transformers; see the top)

    r = evaluate.run(cfg)
    rejected = f" ({r.prompt_rejects} unusable rows: {r.eval_dir}/prompt_rejects.jsonl)" if r.prompt_rejects else ""
    print(f"{r.prompts} prompt(s) × {cfg.eval.samples_per_prompt} sample(s){rejected}")
    for row in r.rows:
        state = "evaluated" if row["name"] in r.evaluated else "unchanged, kept" if row["name"] in r.reused else \
            "from an earlier run"
        print(f"[{row['name']}] {state}: {_headline(row)}")
    for f in r.failures:
        print(f"[{f['name']}] FAILED: {f['error']} ({f['path']})", file=sys.stderr)
    print(f"report: {r.report}")
    if r.failures:
        print(f"error: {len(r.failures)} checkpoint(s) failed (above); the report covers the others",
              file=sys.stderr)
        return 1
    return 0


def _pairs(args) -> None:
    cfg = load_config(args.config, args.overrides)
    from stages import pairs  # noqa: PLC0415 (lazy: torch, Ray, transformers; see the top)

    r = pairs.run(cfg)
    c = r.counts
    state = "unchanged, kept" if r.reused else "written"
    print(f"pairs {state}: {r.dataset}")
    print(f"{c['pairs']} pair(s) from {c['prompts']} prompt(s) × {cfg.pairs.samples_per_prompt} sample(s) "
          f"({c['truncated']} cut at max_new_tokens and {c['unusable']} unusable text dropped, "
          f"{c['prompts_without_pair']} prompt(s) without a pair); reward {_mean(c['reward_mean'])}, chosen "
          f"{_mean(c['chosen_reward_mean'])}, rejected {_mean(c['rejected_reward_mean'])}")
    print(f"train on them: data.train.path={r.dataset}")


def _mean(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _plan(args) -> None:
    cfg = _load(args, data=not args.iterate)  # an iterate run's data is made by its rounds
    if args.iterate:
        from pipeline.iterate import plan  # noqa: PLC0415 (lazy: torch, Ray, transformers; see the top)
    else:
        from pipeline.orchestrate import plan  # noqa: PLC0415 (lazy: torch, Ray, transformers; see the top)

    for s in plan(cfg):
        print(f"{s.stage:<12} {s.action:<7} {s.why}")


class _Tee:
    """Writes to a stream and a log file: the run log keeps what the driver printed."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def _uploaded(store, name: str, local):
    """On leaving: copy the local file `local` to `name` in `store` (a URI run_dir's run.log)."""
    try:
        yield
    finally:
        store.write_bytes(name, local.read_bytes())


def _run_log(run_dir: str):
    """(local file the run log is appended to, context manager that publishes it): the file itself in a local
    run_dir; for a URI, a staged copy of the run's log, uploaded when `run` ends."""
    store = Store(run_dir)
    if store.local:
        Path(store.root).mkdir(parents=True, exist_ok=True)
        return Path(store.root) / "run.log", contextlib.nullcontext()
    local = staging_dir() / "logs" / f"run-{os.getpid()}.log"
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(store.read_bytes("run.log") if store.exists("run.log") else b"")
    return local, _uploaded(store, "run.log", local)


@contextlib.contextmanager
def _logged(run_dir: str):
    """What the command prints also goes to `<run_dir>/run.log`."""
    log_path, upload = _run_log(run_dir)
    with upload, open(log_path, "a", encoding="utf-8") as log:  # the log is closed, then uploaded
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err


def _rows(rows: list[dict], failures: list[dict]) -> None:
    for row in rows:
        print(f"  [{row['name']}] {_headline(row)}")
    for f in failures:
        print(f"  [{f['name']}] FAILED: {f['error']}", file=sys.stderr)


def _run(args) -> int:
    cfg = _load(args)
    from pipeline.orchestrate import run  # noqa: PLC0415 (lazy: torch, Ray, transformers; see the top)

    with _logged(cfg.run_dir):
        s = run(cfg)
        print("\nsummary")
        for split, uri in s.caches.items():
            print(f"  cache ({split}): {uri}")
        print(f"  checkpoints: {', '.join(s.checkpoints) or 'none'}")
        _rows(s.rows, s.failures)
        print(f"  report: {s.report}\n  resolved config: {cfg.run_dir}/config.yaml, log: {cfg.run_dir}/run.log")
        print(f"  Ray, Ray Train and vLLM logs: {cfg.run_dir}/logs/")
    return 1 if s.failures else 0


def _iterate(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from pipeline import iterate  # noqa: PLC0415 (lazy: torch, Ray, transformers; see the top)

    with _logged(cfg.run_dir):
        # Each round prints its own plan as it starts (`plan --iterate` shows them all up front): planning every
        # round here would resolve round 1's inputs (prompts, weights' hash) twice.
        it = cfg.iterate
        print(f"iterate: {it.rounds} round(s) under {cfg.run_dir}, reference {it.reference}, prompts {it.prompts}")
        s = iterate.run(cfg)
        print("\nsummary")
        for r in s.rounds:
            print(f"  [round {r['round']}] {r['counts']['pairs']} pairs ({r['pairs']}); π_{r['round']}: "
                  f"{r['checkpoint']}")
        _rows(s.rows, s.failures)
        if s.report:
            print(f"  report: {s.report}")
        print(f"  log: {cfg.run_dir}/run.log; Ray, Ray Train and vLLM logs: {cfg.run_dir}/round_<r>/logs/")
    return 1 if s.failures else 0


def _demo(args) -> int:
    from pipeline.demo import experiment  # noqa: PLC0415 (lazy: torch, Ray, transformers; see the top)

    r = experiment.run(args.config, args.overrides)
    c = r.checks
    final = {row["variant"]: row for row in sorted(r.rows, key=lambda row: row["step"] or 0)}  # each run's last
    print(f"\nsentiment experiment ({r.seconds / 60:.1f} min): π_SFT and each run's final checkpoint "
          f"({len(r.rows) - 1} checkpoints in the report)")
    for row in final.values():
        print(f"  [{row['name']}] {_headline(row)}")
    print(f"  DPO vs π_SFT: reward {c['sft_reward']:.3f} -> {c['best_dpo_reward']:.3f} ({c['best_dpo']}, "
          f"{c['dpo_gain_in_se']:.1f} standard errors)")
    if "preferred_ft_reward" in c:
        print(f"  Preferred-FT: reward {c['preferred_ft_reward']:.3f} at KL {c['preferred_ft_kl']:.2f}; DPO frontier "
              f"there: {c['dpo_frontier_reward_at_preferred_ft_kl']:.3f}")
    if "iterative_reward" in c:
        at_kl = c["offline_frontier_reward_at_iterative_kl"]
        print(f"  iterative DPO: reward {c['iterative_reward']:.3f} at KL {c['iterative_kl']:.2f} after "
              f"{c['iterative_steps']} steps; offline DPO frontier there: "
              + ("none (no checkpoint with so little KL)" if at_kl is None else f"{at_kl:.3f}"))
    print(f"  report (frontier plot): {r.report}")
    return 0


def _status(args) -> None:
    from pipeline.store.run_status import run_status, status_lines  # noqa: PLC0415 (lazy: torch; see the top)

    print("\n".join(status_lines(run_status(args.run_dir))))


def _tiny_assets(args) -> None:
    from pipeline.demo.tiny import build_tiny_assets  # noqa: PLC0415 (lazy: torch, Ray, transformers; see the top)

    print(f"tiny model and tokenizer written to {build_tiny_assets(args.out)}")


def _config(args) -> None:
    print(to_yaml(load_config(args.config, args.overrides)), end="")


def _config_docs(args) -> None:
    print(reference_markdown(), end="")


# Subcommands that start or join Ray take --address (and `config`, which shows its effect).
_RAY_COMMANDS = ("cache", "pairs", "train", "eval", "run", "iterate", "demo", "config")
_COMMANDS = (("cache", _cache, "build (or reuse) the reference log-prob cache"),
             ("pairs", _pairs, "preference pairs from a model's own samples, ranked by a reward (pairs.*)"),
             ("train", _train, "DPO training from the cache (resumes in the same run_dir)"),
             ("eval", _eval, "evaluate checkpoints by sampling (only those not yet evaluated)"),
             ("run", _run, "cache -> train -> eval, skipping what is already done"),
             ("iterate", _iterate, "iterative DPO: rounds of pairs from the last policy -> cache -> train -> eval "
                                   "(iterate.*)"),
             ("plan", _plan, "say what `run` (with --iterate: `iterate`) would do, and why, without running "
                             "anything"),
             ("demo", _demo, "the sentiment experiment: π_SFT, sampled pairs, DPO at several β, Preferred-FT, the "
                             "reward-KL frontier (configs/sentiment.yaml)"),
             ("config", _config, "print the resolved config"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-pipeline", description="DPO with a cached reference, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in _COMMANDS:
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", help="YAML config file, e.g. configs/tiny.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.path=/models/x")
        if name in _RAY_COMMANDS:
            p.add_argument("--address", help="Ray cluster to join (`auto`, HOST:PORT, `ray://HOST:10001`); "
                                             "overrides ray.address and RAY_ADDRESS")
            p.add_argument("--verbose", action="store_true",
                           help="also show what Ray, Ray Train and vLLM print (always kept in <run_dir>/logs/); "
                                f"or set {VERBOSE_ENV}=1")
        if name == "plan":
            p.add_argument("--iterate", action="store_true", help="the plan of `iterate`, round by round")
        p.set_defaults(fn=fn)
    p = sub.add_parser("status", help="where a run stands: stage, steps, checkpoints, evaluated targets, logs "
                                      "(reads its run_dir; starts nothing)")
    p.add_argument("run_dir", help="the run's run_dir: a local path or a URI")
    p.set_defaults(fn=_status)
    p = sub.add_parser("tiny-assets", help="build the tiny test model and tokenizer (no network)")
    p.add_argument("out", help="output directory")
    p.set_defaults(fn=_tiny_assets)
    sub.add_parser("config-docs", help="print the configuration reference (Markdown)").set_defaults(fn=_config_docs)
    args = parser.parse_args(argv)
    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"
    if argv is None and args.command in _RAY_COMMANDS and args.command != "config":
        # The real command line (not a test calling main): Ray's C++ records in this process to the run's
        # logs/driver.log (pipeline/runtime/console.py).
        NATIVE_STDERR.start()
    if getattr(args, "address", None):
        # JSON-quoted: a YAML scalar such as `10:20` would otherwise not stay a string.
        args.overrides.append(f"ray.address={json.dumps(args.address)}")
    try:
        code = args.fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full or read-only disk met outside `Store` (a log file, a staging directory)

        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise

        print(f"error: {storage_error('write', e.filename or 'a file', e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work (cache shards, checkpoints, evaluated checkpoints) is kept; rerun the "
              "same command to resume", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
