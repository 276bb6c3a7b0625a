"""The console (pipeline/runtime/console.py): what Ray forwards from workers is sorted into the run's log files by
component, lines a worker meant for the console are printed, a worker's progress bar is drawn by the driver, and
Ray's C++ records in the driver process leave the terminal. Without Ray: the router is fed what Ray's log thread
hands it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from pipeline.runtime import console
from pipeline.runtime.console import MARK, LogRouter, component
from pipeline.training.metrics_log import step_line


def _batch(actor: str, lines: list[str], pid="123", is_err=True) -> dict:
    return {"actor_name": actor, "pid": pid, "ip": "10.0.0.1", "is_err": is_err, "lines": lines}


def _marked(message: dict) -> str:
    return MARK + json.dumps(message)


@pytest.fixture
def router(tmp_path, monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    r = LogRouter()
    printed: list[dict] = []
    r.ray_print = printed.append  # Ray's own printing handler
    r.use(str(tmp_path / "run"))
    r.installed = True
    yield r, printed, tmp_path / "run" / "logs"
    r.close()


def test_worker_lines_go_to_their_component_file_and_marked_lines_to_the_console(router, capsys):
    r, printed, logs = router
    r(_batch("RayTrainWorker", ["Setting up process group", _marked({"say": "step 1/6  loss 0.6931"})]))
    r(_batch("PlacementGroupCleaner", ["Failed to query Ray Train Controller actor state."]))
    r({"task_name": "MapWorker(MapBatches(_ShardScorer))", "pid": "7", "ip": "x", "is_err": False,
       "lines": ["Loading safetensors checkpoint shards"]})
    r({"task_name": "ReadJSON", "pid": "8", "ip": "x", "is_err": True, "lines": ["a Ray Data task's warning"]})
    assert capsys.readouterr().out == "step 1/6  loss 0.6931\n"
    assert not printed  # none of it was Ray's to print
    assert "(RayTrainWorker pid=123, ip=10.0.0.1, stderr) Setting up process group" in \
        (logs / "train-workers.log").read_text()
    assert "Failed to query" in (logs / "ray-train.log").read_text()
    assert "stdout) Loading safetensors" in (logs / "vllm.log").read_text()
    assert "a Ray Data task's warning" in (logs / "ray.log").read_text()
    assert MARK not in "".join(p.read_text() for p in logs.glob("*.log"))


def test_the_cluster_s_notices_and_verbose_mode_still_reach_the_console(router, monkeypatch):
    r, printed, logs = router
    r({"pid": "raylet", "ip": "x", "is_err": False, "lines": ["1 Workers killed due to memory pressure (OOM)"]})
    assert printed[-1]["lines"] == ["1 Workers killed due to memory pressure (OOM)"]
    r.pushed({"pid": "raylet", "is_err": False, "lines": ["WARNING: 8 PYTHON worker processes have been started on "
                                                          "node: abc"]})
    r.pushed({"pid": "raylet", "is_err": False, "lines": ["The actor cannot be scheduled right now"]})
    assert printed[-1]["lines"] == ["The actor cannot be scheduled right now"] and len(printed) == 2
    assert "8 PYTHON worker processes" in (logs / "ray.log").read_text()  # kept, off the console

    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    r(_batch("TrainController", ["Requesting resources", _marked({"say": "step 2"})]))
    assert printed[-1]["lines"] == ["Requesting resources"]  # without the marked line: that one is ours
    assert "Requesting resources" in (logs / "ray-train.log").read_text()  # and in its file all the same


def test_a_worker_s_progress_bar_is_drawn_here_and_its_end_awaited(router, capsys):
    r, _, _ = router
    r.expect("training")
    assert not r.wait_closed("training", timeout=0.05)
    for n in (3, 4, 6):  # a resumed run's bar starts at its restored step
        r(_batch("RayTrainWorker", [_marked({"bar": "training", "n": n, "total": 6, "unit": "step"})]))
    assert r.bars["training"].n == 6 and r.bars["training"].total == 6
    r(_batch("RayTrainWorker", [_marked({"say": "checkpoints: the loop waited 0.1 s"}),
                                _marked({"bar": "training", "n": 6, "total": 6, "unit": "step", "close": True})]))
    assert r.wait_closed("training", timeout=0.05) and "training" not in r.bars
    captured = capsys.readouterr()
    assert "training: 100%" in captured.err and "checkpoints: the loop waited 0.1 s\n" in captured.out
    r.expect("training")  # the next run's bar: the last one's end no longer counts
    assert not r.wait_closed("training", timeout=0.05)


def test_components_and_the_step_line():
    assert component({"actor_name": "RayTrainWorker"}) == "train-workers"
    assert component({"actor_name": "CheckpointEngine"}) == "vllm"
    assert component({"task_name": "MapWorker(MapBatches(_ShardScorer))"}) == "vllm"
    assert component({"pid": "raylet"}) == "ray"
    metrics = {"loss": 0.69314, "rewards/accuracies": 0.25, "rewards/margins": 0.01, "grad_norm": 6.2, "lr": 1e-4,
               "pairs_per_s": 51.1, "logps/chosen": -170.9, "eval/loss": 0.671}
    assert step_line(3, metrics, 6) == \
        "step 3/6  loss 0.6931  acc 0.25  margin 0.01  eval loss 0.671  grad norm 6.2  lr 0.0001  pairs/s 51.1"


@pytest.mark.subprocess
def test_ray_s_native_records_in_the_driver_leave_the_terminal(tmp_path):
    """In a process of its own (it takes over file descriptor 2): a record in Ray's C++ log format written
    straight to descriptor 2 goes to driver.log; Python's stderr, a bar's partial line and an error at exit
    still reach the terminal, in order."""
    script = textwrap.dedent(f"""
        import os, sys
        from pipeline.runtime.console import NATIVE_STDERR, ROUTER
        ROUTER.use({str(tmp_path / "run")!r})
        NATIVE_STDERR.start()
        sys.stderr.write("\\rscoring:  50%"); sys.stderr.flush()
        os.write(2, b"[2026-11-30 19:40:04,808 E 25989 25989] core_worker.cc:2465: Actor with class name x\\n")
        sys.stderr.write("\\rscoring: 100%\\n")
        print("error: the last line before exit", file=sys.stderr)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == b"\rscoring:  50%\rscoring: 100%\nerror: the last line before exit\n"
    assert "core_worker.cc:2465: Actor with class name x" in (tmp_path / "run" / "logs" / "driver.log").read_text()


def test_asking_for_the_dashboard_without_its_packages_is_a_user_error(monkeypatch, tmp_path):
    import ray

    from pipeline.config import RayConfig
    from pipeline.errors import UserError
    from pipeline.runtime import session

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(session, "dashboard_installed", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail(f"Ray started: {kw}"))
    with pytest.raises(UserError, match=r"install the `dashboard` extra"):
        session.init_ray(RayConfig(dashboard=True))


def test_in_a_file_a_bar_is_a_few_whole_lines_and_said_lines_stand_alone(capsys, monkeypatch):
    monkeypatch.setattr(console, "FILE_BAR_SECONDS", 3600.0)
    with console.progress_bar(100, "scoring (vllm)") as bar:
        for _ in range(100):
            bar.update(1)
            if bar.n % 25 == 0:
                console.say(f"{bar.n} done")
    out, err = capsys.readouterr()
    assert out == "25 done\n50 done\n75 done\n100 done\n"  # no bar redrawn around them
    assert "\r" not in err and len(err.splitlines()) == 2  # the start and the end
    assert err.splitlines()[-1].startswith("scoring (vllm): 100%")


def test_in_a_file_said_lines_hold_back_a_bar_s_next_line(capsys, monkeypatch):
    monkeypatch.setattr(console, "FILE_BAR_SECONDS", 0.2)
    import time

    with console.progress_bar(10, "training", "step") as bar:
        for i in range(10):  # a step line every 0.05 s: the bar has nothing to add until the end
            time.sleep(0.05)
            bar.update(1)
            console.say(f"step {i + 1}/10")
    assert len(capsys.readouterr().err.splitlines()) == 2
    with console.progress_bar(4, "sampling", "sample") as bar:
        for _ in range(4):  # nothing else said: a line each 0.2 s
            time.sleep(0.25)
            bar.update(1)
    assert len(capsys.readouterr().err.splitlines()) >= 4


def test_a_second_ray_init_keeps_ray_s_own_printing_and_a_router_error_keeps_the_log_thread(tmp_path, monkeypatch):
    """`ray.init` registers `partial(print_to_stdstream, ...)` by the module's name, which the router replaces: after
    a shutdown and a new init the router must still print with Ray's own function (it once called itself until
    Python's recursion limit killed Ray's log thread, and no worker line reached the driver again)."""
    import functools

    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    shown: list[tuple[dict, bool]] = []

    def rays_own(data, ignore_prefix):
        shown.append((data, ignore_prefix))

    monkeypatch.setattr(ray_worker, "print_to_stdstream", rays_own)
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    with dispatcher._lock:  # the session's own handlers (a Ray instance of earlier tests), put back at the end
        saved = list(dispatcher.handlers)
    r = LogRouter()
    r.use(str(tmp_path / "run"))
    try:
        for init in range(2):  # what each ray.init does, then the router's install
            dispatcher.add_handler("ray_print_logs",
                                   functools.partial(ray_worker.print_to_stdstream, ignore_prefix=bool(init)))
            assert r.install() and ray_worker.print_to_stdstream == r.pushed
            dispatcher.emit(_batch("RayTrainWorker", [f"line of init {init}"]))
            assert shown[-1] == ({**_batch("RayTrainWorker", [f"line of init {init}"])}, bool(init))
        r.pushed({"pid": "raylet", "lines": ["a worker died"], "is_err": True})
        assert shown[-1][0]["lines"] == ["a worker died"]

        r.dir = tmp_path / "missing"  # a batch the router cannot write: printed as Ray would, and no exception
        dispatcher.emit(_batch("RayTrainWorker", ["still shown"]))
        assert shown[-1][0]["lines"] == ["still shown"]
    finally:
        with dispatcher._lock:
            dispatcher.handlers = saved
        r.close()
