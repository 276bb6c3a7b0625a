"""Multi-node checks and placement: every node must see the same storage, and work may spread over nodes.

On one node any path works. On several, the stages read and write `cache_dir` and `run_dir` from whichever node a
task, actor or Ray Train worker lands on, and load the model and data files there: a path that exists only on the
driver's node fails later, on another node, with a confusing error (or silently writes a second, partial copy).
`check_shared_storage` finds that up front: the driver writes a marker into each local storage root and a task on
every alive node checks that it sees it (and the model and data files).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.config import ParallelConfig, RayConfig, SharedPaths
from pipeline.errors import UserError
from pipeline.store.storage import Store

MARKER = ".dpo-pipeline-shared-check"
_FIX = {"cache_dir": "mount it on every node (NFS, a shared disk) or use an s3:// or gs:// URI",
        "run_dir": "mount it on every node (NFS, a shared disk) or use an s3:// or gs:// URI"}
_checked: set[tuple] = set()


def spread(ray_cfg: RayConfig) -> bool:
    return ray_cfg.placement == "spread"


def check_spare_cpu(parallel: ParallelConfig) -> None:
    """Ray Data streams the eval split to the training workers only with at least one CPU the workers do not hold;
    without it the run would wait forever (measured with Ray 2.60)."""
    total = ray.cluster_resources().get("CPU", 0)
    held = parallel.num_workers * parallel.num_cpus_per_worker
    if total - held < 1:
        raise UserError(f"train.parallel.num_workers × train.parallel.num_cpus_per_worker = {held:g} CPUs leaves "
                        f"less than 1 of the cluster's {total:g} for the eval data; lower "
                        f"train.parallel.num_cpus_per_worker (e.g. {max(0.25, (total - 1) / parallel.num_workers):g}) "
                        f"or add CPUs")


def _local_paths(shared: SharedPaths) -> tuple[dict[str, str], dict[str, str]]:
    """(storage roots on a local disk, {key: path}), (model and data files that exist locally, {key: path})."""
    roots = {key: Store(uri).root for key, uri in shared.roots.items()
             if "://" not in uri or uri.startswith("file://")}  # object stores are shared (and not contacted here)
    return roots, {k: str(Path(v).resolve()) for k, v in shared.inputs.items() if Path(v).exists()}


def _missing(paths: list[str]) -> list[str]:
    return [p for p in paths if not os.path.exists(p)]


def _ray_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def _ray_missing_on(nodes: list[dict], paths: list[str], timeout_s: float = 120) -> dict[str, list[str]]:
    """{node id: paths it does not see}, from one zero-CPU task pinned to each node."""
    task = ray.remote(num_cpus=0)(_missing)
    refs = {n["NodeID"]: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(paths) for n in nodes}
    try:
        return dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    except ray.exceptions.GetTimeoutError:
        raise UserError(f"the shared-storage check did not finish on every Ray node within {timeout_s:g} s; check "
                        f"that all nodes are healthy (`ray status`)") from None


def check_shared_storage(shared: SharedPaths, nodes: list[dict] | None = None,
                         missing_on: Callable[[list[dict], list[str]], dict[str, list[str]]] | None = None) -> None:
    """On a cluster of several alive nodes, raise a `UserError` naming the key, the node and the fix if a node
    does not see a local storage root (`cache_dir`, `run_dir`) or a local model/data path. URIs (`s3://`, `gs://`)
    are shared by nature and not checked. `nodes` and `missing_on` are the cluster's alive nodes and the per-node
    check (defaults: Ray's; tests inject their own)."""
    nodes = _ray_nodes() if nodes is None else nodes
    if len(nodes) < 2:
        return
    roots, files = _local_paths(shared)
    done_key = (tuple(sorted(n["NodeID"] for n in nodes)), tuple(sorted({**roots, **files}.items())))
    if not (roots or files) or done_key in _checked:
        return
    token = uuid.uuid4().hex[:12]
    markers = {}
    for key, root in roots.items():
        Path(root).mkdir(parents=True, exist_ok=True)
        markers[key] = os.path.join(root, f"{MARKER}-{token}")
        Path(markers[key]).write_text("written by the dpo-pipeline driver; deleted after the check\n")
    try:
        expected = {**markers, **files}
        missing = (missing_on or _ray_missing_on)(nodes, list(expected.values()))
    finally:
        for m in markers.values():
            Path(m).unlink(missing_ok=True)
    for node in nodes:
        gone = set(missing.get(node["NodeID"], []))
        for key, path in expected.items():
            if path in gone:
                shown = roots.get(key, path)
                fix = _FIX.get(key, "put it on storage every node mounts at the same path")
                raise UserError(f"{key} {shown!r} is not visible on Ray node {node.get('NodeManagerAddress', '?')} "
                                f"({node['NodeID'][:12]}): on a multi-node cluster it must be shared storage; {fix}")
    _checked.add(done_key)


def rank_node_ids() -> list[str]:
    """The Ray node id of every rank of the default process group, in rank order (a collective; this process's
    alone without one)."""
    import torch.distributed as dist  # noqa: PLC0415 (lazy: the driver-side checks here need no torch)

    node = ray.get_runtime_context().get_node_id()
    if not dist.is_initialized():
        return [node]
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes
