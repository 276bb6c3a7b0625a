"""Usage: python train_probe.py <dashboard:0|1>"""
import sys
import time

import ray
import ray.train

dash = sys.argv[1] == "1"
try:
    import torch  # noqa
    from ray.train.torch import TorchTrainer as Trainer
    kind = "TorchTrainer"
except ImportError:
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer as Trainer
    kind = "DataParallelTrainer"
from ray.train import RunConfig, ScalingConfig


def loop(config):
    for i in range(4):
        time.sleep(5)
        ray.train.report({"x": 1, "i": i})

import os

# Another, unrelated Ray cluster may be running on this host. Ray's address auto-detection
# (used by the State API client inside the PlacementGroupCleaner actor) then fails with
# "Found multiple active Ray instances". With RAY_GCS_SERVER_PORT + RAY_ADDRESS exported,
# the new local cluster gets a fixed GCS port and its processes resolve exactly this cluster,
# which is what auto-detection yields on a host running a single cluster.
addr = "local" if os.environ.get("RAY_GCS_SERVER_PORT") else None
print("PROBE RAY_ADDRESS", os.environ.get("RAY_ADDRESS"), "RAY_GCS_SERVER_PORT", os.environ.get("RAY_GCS_SERVER_PORT"), flush=True)
ctx = ray.init(address=addr, num_cpus=2, include_dashboard=dash, _temp_dir=os.environ.get("RAYDASH_DIR", "/tmp/raydash") + "/rt")
print("PROBE trainer", kind, "include_dashboard", dash, "dashboard_url", ctx.dashboard_url, flush=True)
t = time.time()
trainer = Trainer(loop,
    scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
    run_config=RunConfig(name=f"probe_dash{int(dash)}", storage_path=os.environ.get("RAYDASH_DIR", "/tmp/raydash") + "/ray_results"))
res = trainer.fit()
print("PROBE fit_s", round(time.time() - t, 1), "metrics", res.metrics, "error", res.error, flush=True)
ray.shutdown()
