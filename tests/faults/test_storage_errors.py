"""Case 7: disk and storage errors. A full disk, a read-only directory or an unreachable URI is one line naming
the path, the reason and the fix (exit 2), with no partial file left; after space is freed, a rerun resumes.

The full and read-only disks are real: a small or read-only tmpfs mounted in a private mount namespace
(`unshare -rm`, no privileges needed where user namespaces are allowed; skipped elsewhere)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from tests.conftest import DATA, make_config
from tests.faults.helpers import ROOT
from tests.faults.test_secrets import SECRET_ENV


@functools.cache
def namespaces() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_namespaces = pytest.mark.skipif("not namespaces()", reason="unshare -rm (user + mount namespaces) unavailable")


def in_namespace(script: str, *args: str, env: dict[str, str] | None = None) -> None:
    """Run `script` (sh) as root of a private user + mount namespace; $1.. are `args`; `env`: added variables."""
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr


def one_line_error(err: str, *needles: str, after_progress: bool = False) -> None:
    """`err` is one `error: ...` line (after Ray's and the progress bar's output, if the run had started)."""
    lines = err.strip().splitlines()
    assert (after_progress or len(lines) == 1) and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    for n in needles:
        assert n in lines[-1], err


def write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


@needs_namespaces
@pytest.mark.ray
@pytest.mark.extended  # two whole cache runs, each a new driver and Ray instance: `make test-extended`
def test_a_full_disk_stops_the_cache_cleanly_and_a_rerun_resumes(tiny_model, tmp_path):
    """Both runs also have credentials in their environment (and so do the Ray workers they start): none of them
    reaches a file the runs write (cache, manifest, logs, resolved config) or their output (test_secrets.py)."""
    big = tmp_path / "big.jsonl"
    big.write_text((DATA / "standard.jsonl").read_text() * 3)  # 72 rows, 18 shards (96 KiB holds 6 to 9)
    disk = tmp_path / "disk"
    disk.mkdir()
    cfg = make_config(tiny_model, tmp_path, "scoring.engine=hf", "scoring.shard_size=4", f"cache_dir={disk}",
                      data=big)
    out = tmp_path / "out"
    out.mkdir()
    py = f"{sys.executable} -m pipeline.cli cache {write_config(cfg, tmp_path / 'cfg.yaml')}"
    # 96 KiB holds some shards, not all; then the disk grows ("space freed") and the same command runs again.
    in_namespace(f'mount -t tmpfs -o size=96k tmpfs "$1" && {{ {py} >"$2/out1" 2>"$2/err1"; echo $? >"$2/rc1"; '
                 f'find "$1" >"$2/files1"; mount -o remount,size=64m "$1"; {py} >"$2/out2" 2>"$2/err2"; '
                 f'echo $? >"$2/rc2"; find "$1" >"$2/files2"; '
                 # every file under tmp_path (the tmpfs cache_dir, run_dir's logs, the outputs), read in here
                 f'grep -rlF -e "$HF_TOKEN" -e "$AWS_ACCESS_KEY_ID" -e "$AWS_SECRET_ACCESS_KEY" "$3" >"$2/leaks"; '
                 f'find "$3" -type f | wc -l >"$2/scanned"; }}', str(disk), str(out), str(tmp_path), env=SECRET_ENV)
    read = lambda name: (out / name).read_text()  # noqa: E731
    assert read("rc1").strip() == "2", read("err1")
    one_line_error(read("err1"), f"error: cannot write {disk}/", "No space left on device; free space there",
                   after_progress=True)
    files = read("files1").split()
    assert not any(Path(f).name.startswith(".tmp-") for f in files)  # no partial file
    assert not any(f.endswith("manifest.json") for f in files)  # not mistaken for complete
    done = sum(Path(f).name.startswith("shard-") for f in files)
    assert read("rc2").strip() == "0", read("err2")
    assert f"resumed: {done} shard(s) were already done" in read("out2") and done > 0
    assert any(f.endswith("manifest.json") for f in read("files2").split())
    assert read("leaks") == "" and int(read("scanned")) > 20, read("leaks")
    assert any("manifest" in f for f in read("files2").split()) and (tmp_path / "run" / "logs").is_dir()


@needs_namespaces
@pytest.mark.parametrize("where", ["cache_dir", "run_dir"])
@pytest.mark.subprocess
def test_a_read_only_directory_is_one_line_and_nothing_starts(where, tiny_model, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    cfg = make_config(tiny_model, tmp_path, "scoring.engine=hf", f"{where}={ro}")
    out = tmp_path / "out"
    out.mkdir()
    in_namespace(f'mount -t tmpfs -o ro tmpfs "$1" && {sys.executable} -m pipeline.cli cache "$3" >"$2/out" '
                 f'2>"$2/err"; echo $? >"$2/rc"', str(ro), str(out), str(write_config(cfg, tmp_path / "c.yaml")))
    assert (out / "rc").read_text().strip() == "2"
    one_line_error((out / "err").read_text(), f"error: cannot write {ro}/", "Read-only file system; make it "
                   "writable, or point cache_dir / run_dir somewhere writable")


def test_an_unreachable_uri_is_one_line(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    uri = "s3://bucket/cache?endpoint_override=127.0.0.1:9&scheme=http"  # nothing listens on port 9
    code = main(["cache", "configs/tiny.yaml", f"model.path={tiny_model}", f"data.train.path={DATA / 'standard.jsonl'}",
                 f"cache_dir={uri}", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    one_line_error(err, "error: cannot reach s3://bucket/cache", "check the path or URI, that the storage is "
                   "reachable, and its credentials")
    assert not (tmp_path / "run").exists()
