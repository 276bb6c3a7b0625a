"""Training metrics on record: rank 0 writes each logged step to the console, `metrics.jsonl` (at a URI run_dir in
parts whose upload cost per step does not grow with the run), TensorBoard event files and the experiment trackers.

Stable names (README "Training metrics"): loss, rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected, grad_norm, lr, tokens_per_s, pairs_per_s, peak_rss_mb; eval/loss,
eval/rewards/accuracies, eval/rewards/margins (summed over ranks by pipeline.dpo.metrics.StepSums).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from tensorboardX import SummaryWriter

from pipeline.store.storage import Store

# The console's line per logged step: these metrics, under these short names, in this order (metrics.jsonl, the
# trackers and TensorBoard have all of them).
CONSOLE_METRICS = (("loss", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin"),
                   ("eval/loss", "eval loss"), ("eval/rewards/accuracies", "eval acc"), ("grad_norm", "grad norm"),
                   ("lr", "lr"), ("pairs_per_s", "pairs/s"))


def step_line(step: int, metrics: dict[str, float], total: int | None = None) -> str:
    shown = "  ".join(f"{name} {metrics[k]:.4g}" for k, name in CONSOLE_METRICS if k in metrics)
    return f"step {step}{f'/{total}' if total else ''}  {shown}"


class MetricsLogger:
    """Rank 0 only: one stdout line per logged step, `metrics.jsonl`, and TensorBoard event files.

    A local run_dir gets the files directly. A URI run_dir (object storage cannot append) gets them at a cost per
    logged step that does not grow with the run: the rows go to `metrics-parts/NNNNNN.jsonl`, blocks of
    `PART_ROWS` rows, each uploaded when it fills; the open block is uploaded again only at a checkpoint or when
    `FLUSH_SECONDS` have passed since the last upload (so about one row's bytes per logged step, and rows at most
    that late on storage); `metrics.jsonl` (all rows) is written at the end. TensorBoard starts a new event file
    at every checkpoint (`sync`), so each file is uploaded once, closed. A restarted run rebuilds its rows from the
    parts (or a finished run's metrics.jsonl): all rows up to its checkpoint, which `sync` uploaded."""

    PART_ROWS = 32
    PARTS = "metrics-parts"
    FLUSH_SECONDS = 30.0

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True, trackers=None):
        """`tensorboard`: write event files; `trackers`: a pipeline.runtime.trackers.Trackers (W&B, MLflow) that
        gets every logged row too, and is closed with this logger."""
        self.enabled = enabled
        self.trackers = trackers
        if not enabled:
            return
        self.store = Store(run_dir)
        self.uploaded_bytes = 0  # to the run_dir, by this logger (URI run_dir only)
        self.last_upload = float("-inf")  # time.monotonic() of the last part upload
        if self.store.local:
            self.local = Path(self.store.root)
            self.local.mkdir(parents=True, exist_ok=True)
        else:
            self.local = Path(tempfile.mkdtemp(prefix="dpo-metrics-"))
            (self.local / "metrics.jsonl").write_bytes(self._remote_rows())
        path = self.local / "metrics.jsonl"
        self._start_parts(path.read_text().splitlines(keepends=True) if path.exists() else [])
        self.jsonl = open(path, "a")
        self.tb_files = 0
        self.tb = self._tensorboard() if tensorboard else None
        self.tb_uploaded: set[str] = set()

    def _remote_rows(self) -> bytes:
        """The rows a URI run_dir holds: its parts (a run that stopped early) or its metrics.jsonl (a finished one)."""
        parts = sorted(n for n in self.store.listdir(self.PARTS) if n.endswith(".jsonl"))
        if parts:
            return b"".join(self.store.read_bytes(f"{self.PARTS}/{n}") for n in parts)
        return self.store.read_bytes("metrics.jsonl") if self.store.exists("metrics.jsonl") else b""

    def _tensorboard(self) -> SummaryWriter:
        self.tb_files += 1  # a suffix per writer: two opened in the same second get different files
        return SummaryWriter(str(self.local / "tensorboard"), filename_suffix=f".{self.tb_files}")

    def resume_at(self, step: int) -> None:
        """Keep only the rows of steps up to `step` (and none a crash cut short): a run restarted from the checkpoint
        of `step` logs the later steps again, and metrics.jsonl holds each step once."""
        if not self.enabled:
            return
        self.jsonl.close()
        path = self.local / "metrics.jsonl"
        kept = []
        for line in path.read_text().splitlines(keepends=True):
            try:
                if json.loads(line)["step"] <= step and line.endswith("\n"):
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                pass
        path.write_text("".join(kept))
        self.jsonl = open(path, "a")
        self._start_parts(kept)
        if not self.store.local:  # the parts again, from the kept rows (once per restart)
            self.store.delete(self.PARTS)
            for first in range(0, len(kept), self.PART_ROWS):
                self._upload_part(first // self.PART_ROWS, kept[first:first + self.PART_ROWS])

    def _start_parts(self, lines: list[str]) -> None:
        """Continue after `lines` (the rows so far): the open part is the last, unfilled block of PART_ROWS."""
        self.rows = len(lines)
        self.part_lines = lines[self.rows // self.PART_ROWS * self.PART_ROWS:]

    def _upload_part(self, index: int, lines: list[str]) -> None:
        data = "".join(lines).encode()
        self.store.write_bytes(f"{self.PARTS}/{index:06d}.jsonl", data)
        self.uploaded_bytes += len(data)
        self.last_upload = time.monotonic()

    def _flush_part(self) -> None:
        if self.part_lines:
            self._upload_part((self.rows - 1) // self.PART_ROWS, self.part_lines)

    def log(self, step: int, metrics: dict[str, float], echo=print, total: int | None = None) -> None:
        """One row: metrics.jsonl, TensorBoard, the trackers, and `echo` gets the console's line (`step_line`)."""
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        self.jsonl.write(line)
        self.jsonl.flush()
        if len(self.part_lines) == self.PART_ROWS:  # that part is full (and uploaded): the next one opens
            self.part_lines = []
        self.part_lines.append(line)
        self.rows += 1
        if not self.store.local and (len(self.part_lines) == self.PART_ROWS or
                                     time.monotonic() - self.last_upload >= self.FLUSH_SECONDS):
            self._flush_part()
        for k, v in metrics.items():
            if self.tb is not None:
                self.tb.add_scalar(k, v, step)
        if self.trackers is not None:
            self.trackers.log(metrics, step)
        echo(step_line(step, metrics, total))

    def sync(self) -> None:
        """At a checkpoint (URI run_dir): upload the open block of rows; close the current TensorBoard file, upload
        it, start the next."""
        if self.enabled and not self.store.local:
            self._flush_part()
            if self.tb is not None:
                self.tb.close()
                self._upload_tensorboard()
                self.tb = self._tensorboard()

    def _upload_tensorboard(self) -> None:
        """Closed event files not uploaded yet (each is uploaded once)."""
        for f in sorted((self.local / "tensorboard").rglob("*")) if self.tb is not None else []:
            rel = f.relative_to(self.local).as_posix()
            if f.is_file() and rel not in self.tb_uploaded:
                data = f.read_bytes()
                self.store.write_bytes(rel, data)
                self.uploaded_bytes += len(data)
                self.tb_uploaded.add(rel)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.trackers is not None:
            self.trackers.close()
        if not self.store.local:  # all rows in one file, then the parts go
            data = (self.local / "metrics.jsonl").read_bytes()
            self.store.write_bytes("metrics.jsonl", data)
            self.uploaded_bytes += len(data)
            self._upload_tensorboard()
            self.store.delete(self.PARTS)
