"""The tiny pipeline on a 2-node Ray cluster (two raylets on this machine): `dpo-pipeline run --address`, one scorer
actor pinned to each node (a custom resource each node offers once), Ray Train workers spread over both nodes
(`ray.placement: spread`), run_dir given as a `file://` URI."""

from __future__ import annotations

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from pipeline.cli import main
from pipeline.config import RayConfig
from pipeline.runtime.session import init_ray
from pipeline.store.storage import Store
from tests.conftest import DATA

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a worker node, 2 logical CPUs and one `scorer_slot` each. The session's local Ray instance (if any)
    is shut down first and started again afterwards, so later tests find it as they expect."""
    had_local = ray.is_initialized()
    ray.shutdown()
    node = {"num_cpus": 2, "object_store_memory": 300 << 20, "resources": {"scorer_slot": 1}}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_local:
            init_ray(RayConfig(num_cpus=2))


def test_run_on_two_nodes(tiny_model, tmp_path, two_nodes):
    config = {
        "model": {"path": str(tiny_model)},
        "data": {"train": {"path": str(DATA / "standard.jsonl")}, "eval": {"path": str(DATA / "conversational.jsonl")},
                 "max_length": 128, "max_prompt_length": 64},
        # Two scorers, each needing the one scorer_slot of a node: one runs on each node.
        "scoring": {"engine": "hf", "num_actors": 2, "shard_size": 8, "batch_size": 4,
                    "resources": {"scorer_slot": 1}},
        "train": {"parallel": {"num_workers": 2, "num_cpus_per_worker": 0.5}, "global_batch_pairs": 4,
                  "micro_batch_pairs": 2, "max_steps": 2},
        "eval": {"include_reference_model": False, "num_prompts": 2, "max_new_tokens": 4,
                 "engine_kwargs": {"enforce_eager": True}},
        "ray": {"placement": "spread"},
        "cache_dir": str(tmp_path / "cache"),  # a directory both nodes see (the same machine)
        "run_dir": f"file://{tmp_path}/run",
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["run", str(path), "--address", two_nodes.address]) == 0

    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
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
