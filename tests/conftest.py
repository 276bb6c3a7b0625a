"""Shared fixtures. Nothing downloads: the tiny model and tokenizer are built from code, data lives in tests/data.

Tiers (README, Development):
- unit (`make test-unit`): no Ray, no vLLM, no subprocess. A guard below fails a unit test that starts one, with a
  message naming the marker it needs.
- integration (`make test` = unit + integration): tests marked `ray` (a local Ray instance, once per session),
  `vllm` (a vLLM engine) or `subprocess` (the CLI or another program in a child process).
- extended (`make test-extended`, which CI runs): tests marked `extended`, the long whole-pipeline scenarios and the
  family matrix; skipped unless DPO_TEST_EXTENDED=1.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import multiprocessing.process
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from pipeline.config import RayConfig, load_config
from pipeline.data.models import load_tokenizer
from pipeline.demo.tiny import build_tiny_assets
from pipeline.engines.scorers import VllmScorer
from pipeline.runtime.console import ROUTER
from pipeline.runtime.session import init_ray
from stages import cache, train

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM's engine core in the engine actor's own process (forwarded to the actors: pipeline/engines/scorers.py): an
# engine starts without spawning a second interpreter that imports torch and vLLM again (measured on the tiny model,
# eager: 26 s instead of 44 s to the first result). The modules where vLLM runs as users run it set "1":
# test_cache_stage.py (the cache, compiled) and test_eval_stage.py (evaluation).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# Ray Train's controller looks at its workers every 2 s by default; each start, report and end waits for a look.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Ray Train starts a preemption watcher actor per run (a process importing Ray Train: ~2 s of CPU) that reacts to
# nodes being drained; no test drains a node.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray keeps at most num_cpus (here 2) idle worker processes and kills the rest after 1 s idle; a cluster node keeps
# as many as it has CPUs. Each new worker imports torch and transformers again (4-9 s on 2 cores), for every Ray Data
# task and actor of every run. The session's Ray instance keeps up to 8 idle (what the raylet reads at start).
os.environ.setdefault("RAY_num_workers_soft_limit", "8")

DATA = Path(__file__).parent / "data"


INTEGRATION_MARKERS = ("ray", "vllm", "subprocess", "extended")


# Seconds each work unit took (a module; a model family of test_families.py), measured with two xdist processes:
# `make test` hands the units out longest first, so that no long one starts last. Refresh from a run's
# `--junitxml` with `python -m tests.durations FILE`; a unit not listed counts as short.
DURATIONS = json.loads((Path(__file__).parent / "durations.json").read_text())


# The family matrix in two halves of about the same measured time (tests/durations.json before the split: gpt2 188 s,
# qwen2 76, gemma2 71, mistral 62 | gpt_neox 104, opt 93, gemma 83, phi3 83, falcon 68).
FAMILY_HALF = {"gpt2": 1, "qwen2": 1, "gemma2": 1, "mistral": 1, "gpt_neox": 2, "opt": 2, "gemma": 2, "phi3": 2,
               "falcon": 2}


def work_unit(nodeid: str) -> str:
    """What one xdist process runs as a whole (module fixtures run once): the module, or for the family matrix
    (test_families.py) one half of the families, so that the two processes share the matrix and each starts the
    module's engine actors once."""
    path, _, rest = nodeid.partition("::")
    if path.endswith("test_families.py") and "[" in rest:
        return f"{path}[half {FAMILY_HALF[rest.split('[', 1)[1].rstrip(']')]}]"
    return path


def pytest_collection_modifyitems(config, items):
    # Longest work units first (stable: tests keep their order within a unit). DPO_TEST_ORDER=reverse runs the
    # units in the opposite order: the suite must pass in any order of its modules.
    units = sorted(dict.fromkeys(work_unit(item.nodeid) for item in items), key=lambda u: -DURATIONS.get(u, 0))
    if os.environ.get("DPO_TEST_ORDER") == "reverse":
        units.reverse()
    rank = {unit: i for i, unit in enumerate(units)}
    items.sort(key=lambda item: rank[work_unit(item.nodeid)])
    if os.environ.get("DPO_TEST_EXTENDED") == "1":
        return
    skip = pytest.mark.skip(reason="extended tier: `make test-extended` (CI runs it)")
    for item in items:
        if item.get_closest_marker("extended"):
            item.add_marker(skip)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Work units (`work_unit`) to the xdist processes in collection order (longest first, above), not by number of
    tests (xdist's default, which starts one-test modules of minutes last)."""
    from xdist.scheduler import LoadScopeScheduling  # noqa: PLC0415 (only where xdist runs the session)

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False
    return ByWorkUnit(config, log)


@pytest.fixture(autouse=True)
def _unit_tier_guard(request, monkeypatch):
    """A test with none of the integration markers is a unit test: starting Ray, a vLLM engine or any child process
    fails it, naming the marker that moves it to the integration tier (where `make test-unit` does not run it)."""
    if any(request.node.get_closest_marker(m) for m in INTEGRATION_MARKERS):
        yield
        return

    def refuse(what: str, marker: str):
        def guard(*args, **kwargs):
            pytest.fail(f"unit-tier test {request.node.nodeid} {what}: mark it `@pytest.mark.{marker}` "
                        f"(integration tier), or keep it in the unit tier without it", pytrace=False)
        return guard

    if "ray_local" in request.fixturenames:
        refuse("uses the session's Ray instance (`ray_local`)", "ray")()
    monkeypatch.setattr(ray, "init", refuse("starts Ray", "ray"))
    monkeypatch.setattr(VllmScorer, "__init__", refuse("starts a vLLM engine", "vllm"))
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("starts a subprocess", "subprocess"))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start",
                        refuse("starts a child process (a vLLM engine core, a worker pool)", "vllm"))
    yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama + byte-level BPE tokenizer with a chat template, built once per test session."""
    return build_tiny_assets(tmp_path_factory.mktemp("assets") / "tiny-model")


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


S3_BUCKET = "dpo-ray-test"


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray instance for the session (2 CPUs, like the machines CI runs on). Started with the endpoint and
    credentials of a bucket on a local moto S3 server in its environment, as every node of a real cluster has them,
    so that its workers read and write there (`s3_ray`) without a restart of Ray."""
    server = None
    if importlib.util.find_spec("moto") is not None:
        server = moto_bucket(S3_BUCKET, os.environ.update)
    init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()
    if server is not None:
        ROUTER.use(str(tmp_path_factory.mktemp("last-logs")))  # the logs of a run_dir on S3 uploaded while it is up
        server.stop()


@pytest.fixture(scope="session")
def standard_cache(tiny_model, tmp_path_factory, ray_local) -> Path:
    """A cache_dir holding the reference caches (hf engine, `make_config`'s settings) of standard.jsonl (train) and
    conversational.jsonl (eval), built once for the session. Modules that train or evaluate from these caches copy
    them (`copy_cache`) instead of scoring the same rows again; the cache stage's own tests build theirs."""
    root = tmp_path_factory.mktemp("standard-cache")
    cache.run(make_config(tiny_model, root, "scoring.engine=hf", f"data.eval.path={DATA / 'conversational.jsonl'}"))
    return root / "cache"


# The training settings of the tests that train from `standard_cache` (4 steps of 4 pairs, checkpoints at 2 and 4).
TRAIN_STEPS = ("train.global_batch_pairs=4", "train.micro_batch_pairs=2", "train.optim.lr=1e-3", "train.max_steps=4",
               "train.checkpoint.every=2", "train.log_every=1", "train.parallel.num_cpus_per_worker=1")


@pytest.fixture(scope="session")
def straight_run(tiny_model, tmp_path_factory, standard_cache):
    """The uninterrupted 4-step run on 1 worker from the session's cache (held-out loss every 2 steps), run once:
    test_train.py checks it, and every resumed, restarted or distributed run there and in faults/test_train_crash.py
    must end with its weights. (config, TrainResult)"""
    root = tmp_path_factory.mktemp("straight-run")
    copy_cache(standard_cache, root)
    cfg = make_config(tiny_model, root, "scoring.engine=hf", f"data.eval.path={DATA / 'conversational.jsonl'}",
                      *TRAIN_STEPS, "train.eval_every=2", f"run_dir={root / 'w1'}",
                      f"train.checkpoint.staging_dir={root / 'staging'}")
    return cfg, train.run(cfg)


@contextlib.contextmanager
def engines_at_kill():
    """Records, at every `ray.kill` of an actor in this process, the vLLM engine-core processes the actor still
    has (its children): a process left to outlive its actor keeps the GPU memory it holds."""
    found: list[str] = []
    real_kill, real_get = ray.kill, ray.get

    def kill(actor, *args, **kwargs):
        try:
            pid = real_get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
            found.extend(f"{c.name()} pid {c.pid}" for c in psutil.Process(pid).children(recursive=True)
                         if "EngineCore" in c.name())
        except Exception:  # an actor already dead has nothing left to check
            pass
        return real_kill(actor, *args, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray, "kill", kill)
        yield found


def engine_processes() -> list[str]:
    """The vLLM engine-core processes started under this session's Ray instance (they inherit its raylet's pid in
    RAY_RAYLET_PID; the other xdist process's engines have their own)."""
    raylet = str(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)
    found = []
    for p in psutil.process_iter(["name"]):
        try:
            if "EngineCore" in (p.info["name"] or "") and p.environ().get("RAY_RAYLET_PID") == raylet:
                found.append(f"{p.info['name']} pid {p.pid}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def copy_cache(cache_dir: Path, root: Path) -> Path:
    """`cache_dir` copied to `root/cache`, where `make_config(..., root)` looks; a copy, so that what a module adds
    (evaluation's reference samples) or damages stays its own."""
    shutil.copytree(cache_dir, root / "cache")
    return root / "cache"


def read_cache(result):
    """All rows of a finished cache, in manifest order (a CacheResult or anything with `.uri`)."""
    manifest = json.loads(Path(result.uri, "manifest.json").read_text())
    return pa.concat_tables(pq.read_table(f"{result.uri}/{f['path']}") for f in manifest["files"])


def sequence_logps(model, sequences: list[list[int]], starts: list[int]):
    """Independent computation: one unpadded forward per sequence through `model` (a transformers causal LM, or
    one with a peft adapter), a full log-softmax in float64, the log-probs of tokens [start:] summed."""
    model.eval()
    out = []
    with torch.no_grad():
        for seq, start in zip(sequences, starts):
            ids = torch.tensor([seq])
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            out.append(float(logp[torch.arange(len(seq) - 1), ids[0, 1:]][start - 1:].sum()))
    return np.array(out)


def make_config(tiny_model: Path, tmp_path: Path, *overrides: str, data: str | Path = DATA / "standard.jsonl"):
    """A config for the tiny model with cache/run dirs under tmp_path; extra dotted overrides win."""
    base = [f"model.path={tiny_model}", f"data.train.path={data}", "data.max_length=128",
            "data.max_prompt_length=64", f"cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}",
            "scoring.shard_size=8", "scoring.batch_size=16"]
    return load_config(None, base + list(overrides))


@pytest.fixture
def s3_ray(ray_local):
    """The session's bucket (`ray_local`), which Ray's workers reach as the driver does."""
    pytest.importorskip("moto")
    return f"s3://{S3_BUCKET}"


def moto_bucket(bucket: str, set_env):
    """A local moto S3 server holding `bucket`; `set_env` puts its endpoint and credentials (the standard AWS_*
    variables pyarrow reads) in the environment. Returns the server, to stop."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    set_env({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
             "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    boto3.client("s3").create_bucket(Bucket=bucket)
    return server


@pytest.fixture
def s3(monkeypatch):
    """A bucket on a local moto S3 server; pyarrow finds it through the standard AWS_* variables."""
    pytest.importorskip("moto")
    server = moto_bucket("dpo-test", lambda env: [monkeypatch.setenv(k, v) for k, v in env.items()])
    yield "s3://dpo-test"
    server.stop()
