"""Shared by the fault tests: run the CLI in a subprocess, check one-line user errors, reap killed drivers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_user_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    """Exit 2, one line `error: ...` holding `needle`, no traceback."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def reap_session(sid: int) -> None:
    """Kill what a SIGKILLed driver left running (its local Ray instance's processes)."""
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def fault(point: str, token: Path, **fields) -> str:
    """A `DPO_PIPELINE_FAULT` value (pipeline/faults.py); creates the token file that arms it."""
    token.write_text("armed")
    return ",".join([f"point={point}", f"token={token}", *(f"{k}={v}" for k, v in fields.items())])
