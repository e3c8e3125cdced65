"""The data root: an fsspec URI (a local path by default) with atomic writes.

Every artifact is written to a private temporary location first and moved into place only
when complete, so a reader (or a later run deciding what to trust) never sees a
half-written file or directory.  Local roots use ``os.replace``/``rename`` (atomic on one
file system); remote roots stage locally and upload, removing the destination first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec


class DataRoot:
    def __init__(self, uri: str) -> None:
        self.uri = str(uri).rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.uri)
        self.is_local = self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol

    def __repr__(self) -> str:
        return f"DataRoot({self.uri!r})"

    def path(self, rel: str) -> str:
        """Full path (in the root's file system) of a relative artifact path."""
        return f"{self.base}/{rel.lstrip('/')}"

    def url(self, rel: str) -> str:
        return self.path(rel) if self.is_local else f"{self.uri}/{rel.lstrip('/')}"

    def local(self, rel: str) -> Path:
        if not self.is_local:
            raise RuntimeError(f"{self.uri} is not a local data root")
        return Path(self.path(rel))

    @contextlib.contextmanager
    def fetched(self, *rels: str) -> Iterator[list[Path]]:
        """Local paths of ``rels`` for readers that need a file (torch.load, np.load): the files
        themselves on a local root, copies in a temporary folder (removed after) on a remote one."""
        if self.is_local:
            yield [self.local(r) for r in rels]
            return
        with tempfile.TemporaryDirectory(prefix="dd-fetch-") as tmp:
            out = []
            for i, rel in enumerate(rels):
                dest = Path(tmp) / str(i) / Path(rel).name
                dest.parent.mkdir()
                self.fs.get_file(self.path(rel), str(dest))
                out.append(dest)
            yield out

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def check_writable(self) -> None:
        """Fail early, naming the root, if nothing can be written there."""
        probe = f".write-probe-{uuid.uuid4().hex}"
        try:
            self.fs.makedirs(self.base, exist_ok=True)
            with self.fs.open(self.path(probe), "wb") as fh:
                fh.write(b"ok")
            self.fs.rm(self.path(probe))
        except (OSError, PermissionError) as err:
            raise PermissionError(
                f"data root {self.uri} is not writable ({err}); set DD_ASSETS_DATA_ROOT "
                "to a writable folder or URI"
            ) from err

    # -- atomic writes -------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.atomic_file(rel) as tmp:
            Path(tmp).write_bytes(data)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as fh:
            return fh.read()

    @contextlib.contextmanager
    def atomic_file(self, rel: str) -> Iterator[str]:
        """Yield a local temp file path; on success it becomes ``rel`` atomically."""
        dest = self.path(rel)
        if self.is_local:
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{dest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                yield tmp
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            with tempfile.TemporaryDirectory() as d:
                tmp = os.path.join(d, "f")
                yield tmp
                self.fs.put_file(tmp, dest)

    @contextlib.contextmanager
    def atomic_dir(self, rel: str) -> Iterator[str]:
        """Yield a local temp directory; on success it replaces directory ``rel``.

        Locally the old directory is renamed aside, the new one renamed in, then the old
        one deleted, so at every instant ``rel`` is either the old or the new complete
        version (or absent before the first write).
        """
        dest = self.path(rel)
        if self.is_local:
            parent = Path(dest).parent
            parent.mkdir(parents=True, exist_ok=True)
            tmp = parent / f".{Path(dest).name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                yield str(tmp)
                trash = None
                if os.path.exists(dest):
                    trash = parent / f".{Path(dest).name}.old-{uuid.uuid4().hex[:8]}"
                    os.rename(dest, trash)
                os.rename(tmp, dest)
                if trash is not None:
                    shutil.rmtree(trash, ignore_errors=True)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        else:
            with tempfile.TemporaryDirectory() as d:
                yield d
                if self.fs.exists(dest):
                    self.fs.rm(dest, recursive=True)
                self.fs.put(d.rstrip("/") + "/", dest, recursive=True)
