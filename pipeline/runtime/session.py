"""Process-level setup shared by the stages: Ray connection, logging and progress bars."""

from __future__ import annotations

import logging
import os

import ray
import ray.data
from transformers.utils import logging as hf_logging

from pipeline.config import RayConfig, SharedPaths
from pipeline.errors import UserError
from pipeline.runtime.cluster import check_shared_storage
from pipeline.runtime.console import ROUTER, say


def init_ray(cfg: RayConfig, run_dir: str | None = None) -> None:
    """Join `ray.address` / `RAY_ADDRESS` if given, else start a local Ray instance (once per process). With
    `run_dir`, what Ray, Ray Train and vLLM print goes to `<run_dir>/logs/` (pipeline/runtime/console.py)."""
    if run_dir is not None:
        ROUTER.use(run_dir)
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        if address:
            ctx = ray.init(address=address, log_to_driver=True)
        else:
            installed = dashboard_installed()
            if cfg.dashboard and not installed:
                raise UserError("ray.dashboard is true but Ray's dashboard is not installed; install the "
                                "`dashboard` extra (pip install -e '.[dashboard]'), or set ray.dashboard=null")
            # (Not Ray's own default, None: without the packages it would start a dashboard process all the same.)
            ctx = ray.init(num_cpus=cfg.num_cpus, include_dashboard=installed if cfg.dashboard is None else
                           cfg.dashboard, log_to_driver=True)
        if ctx.dashboard_url:
            say(f"Ray dashboard: http://{ctx.dashboard_url}")
    ROUTER.install()
    ctx = ray.data.DataContext.get_current()
    # One progress bar of ours (pairs scored) instead of Ray Data's per-operator bars.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def dashboard_installed() -> bool:
    """Whether Ray's dashboard can start here: `ray[default]`'s packages (the `dashboard` extra)."""
    from ray._private.utils import get_dashboard_dependency_error  # noqa: PLC0415 (Ray's own test of the same)

    return get_dashboard_dependency_error() is None


def connect(ray_cfg: RayConfig, run_dir: str, shared: SharedPaths) -> None:
    """`init_ray`, then, on a cluster of several nodes, check that every node sees the run's storage and inputs
    (`Config.shared_paths()`)."""
    init_ray(ray_cfg, run_dir)
    check_shared_storage(shared)


def quiet_worker_logs() -> None:
    """In Ray workers and actors: keep library chatter (per-dataset execution lines, weight-loading bars) out of
    the driver's output, where the per-step metric lines and errors are what a user needs to see."""
    hf_logging.disable_progress_bar()
    for name in ("ray.data", "ray.train", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
