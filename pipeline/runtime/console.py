"""The console is for people: the plan, a progress bar per long stage, a compact line per logged training step,
errors and the summary. Everything Ray, Ray Train and vLLM print goes to files under `<run_dir>/logs/`, one per
component, and only there unless `--verbose` (or `DPO_VERBOSE=1`).

How: Ray forwards every worker's and actor's stdout/stderr to the driver, on every node, as batches of lines
tagged with the actor's class (`log_to_driver`). The driver hands each batch to the handlers of Ray's stream
dispatcher; `LogRouter` takes the place of Ray's printing handler there. A line that a worker meant for the person
at the console starts with `MARK` (written by `say` and `RemoteBar` in the worker): the router prints it, or draws
the bar it describes. Every other line goes to its component's file:

    logs/train-workers.log   the Ray Train workers (torch, FSDP, our worker code's warnings)
    logs/ray-train.log       Ray Train's controller and its helper actors
    logs/vllm.log            the reference scorers' vLLM engines (evaluation's engines keep eval/<target>/engine.log)
    logs/ray.log             everything else Ray forwards: Ray Data's tasks and actors, the raylet
    logs/driver.log          what Ray's and vLLM's loggers print in this (the driver) process

The autoscaler's events (nodes added, a resource request no node type can meet) and the raylet's notices (workers
killed for memory) stay on the console as well: they are about the user's job, not Ray's internals. So do the
errors Ray pushes to the driver (a worker died, a task no node can run), except one heuristic: "N PYTHON worker
processes have been started on node", which a node of 2 CPUs meets by design (the training workers, Ray Train's
controller, a scorer and Ray Data's tasks hold fractions of a CPU each).
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import re
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from tqdm import tqdm

MARK = "\x1edpo\x1e"  # starts a line a worker meant for the console (ASCII record separators: never in text)
VERBOSE_ENV = "DPO_VERBOSE"
FILE_BAR_SECONDS = 30.0  # output to a file: a progress bar's line after this long without a line
# Actor classes (as Ray names them in forwarded logs) -> component; the first match wins, else "ray".
COMPONENTS = (("RayTrainWorker", "train-workers"), ("TrainController", "ray-train"),
              ("PlacementGroupCleaner", "ray-train"), ("PreemptionWatcher", "ray-train"),
              ("_ShardScorer", "vllm"), ("CheckpointEngine", "vllm"), ("ReferenceEngine", "vllm"))
POOL_SIZE_WARNING = "worker processes have been started on node"
DRIVER_LOGGERS = ("ray", "ray.data", "vllm")  # ray.data has handlers of its own (and does not propagate)
# Sources whose lines are also the user's business: the autoscaler's events (nodes added, resources no node type
# can give), the raylet's notices (workers killed for memory).
CLUSTER_SOURCES = ("autoscaler", "raylet")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def in_ray_worker() -> bool:
    """True in a Ray worker or actor process, where stdout is forwarded to the driver rather than shown."""
    import ray  # noqa: PLC0415 (the console must not import Ray for commands that never start it)

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def _send(message: dict[str, Any]) -> None:
    # Straight to the file descriptor Ray forwards: Ray Train replaces `print` in its workers with a logger call
    # (which prints each line twice, on stdout and stderr).
    os.write(1, (MARK + json.dumps(message) + "\n").encode())


def say(text: str) -> None:
    """A line for the person at the console, from the driver or from any Ray worker."""
    if in_ray_worker():
        _send({"say": text})
    else:
        _print(text)


def _interactive() -> bool:
    return sys.stderr.isatty()


def _print(text: str) -> None:
    """A line on stdout: on a terminal above the progress bars (tqdm clears and redraws them); else as is, and the
    bars' next lines wait (lines that show progress, such as training's step lines, make them redundant)."""
    if _interactive():
        tqdm.write(text, file=sys.stdout)
        return
    print(text, flush=True)
    t = time.time()
    for bar in list(_FILE_BARS):
        bar.last_print_t = t


_FILE_BARS: weakref.WeakSet = weakref.WeakSet()  # the open bars writing lines to a file (see `_print`)


class _Lines:
    """A stream that is not a terminal (a file, a CI log): tqdm's refreshes, `\\r`-rewritten lines on a terminal,
    become a line each."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


class RemoteBar:
    """A progress bar for work done in a Ray worker (training's rank 0), drawn by the driver; a plain tqdm bar in
    the driver process itself. `disable`: a bar that shows nothing (the other ranks)."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, disable: bool = False):
        self.total, self.desc, self.unit, self.n, self.disable = total, desc, unit, initial, disable
        self.local = None if disable or in_ray_worker() else progress_bar(total, desc, unit, initial)
        self._emit()

    def _emit(self, **extra) -> None:
        if not self.disable and self.local is None:
            _send({"bar": self.desc, "n": self.n, "total": self.total, "unit": self.unit, **extra})

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.local is not None:
            self.local.update(n)
        self._emit()

    def write(self, text: str) -> None:
        if not self.disable:
            say(text)

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
        self._emit(close=True)


def progress_bar(total: int, desc: str, unit: str = "pair", initial: int = 0) -> tqdm:
    """One of the console's progress bars, on stderr: on a terminal redrawn at most once a second; otherwise (output
    to a file) a line at the start, one after each `FILE_BAR_SECONDS` without other output, and one at the end."""
    if _interactive():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                    mininterval=1.0)
    bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=_Lines(sys.stderr), ncols=100,
               mininterval=FILE_BAR_SECONDS)
    _FILE_BARS.add(bar)
    return bar


def component(data: dict[str, Any]) -> str:
    """The log file (without `.log`) of a batch of lines Ray forwarded."""
    name = data.get("actor_name") or data.get("task_name") or ""
    return next((c for key, c in COMPONENTS if key in name), "ray")


class LogRouter:
    """The driver's handler of the lines Ray forwards (see the module docstring); one per process (`ROUTER`)."""

    def __init__(self):
        self.lock = threading.Condition()
        self.dir: Path | None = None
        self.upload: tuple[Any, Path] | None = None  # (Store, local dir) for a URI run_dir: logs uploaded on switch
        self.files: dict[str, Any] = {}
        self.bars: dict[str, tqdm] = {}
        self.closed: set[str] = set()  # bars finished since they were last opened
        self.ray_print = None  # Ray's own printing handler, for --verbose and the cluster's warnings
        self.ray_print_to_stdstream = None  # Ray's own function behind it (see `install`)
        self.driver_handler: logging.Handler | None = None
        self.installed = False  # in Ray's dispatcher (see `install`)

    # ------------------------------------------------------------ where

    def use(self, run_dir: str) -> Path:
        """Route the logs to `<run_dir>/logs/` from now on (a URI run_dir: a local directory uploaded there when
        the router moves on or the process ends). Returns the local directory."""
        from pipeline.store.storage import Store, staging_dir  # noqa: PLC0415 (lazy: the store imports pyarrow)

        store = Store(run_dir)
        if store.local:
            target, upload = Path(store.root) / "logs", None
        else:
            target = staging_dir() / "logs" / store.uri.replace("://", "_").replace("/", "_")
            upload = (store, target)
        with self.lock:
            if target == self.dir:
                return target
            self._close_files()
            self.dir, self.upload = target, upload
            target.mkdir(parents=True, exist_ok=True)
        self._route_driver_loggers(target / "driver.log")
        return target

    def _close_files(self) -> None:
        for f in self.files.values():
            f.close()
        self.files = {}
        if self.upload is not None:
            store, local = self.upload
            for p in sorted(local.glob("*.log")):
                store.write_bytes(f"logs/{p.name}", p.read_bytes())

    def close(self) -> None:
        with self.lock:
            self._close_files()
            for bar in self.bars.values():
                bar.close()
            self.bars = {}

    def _route_driver_loggers(self, path: Path) -> None:
        """Ray's and vLLM's loggers in this process: everything to driver.log; the console keeps errors."""
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name in DRIVER_LOGGERS:
            logger = logging.getLogger(name)
            if self.driver_handler is not None:
                logger.removeHandler(self.driver_handler)
            if "." not in name or not logger.propagate:  # (else its records reach the parent's handler)
                logger.addHandler(handler)
            if not verbose():
                for h in logger.handlers:
                    if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                        h.setLevel(max(h.level, logging.ERROR))
        if self.driver_handler is not None:
            self.driver_handler.close()
        self.driver_handler = handler

    # ------------------------------------------------------------ Ray's forwarded lines

    def install(self) -> bool:
        """Take the place of Ray's printing handler (once Ray is initialized with log_to_driver). False when this
        Ray has no such handler (an API change): Ray then prints as it always did."""
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher  # noqa: PLC0415
        except ImportError:
            return False
        import ray._private.worker as ray_worker  # noqa: PLC0415

        # The errors Ray pushes to the driver are printed with `print_to_stdstream` (`listen_error_messages`),
        # which this router replaces; Ray's own is kept for what the console still shows. `ray.init` registers
        # its printing handler as `partial(print_to_stdstream, ...)` by the module's name: after a shutdown and a
        # new init that is this router's `pushed`, so the handler is rebuilt around Ray's own function.
        if getattr(ray_worker.print_to_stdstream, "__self__", None) is not self:
            self.ray_print_to_stdstream = ray_worker.print_to_stdstream
        with dispatcher._lock:
            handlers = dict(dispatcher.handlers)
        if "ray_print_logs" in handlers:  # (again after a new ray.init)
            keywords = getattr(handlers["ray_print_logs"], "keywords", {})
            self.ray_print = functools.partial(self.ray_print_to_stdstream, **keywords)
            dispatcher.remove_handler("ray_print_logs")
            dispatcher.remove_handler("dpo_console")
            dispatcher.add_handler("dpo_console", self)
        self.installed = "dpo_console" in dict(dispatcher.handlers)
        if self.installed:
            ray_worker.print_to_stdstream = self.pushed
        return self.installed

    def pushed(self, data: dict[str, Any], ignore_prefix: bool = False) -> None:
        """An error Ray pushed to the driver (see the module docstring): ray.log, and the console."""
        lines = data.get("lines") or []
        try:
            written = self._write("ray", data, lines)
        except OSError:  # (a full disk: the console still gets it)
            written = False
        shown = [line for line in lines if verbose() or not written or POOL_SIZE_WARNING not in line]
        if shown and self.ray_print is not None:
            self.ray_print({**data, "lines": shown})

    def __call__(self, data: dict[str, Any]) -> None:
        """One batch of forwarded lines (Ray's log thread, which must not die: no more lines would arrive)."""
        try:
            self._route(data)
        except Exception:  # noqa: BLE001 (the batch is printed as Ray would; the cause is in driver.log)
            logging.getLogger("ray").exception("the console's log router failed on a batch of lines")
            if self.ray_print is not None:
                self.ray_print(data)

    def _route(self, data: dict[str, Any]) -> None:
        lines = data.get("lines") or []
        rest = [line for line in lines if not line.startswith(MARK)]
        for line in lines:
            if line.startswith(MARK):
                self._console(json.loads(line[len(MARK):]))
        if not rest:
            return
        written = self._write(component(data), data, rest)
        if (verbose() or data.get("pid") in CLUSTER_SOURCES or not written) and self.ray_print is not None:
            self.ray_print({**data, "lines": rest})

    def _write(self, name: str, data: dict[str, Any], lines: list[str]) -> bool:
        """Append to the component's file; False before `use` named a run (Ray then prints them, as usual)."""
        with self.lock:
            if self.dir is None:
                return False
            f = self.files.get(name)
            if f is None:
                f = self.files[name] = open(self.dir / f"{name}.log", "a", encoding="utf-8")
            source = data.get("actor_name") or data.get("task_name") or ""
            head = f"{time.strftime('%H:%M:%S')} ({source} pid={data.get('pid')}, ip={data.get('ip')}"
            stream = "stderr" if data.get("is_err") else "stdout"
            f.write("".join(f"{head}, {stream}) {line}\n" for line in lines))
            f.flush()
            return True

    def _console(self, message: dict[str, Any]) -> None:
        if "say" in message:
            _print(message["say"])
            return
        name = message["bar"]
        with self.lock:
            bar = self.bars.get(name)
            if bar is None and not message.get("close"):
                bar = self.bars[name] = progress_bar(message["total"], name, message["unit"], message["n"])
                self.closed.discard(name)
            if bar is not None:
                bar.update(message["n"] - bar.n)
                if message.get("close"):
                    bar.close()
                    del self.bars[name]
            if message.get("close"):
                self.closed.add(name)
                self.lock.notify_all()

    def driver_record(self, line: str) -> bool:
        """A record of Ray's C++ core in this process (see `NativeStderr`) to driver.log; False before `use`."""
        with self.lock:
            if self.dir is None:
                return False
            with open(self.dir / "driver.log", "a", encoding="utf-8") as f:
                f.write(line)
            return True

    def expect(self, bar: str) -> None:
        """A worker is about to open the bar `bar` (see `wait_closed`)."""
        with self.lock:
            self.closed.discard(bar)

    def wait_closed(self, bar: str, timeout: float) -> bool:
        """Wait until the worker's bar `bar` (announced with `expect`) has closed here. Ray forwards lines
        asynchronously, so a stage whose workers have ended waits for their last lines before it goes on."""
        with self.lock:
            return not self.installed or self.lock.wait_for(lambda: bar in self.closed, timeout)


class NativeStderr:
    """Ray's C++ core in this (the driver) process writes its error records straight to file descriptor 2, past
    Python's logging: e.g. one per Ray Data actor pool, "Actor with class name ... has constructor arguments in the
    object store and max_restarts > 0" (Ray Data's design: restartable actors, arguments by reference). With
    `start`, descriptor 2 is a pipe read by a thread: those records (Ray's log format, `RAY_RECORD`) go to
    `driver.log` of the current run, everything else (our progress bars and errors, Python's tracebacks) to the
    terminal as it comes. The command line starts it (not the library: a test's own capture of descriptor 2
    must not be taken over); `stop` (at exit) gives descriptor 2 back and waits for what is left in the pipe."""

    RAY_RECORD = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] ")
    STOP = b"\x1edpo-stop\x1e"

    def __init__(self, router: LogRouter):
        self.router, self.saved, self.thread = router, None, None

    def start(self) -> None:
        if self.saved is not None or verbose():
            return
        sys.stderr.flush()
        self.saved = os.dup(2)
        r, self.w = os.pipe()
        os.dup2(self.w, 2)
        self.thread = threading.Thread(target=self._pump, args=(r,), name="dpo-native-stderr", daemon=True)
        self.thread.start()
        atexit.register(self.stop)

    def _pump(self, r: int) -> None:
        pending = b""
        while chunk := os.read(r, 1 << 16):
            pending += chunk
            done = pending.endswith(self.STOP)
            pending = pending.removesuffix(self.STOP)
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._line(line + b"\n")
            if pending and (done or not pending.startswith(b"[")):  # a bar's "\r..." update: shown now
                os.write(self.saved, pending)
                pending = b""
            if done:
                break
        os.close(r)

    def _line(self, line: bytes) -> None:
        record = self.RAY_RECORD.search(line)  # (after a bar's partial line, when both came in one read)
        if record and self.router.driver_record(line[record.start():].decode(errors="replace")):
            line = line[:record.start()]
        if line:
            os.write(self.saved, line)

    def stop(self) -> None:
        if self.saved is None:
            return
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.write(self.w, self.STOP)
        self.thread.join(timeout=5)
        os.close(self.w)
        self.saved = None


ROUTER = LogRouter()
NATIVE_STDERR = NativeStderr(ROUTER)
atexit.register(ROUTER.close)
