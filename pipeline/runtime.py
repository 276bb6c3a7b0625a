"""Process-level setup shared by the stages: Ray connection, logging and progress bars."""

from __future__ import annotations

import logging
import os
import sys

from pipeline.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    """Join `ray.address` / `RAY_ADDRESS` if given, else start a local Ray instance (once per process)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    # One progress bar of ours (pairs scored) instead of Ray Data's per-operator bars.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="pair", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
