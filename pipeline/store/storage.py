"""Storage on any pyarrow filesystem (local path, `file://`, `s3://`, `gs://`), with atomic writes.

Every file is written under a temporary name and moved into place, so a reader (or a rerun after a crash) sees
either the whole file or nothing. On a local disk the move is a rename; on object stores an object appears whole.

Directories that programs need on a local disk (a checkpoint vLLM loads, a log a process writes) cross between
local disk and storage whole: `Store.upload_dir` publishes one (its commit file last), `local_copy` downloads one
into a node-local staging directory (`$DPO_PIPELINE_STAGING`, default `~/.cache/dpo-pipeline/staging`).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.store.fingerprint import sha256_bytes

UPLOAD_THREADS = 8  # files of one directory uploaded at once


def storage_error(what: str, where: str, e: OSError) -> UserError:
    """One line for a storage failure: what failed where, why, and what to do about it."""
    reason = (e.strerror or str(e)).split("Detail: ")[-1].split("\n")[0].strip()
    reason = reason.split("] ", 1)[-1] if reason.startswith("[errno") else reason
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space there, or point cache_dir / run_dir at another disk"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "make it writable, or point cache_dir / run_dir somewhere writable"
    else:
        fix = "check the path or URI, that the storage is reachable, and its credentials"
    return UserError(f"cannot {what} {where}: {reason[:300]}; {fix} (finished work is kept: rerun to resume)")


def _storage_errors(what: str, rel_arg: int = 0):
    """Method decorator: an OSError (full disk, read-only directory, unreachable storage) becomes a one-line
    `UserError` naming the path (argument `rel_arg`); FileNotFoundError stays what it is (callers test for it)."""
    def wrap(method):
        @functools.wraps(method)
        def inner(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except FileNotFoundError:
                raise
            except OSError as e:
                rel = args[rel_arg] if len(args) > rel_arg else ""
                raise storage_error(what, f"{self.uri}/{rel}" if rel else self.uri, e) from None
        return inner
    return wrap


class Store:
    """A directory on a pyarrow filesystem. Paths passed to methods are relative to `root`. Storage failures
    (full disk, read-only directory, unreachable URI) raise one-line `UserError`s."""

    def __init__(self, uri: str):
        if "://" in uri:
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(uri)
            except (pa.ArrowInvalid, OSError) as e:
                raise UserError(f"cannot open storage {uri!r} ({e}); check the URI and its credentials") from None
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(uri)
        self.uri = uri.rstrip("/") if "://" in uri else self.root

    @property
    def local(self) -> bool:
        """True on a local disk (a path or a `file://` URI): `path()` is then a local path."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def child(self, rel: str) -> Store:
        sub = Store.__new__(Store)
        sub.fs, sub.root = self.fs, self.path(rel)
        sub.uri = f"{self.uri}/{rel}"
        return sub

    @_storage_errors("reach")
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    @_storage_errors("reach")
    def isdir(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.Directory

    @_storage_errors("create")
    def makedirs(self, rel: str = "") -> None:
        self.fs.create_dir(self.path(rel), recursive=True)

    @_storage_errors("list")
    def listdir(self, rel: str = "") -> list[str]:
        info = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(i.base_name for i in info)

    @_storage_errors("read")
    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    @_storage_errors("write")
    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write atomically; returns the sha256 of `data`."""
        final = self.path(rel)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{final.rsplit('/', 1)[1]}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, final)
        except BaseException:  # a full disk, a lost connection: leave no partial file behind
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass
            raise
        return sha256_bytes(data)

    @_storage_errors("write")
    def write_stream(self, rel: str, chunks: Iterable[bytes]) -> str:
        """Write the bytes of `chunks` atomically, one chunk in memory at a time; returns their sha256."""
        final = self.path(rel)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{final.rsplit('/', 1)[1]}"
        h = hashlib.sha256()
        try:
            with self.fs.open_output_stream(tmp) as f:
                for chunk in chunks:
                    h.update(chunk)
                    f.write(chunk)
            self.fs.move(tmp, final)
        except BaseException:  # as in write_bytes: no partial file left behind
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass
            raise
        return h.hexdigest()
    @_storage_errors("write", rel_arg=1)
    def upload_file(self, local: str | Path, rel: str) -> None:
        """Copy a local file to `rel`, streamed. An object store shows an object once its upload is complete; a
        failed upload is deleted, so that no reader finds part of a file."""
        self.fs.create_dir(self.path(rel).rsplit("/", 1)[0], recursive=True)
        try:
            pafs.copy_files(str(local), self.path(rel), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        except BaseException:
            try:
                self.fs.delete_file(self.path(rel))
            except OSError:
                pass
            raise

    def sha256(self, rel: str) -> str | None:
        """sha256 of a file's bytes, streamed; None if it does not exist."""
        h = hashlib.sha256()
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
        except FileNotFoundError:
            return None
        return h.hexdigest()

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode())

    def write_parquet(self, rel: str, table: pa.Table) -> str:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return self.write_bytes(rel, buf.getvalue())

    def read_parquet(self, rel: str) -> pa.Table:
        return pq.read_table(self.path(rel), filesystem=self.fs)

    @_storage_errors("delete")
    def delete(self, rel: str) -> None:
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))

    def stamp(self, rel: str = "") -> list[tuple[str, int, int]]:
        """(relative path, size, mtime in ns) of every file under `rel`, hidden ones (`.name`) excluded: a cheap
        fingerprint that any rewrite of a file changes."""
        base = self.path(rel)
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        out = []
        for i in infos:
            relpath = i.path[len(base):].lstrip("/")
            if i.type == pafs.FileType.File and not any(p.startswith(".") for p in relpath.split("/")):
                out.append((relpath, i.size, i.mtime_ns or 0))
        return sorted(out)

    @_storage_errors("write", rel_arg=1)
    def upload_dir(self, local_dir: str | Path, rel: str, last: str) -> None:
        """Publish a local directory as `rel`, replacing what is there. A reader that finds `rel/last` finds the
        whole directory: on a local disk it is copied beside and renamed into place; elsewhere `last` is uploaded
        after every other file."""
        local_dir = Path(local_dir)
        self.delete(rel)
        if self.local:
            final = Path(self.path(rel))
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".tmp-{uuid.uuid4().hex}-{final.name}"
            shutil.copytree(local_dir, tmp)
            os.replace(tmp, final)
            return
        files = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())

        def put(name: str) -> None:
            with open(local_dir / name, "rb") as src, self.fs.open_output_stream(self.path(f"{rel}/{name}")) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        # Object stores take parallel uploads well (one stream each): weight shards go up together.
        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(put, [n for n in files if n != last]))
        if last in files:
            put(last)

    def download_dir(self, rel: str, local_dir: str | Path) -> None:
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path(rel), str(local_dir), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())


def staging_dir() -> Path:
    """Node-local directory for copies of remote directories and files being written before upload."""
    return Path(os.environ.get("DPO_PIPELINE_STAGING", Path.home() / ".cache" / "dpo-pipeline" / "staging"))


def check_free_space(directory: str | Path, need: int, key: str, what: str) -> Path:
    """`directory` (created if missing), or a user error naming `key` when its disk has less than `need` bytes
    free for `what`."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < need:
        raise UserError(f"{key}: {path} has {free / 1e9:.1f} GB free but {what} needs {need / 1e9:.1f} GB; point "
                        f"{key} at a node-local disk with room, or free space there")
    return path


def local_copy(uri: str, top_level: bool = False) -> str:
    """A local directory holding the files of directory `uri`: the directory itself on a local disk; otherwise a
    copy in `staging_dir()`, downloaded again only when the files' sizes or times changed. `top_level`: only the
    directory's own files, not its subdirectories (a LoRA adapter without the merged model beside it)."""
    store = Store(uri)
    if store.local:
        return store.root
    files = [entry for entry in store.stamp() if not top_level or "/" not in entry[0]]
    if not files:
        raise FileNotFoundError(f"{uri} holds no files")
    stamp = json.dumps(files)
    key = hashlib.sha256(f"{store.uri}{'?top' if top_level else ''}".encode()).hexdigest()[:20]
    dest = staging_dir() / key / store.uri.rsplit("/", 1)[-1]
    marker = dest / ".stamp.json"
    if marker.is_file() and marker.read_text() == stamp:
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    if top_level:
        for name, _, _ in files:
            pafs.copy_files(store.path(name), str(tmp / name), source_filesystem=store.fs,
                            destination_filesystem=pafs.LocalFileSystem())
    else:
        store.download_dir("", tmp)
    (tmp / ".stamp.json").write_text(stamp)
    if dest.exists():
        shutil.rmtree(dest, ignore_errors=True)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process on this node finished the same download first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
