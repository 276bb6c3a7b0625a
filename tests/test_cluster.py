"""The tiny pipeline on a 2-node Ray cluster (two raylets on this machine): `dpo-pipeline run --address`, one scorer
actor pinned to each node (a custom resource each node offers once), Ray Train workers spread over both nodes
(`ray.placement: spread`), run_dir and cache_dir given as `file://` URIs, each node with its own home directory
(node-local: nothing a node needs may live there), the eval split a `datasets` directory."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import pytest
import ray
import yaml
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.cli import main
from pipeline.config import RayConfig
from pipeline.runtime.session import init_ray
from pipeline.store.storage import Store
from tests.conftest import DATA

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.extended]
pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head and a worker node, 2 logical CPUs and one `scorer_slot` each, and each its own `HOME` (what runs
    there sees only its own). The session's local Ray instance (if any) is shut down first and started again
    afterwards, so later tests find it as they expect."""
    had_local = ray.is_initialized()
    ray.shutdown()
    node = {"num_cpus": 2, "object_store_memory": 300 << 20, "resources": {"scorer_slot": 1}}
    homes = tmp_path_factory.mktemp("homes")
    cluster = Cluster(initialize_head=True, head_node_args={**node, "env_vars": {"HOME": str(homes / "head")}})
    cluster.add_node(**node, env_vars={"HOME": str(homes / "worker")})
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_local:
            init_ray(RayConfig(num_cpus=2))


def _home(node_id: str) -> str:
    return ray.get(ray.remote(num_cpus=0)(lambda: os.environ["HOME"]).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote())


def test_run_on_two_nodes(tiny_model, tmp_path, two_nodes, monkeypatch):
    # The eval split: a `datasets` directory, exported to Parquet where the read tasks of both nodes find it.
    datasets.Dataset.from_json(str(DATA / "conversational.jsonl")).save_to_disk(str(tmp_path / "eval-ds"))
    monkeypatch.setenv("HOME", str(tmp_path / "driver-home"))
    config = {
        "model": {"path": str(tiny_model)},
        "data": {"train": {"path": str(DATA / "standard.jsonl")}, "eval": {"path": str(tmp_path / "eval-ds")},
                 "max_length": 128, "max_prompt_length": 64},
        # Two scorers, each needing the one scorer_slot of a node: one runs on each node.
        "scoring": {"engine": "hf", "num_actors": 2, "shard_size": 8, "batch_size": 4,
                    "resources": {"scorer_slot": 1}},
        "train": {"parallel": {"num_workers": 2, "num_cpus_per_worker": 0.5}, "global_batch_pairs": 4,
                  "micro_batch_pairs": 2, "max_steps": 2},
        "eval": {"include_reference_model": False, "num_prompts": 2, "max_new_tokens": 4,
                 "engine_kwargs": {"enforce_eager": True}},
        "ray": {"placement": "spread"},
        "cache_dir": f"file://{tmp_path}/cache",  # a directory both nodes see (the same machine)
        "run_dir": f"file://{tmp_path}/run",
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["run", str(path), "--address", two_nodes.address]) == 0

    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    homes = {_home(n) for n in nodes}
    assert len(homes) == 2 and str(tmp_path / "driver-home") not in homes  # three homes: driver, head, worker
    assert not any((home / ".cache" / "dpo-pipeline" / "sources").exists()
                   for home in [tmp_path / "driver-home", *map(Path, homes)])  # nothing a node must read
    assert [n for n in os.listdir(tmp_path / "cache" / "sources") if n.endswith(".parquet")]  # the export
    cache = Store(str(tmp_path / "cache"))
    manifests = [cache.child(k).read_json("manifest.json") for k in cache.listdir()
                 if cache.exists(f"{k}/manifest.json")]
    assert len(manifests) == 2
    # Which scorer scores which block is Ray Data's choice: the manifests name cluster nodes, at least one.
    assert set().union(*(m["scored_on"] for m in manifests)) <= nodes and all(m["scored_on"] for m in manifests)
    run = Store(config["run_dir"])
    record = run.read_json("train.json")
    assert set(record["worker_nodes"]) == nodes  # one Ray Train worker per node
    assert record["checkpoints"] == [f"{config['run_dir']}/checkpoints/step_000002"]
    assert run.read_json("eval/step_000002/result.json")["stats"]["samples"] == 2
    assert run.exists("eval/report.md") and run.exists("run.log") and run.exists("metrics.jsonl")
