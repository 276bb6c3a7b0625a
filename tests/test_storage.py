"""Storage URIs and multi-node checks, without Ray: `file://` and a real S3 API (a local moto server) through
`Store`, checkpoints and reports at a URI, the shared-storage check (its per-node probe injected), `--address`."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from pipeline.config import DataSource
from pipeline.data.sources import plan_source, read_shard
from pipeline.errors import UserError
from pipeline.evaluation.report import SUMMARY_COLUMNS, write_report
from pipeline.evaluation.targets import checkpoint_problem
from pipeline.runtime import cluster
from pipeline.store.checkpoints import list_checkpoints
from pipeline.store.fingerprint import model_files_hash
from pipeline.store.layout import RunLayout
from pipeline.store.storage import Store, local_copy
from pipeline.training.metrics_log import MetricsLogger
from stages.evaluate import select_targets
from tests.conftest import DATA, make_config


def _hf_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights")
    return path


def test_file_uri_is_the_local_directory(tmp_path):
    store = Store(f"file://{tmp_path}/run")
    assert store.local and store.uri == f"file://{tmp_path}/run" and store.root == f"{tmp_path}/run"
    store.write_json("a/b.json", {"x": 1})
    assert json.loads((tmp_path / "run/a/b.json").read_text()) == {"x": 1}
    assert store.child("a").uri == f"file://{tmp_path}/run/a" and store.child("a").read_json("b.json") == {"x": 1}
    src = _hf_dir(tmp_path / "export")
    (src / ".hidden").write_text("ignored by stamps")
    store.upload_dir(src, "checkpoints/step_000001", last="config.json")
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step_000001"]  # no temp left
    assert [s[0] for s in store.stamp("checkpoints")] == ["step_000001/config.json",
                                                          "step_000001/model.safetensors"]
    assert local_copy(f"file://{tmp_path}/run/checkpoints/step_000001") == f"{tmp_path}/run/checkpoints/step_000001"


def test_checkpoints_and_report_under_a_file_uri(tiny_model, tmp_path):
    run = Store(f"file://{tmp_path}/run")
    for step in (1, 2):
        run.upload_dir(_hf_dir(tmp_path / f"export{step}"), f"checkpoints/step_00000{step}", last="config.json")
    run.makedirs("checkpoints/step_000003")  # incomplete: no config.json
    assert list_checkpoints(run) == [f"{run.uri}/checkpoints/step_000001", f"{run.uri}/checkpoints/step_000002"]
    cfg = make_config(tiny_model, tmp_path, f"run_dir={run.uri}", "eval.include_reference_model=false",
                      f"eval.checkpoints=[{run.uri}/checkpoints/step_000002, {run.uri}/checkpoints/step_000003]")
    targets = select_targets(cfg)
    assert [t.path for t in targets] == [f"{run.uri}/checkpoints/step_000002", f"{run.uri}/checkpoints/step_000003"]
    assert targets[0].error is None and "no config.json" in targets[1].error
    row = {c: None for c in SUMMARY_COLUMNS} | {"name": "step_000002", "path": targets[0].path, "step": 2}
    rep = write_report(run.child("eval"), [row], [], {"prompts": 1})
    assert (tmp_path / "run/eval/report.md").is_file() and rep.report == tmp_path / "run/eval/report.md"


# ---------------------------------------------------------------- S3 API (moto server on loopback)


def test_s3_store_checkpoints_local_copies_and_report(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_PIPELINE_STAGING", str(tmp_path / "staging"))
    run = Store(f"{s3}/runs/r1")
    assert not run.local and run.uri == f"{s3}/runs/r1"
    run.write_json("train.json", {"steps": 2})
    assert run.exists("train.json") and run.read_json("train.json") == {"steps": 2} and run.listdir() == ["train.json"]

    src = _hf_dir(tmp_path / "export")
    run.upload_dir(src, "checkpoints/step_000002", last="config.json")
    ckpt = f"{run.uri}/checkpoints/step_000002"
    assert list_checkpoints(run) == [ckpt] and checkpoint_problem(ckpt) is None
    assert "does not exist" in checkpoint_problem(f"{run.uri}/checkpoints/step_000009")

    local = local_copy(ckpt)  # downloaded once, reused while the files are unchanged
    assert local.startswith(str(tmp_path / "staging"))
    with open(f"{local}/model.safetensors", "rb") as f:
        assert f.read() == b"weights"
    assert local_copy(ckpt) == local
    (src / "model.safetensors").write_bytes(b"retrained")
    run.upload_dir(src, "checkpoints/step_000002", last="config.json")
    with open(f"{local_copy(ckpt)}/model.safetensors", "rb") as f:
        assert f.read() == b"retrained"

    logger = MetricsLogger(run.uri, enabled=True)
    logger.log(1, {"loss": 0.5}, echo=lambda _: None)
    assert json.loads(run.read_bytes("metrics-parts/000000.jsonl")) == {"step": 1, "loss": 0.5}  # during the run
    logger.close()
    assert json.loads(run.read_bytes("metrics.jsonl")) == {"step": 1, "loss": 0.5}  # at the end
    assert not run.exists("metrics-parts")
    assert [n for n in run.listdir("tensorboard") if n.startswith("events")]

    row = {c: None for c in SUMMARY_COLUMNS} | {"name": "step_000002", "path": ckpt, "step": 2}
    rep = write_report(run.child("eval"), [row], [], {"prompts": 1})
    assert rep.report == f"{run.uri}/eval/report.md" and run.read_bytes("eval/report.md").startswith(b"# ")
    run.delete("checkpoints/step_000002")
    assert list_checkpoints(run) == []


def test_sources_at_an_s3_uri_and_exports_under_an_s3_cache_dir(s3, tmp_path, monkeypatch):
    """A JSONL or Parquet source at an s3:// URI is planned and read through pyarrow.fs like the local file; a
    `datasets` directory is exported into the cache_dir at s3://, where a read task on any node finds it."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DPO_PIPELINE_STAGING", str(tmp_path / "staging"))
    rows = [json.loads(line) for line in (DATA / "standard.jsonl").read_text().splitlines() if line.strip()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=5)
    bucket = Store(s3)
    bucket.write_bytes("data/d.jsonl", (DATA / "standard.jsonl").read_bytes())
    bucket.write_bytes("data/d.parquet", (tmp_path / "d.parquet").read_bytes())
    sources = Store(f"{s3}/cache").child("sources")
    for name, local in (("d.jsonl", DATA / "standard.jsonl"), ("d.parquet", tmp_path / "d.parquet")):
        want = plan_source(DataSource(path=str(local)), 7, tmp_path / "sources")
        got = plan_source(DataSource(path=f"{s3}/data/{name}"), 7, sources)
        assert (got.kind, got.sha256, got.num_rows, got.shards) == (want.kind, want.sha256, want.num_rows, want.shards)
        assert got.path == f"{s3}/data/{name}"
        assert [r for sh in got.shards for r in read_shard(got, sh)] == list(enumerate(rows))
    with pytest.raises(UserError, match="not found"):
        plan_source(DataSource(path=f"{s3}/data/missing.jsonl"), 7, sources)
    with pytest.raises(UserError, match="a URI must name a .jsonl or .parquet file"):
        plan_source(DataSource(path=f"{s3}/data"), 7, sources)

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    plan = plan_source(DataSource(path=str(tmp_path / "ds")), 7, sources)
    assert plan.path.startswith(f"{s3}/cache/sources/") and plan.path.endswith(".parquet")
    assert [r for sh in plan.shards for r in read_shard(plan, sh)] == list(enumerate(rows))
    assert not (tmp_path / "home").exists() and not list((tmp_path / "staging").rglob("*.parquet"))  # nothing kept


# ---------------------------------------------------------------- shared storage on several nodes


NODES = [{"NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.1", "Alive": True},
         {"NodeID": "b" * 56, "NodeManagerAddress": "10.0.0.2", "Alive": True}]


def test_local_storage_not_seen_by_a_node_is_a_user_error(tiny_model, tmp_path):
    cfg = make_config(tiny_model, tmp_path)
    seen = []

    def node_b_lacks_the_cache(nodes, paths):
        seen.append(list(paths))
        return {n["NodeID"]: [p for p in paths if "/cache/" in p and n["NodeID"] == "b" * 56] for n in nodes}

    with pytest.raises(UserError) as e:
        cluster.check_shared_storage(cfg.shared_paths(), NODES, node_b_lacks_the_cache)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cache_dir ") and str(tmp_path / "cache") in msg
    assert "10.0.0.2" in msg and "shared storage" in msg and "s3://" in msg
    probed = seen[0]
    assert any(p.startswith(str(tmp_path / "cache") + "/.dpo-pipeline-shared-check") for p in probed)
    assert str(tiny_model.resolve()) in probed  # the model directory is probed too
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".dpo")]  # markers removed

    cluster.check_shared_storage(cfg.shared_paths(), NODES, lambda nodes, paths: {})  # every node sees everything
    cluster.check_shared_storage(cfg.shared_paths(), NODES[:1], lambda *_: pytest.fail("one node: nothing to check"))
    uris = make_config(tiny_model, tmp_path, "cache_dir=s3://bucket/cache", "run_dir=gs://bucket/run")
    assert cluster._local_paths(uris.shared_paths())[0] == {}  # URIs are shared by nature


def test_address_option_overrides_ray_address(tiny_model, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": str(tiny_model)}, "data": {"train": {"path": "x.jsonl"}},
                                    "ray": {"address": "auto"}}))
    assert main(["config", str(path), "--address", "10:20"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["ray"]["address"] == "10:20"
    assert main(["config", str(path)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["ray"]["address"] == "auto"


# ---------------------------------------------------------------- metrics on object storage


def _log_steps(logger: MetricsLogger, first: int, last: int) -> None:
    for step in range(first, last + 1):
        logger.log(step, {"loss": 0.5, "lr": 1e-6}, echo=lambda _: None)


def test_s3_metrics_upload_bytes_per_logged_step_do_not_grow(s3, tmp_path):
    per_step = {}
    for steps in (100, 1000):
        logger = MetricsLogger(f"{s3}/runs/m{steps}", enabled=True)
        _log_steps(logger, 1, steps)
        per_step[steps] = logger.uploaded_bytes / steps  # before close: what each logged step costs
        logger.close()
        rows = Store(f"{s3}/runs/m{steps}").read_bytes("metrics.jsonl").decode().splitlines()
        assert [json.loads(r)["step"] for r in rows] == list(range(1, steps + 1))
    row = len(json.dumps({"step": 1000, "loss": 0.5, "lr": 1e-6})) + 1
    # The open part is uploaded again (at most PART_ROWS rows), never the whole history: flat in the run's length.
    assert per_step[1000] <= MetricsLogger.PART_ROWS * row
    assert abs(per_step[1000] / per_step[100] - 1) < 0.1, per_step


def test_s3_metrics_of_a_restarted_run_hold_each_step_once(s3, tmp_path):
    run = f"{s3}/runs/restarted"
    first = MetricsLogger(run, enabled=True)
    first.resume_at(0)
    _log_steps(first, 1, 35)
    first.sync()  # the checkpoint of step 35: its rows are on storage
    _log_steps(first, 36, 40)  # then the worker dies: no close()
    second = MetricsLogger(run, enabled=True)  # restarted from the checkpoint of step 35
    second.resume_at(35)
    _log_steps(second, 36, 50)
    second.close()
    rows = Store(run).read_bytes("metrics.jsonl").decode().splitlines()
    assert [json.loads(r)["step"] for r in rows] == list(range(1, 51))


def test_a_recorded_checkpoint_hash_is_read_not_computed(s3, tmp_path, monkeypatch):
    """Evaluation keys a checkpoint by its content hash: for our exports the hash recorded when it was written
    (dpo_checkpoint.json, a few hundred bytes), so a checkpoint on s3 is never downloaded just to hash it."""
    from pipeline.store import checkpoints

    src = _hf_dir(tmp_path / "export")
    (src / checkpoints.RECORD).write_text(json.dumps({"model_files_sha256": "ab" * 32}))
    run = Store(f"{s3}/runs/hashed")
    run.upload_dir(src, "checkpoints/step_000001", last="config.json")
    with monkeypatch.context() as patched:
        patched.setattr(checkpoints, "local_copy", lambda uri: pytest.fail(f"downloaded {uri}"))
        assert checkpoints.checkpoint_hash(f"{run.uri}/checkpoints/step_000001") == "ab" * 32
    (src / checkpoints.RECORD).unlink()  # not one of ours: hashed from a local copy, as model_files_hash does
    run.upload_dir(src, "checkpoints/step_000002", last="config.json")
    assert checkpoints.checkpoint_hash(f"{run.uri}/checkpoints/step_000002") == model_files_hash(src)


def test_the_training_state_is_staged_where_asked_and_only_with_room(tmp_path, monkeypatch):
    """`train.checkpoint.staging_dir` (else the pipeline's staging dir) holds a rank's state before its upload; a
    disk without room for it (two copies under async_save) is one line naming the key, before the first step."""
    from collections import namedtuple

    from pipeline.store import storage
    from pipeline.store.checkpoints import state_staging

    monkeypatch.setenv("DPO_PIPELINE_STAGING", str(tmp_path / "staging"))
    assert state_staging(None, 10, async_save=True) == tmp_path / "staging" / "train-state"
    assert state_staging(str(tmp_path / "nvme"), 10, async_save=False) == tmp_path / "nvme"
    assert (tmp_path / "nvme").is_dir()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage(100e9, 70e9, 30e9))
    assert state_staging(str(tmp_path / "nvme"), int(15e9), async_save=True) == tmp_path / "nvme"  # 30 GB: room
    with pytest.raises(UserError) as e:
        state_staging(str(tmp_path / "nvme"), int(20e9), async_save=True)
    assert str(e.value) == (f"train.checkpoint.staging_dir: {tmp_path / 'nvme'} has 30.0 GB free but this rank's "
                            f"training state (two copies under async_save) needs 40.0 GB; point "
                            f"train.checkpoint.staging_dir at a node-local disk with room, or free space there")
    assert state_staging(str(tmp_path / "nvme"), int(20e9), async_save=False) == tmp_path / "nvme"


def test_run_layout_puts_every_place_under_its_root(tiny_model, tmp_path):
    cfg = make_config(tiny_model, tmp_path, f"cache_dir={tmp_path / 'c'}", f"run_dir={tmp_path / 'r'}")
    layout = RunLayout.of(cfg)
    c, r = tmp_path / "c", tmp_path / "r"
    assert layout.cache("abc").uri == f"{c}/abc" and layout.cache("tokens-x").uri == f"{c}/tokens-x"
    assert (layout.sources.uri, layout.eval_reference.uri) == (f"{c}/sources", f"{c}/eval-reference")
    assert (layout.run.uri, layout.eval.uri, layout.pairs.uri) == (str(r), f"{r}/eval", f"{r}/pairs")
    assert layout.round(2).uri == f"{r}/round_2"
    assert layout.run is layout.run  # built once per layout
