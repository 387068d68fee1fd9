"""The one path layer for every file jaxlm itself reads or writes: local paths and object storage.

Paths are strings. A local path (with `~` expanded) goes to the filesystem; `gs://bucket/...`
(and any other URL etils.epath knows) goes through etils.epath, the layer orbax and TFDS use too,
which reaches Google Cloud Storage through gcsfs when TensorFlow is not installed. Checkpoints go
to the same place through orbax and tensorstore.

Object stores have no rename and no append, so:
- `write_*` replace a local file atomically (a temporary file, then `os.replace`); an object is
  written in one request, which is atomic already;
- `Appender` appends lines to a local file as it goes; for an object it rewrites the whole object,
  at most every `every` seconds (GCS takes one write per second per object) and on `flush()`;
- `local_file` / `local_tree` give a local path for readers of local files only (a HF
  directory's safetensors, the tokenizer of a loaded model), by copying the objects into
  `~/.cache/jaxlm/remote/`. (array_record reads gs:// itself; TFDS prepares a dataset in a local
  folder, which `upload_tree` then copies.)

Object-storage credentials and endpoints are the storage libraries' own settings: see
docs/launch.md ("Object storage").
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time

import fsspec.config
from etils import epath

CACHE = os.path.join("~", ".cache", "jaxlm", "remote")

# gcsfs (behind epath and orbax) caches folder listings for the life of the process, so a
# process would not see the steps another process saved since (an eval script watching a run,
# a resumed run): list afresh every time. A user's own fsspec setting wins.
for _protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def is_remote(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> str:
    """`path` with `~` expanded, made absolute when local; URLs as they are."""
    path = str(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(*parts: str) -> str:
    return str(epath.Path(parts[0]).joinpath(*parts[1:])) if is_remote(parts[0]) else os.path.join(*parts)


def _p(path: str) -> epath.Path:
    return epath.Path(resolve(path))


def exists(path: str) -> bool:
    return _p(path).exists()


def isfile(path: str) -> bool:
    return _p(path).is_file()


def isdir(path: str) -> bool:
    return _p(path).is_dir()


def makedirs(path: str) -> None:
    _p(path).mkdir(parents=True, exist_ok=True)


def listdir(path: str) -> list[str]:
    return sorted(p.name for p in _p(path).iterdir())


def glob(folder: str, pattern: str) -> list[str]:
    """Paths under `folder` matching `pattern` (relative, e.g. "data/*.json"), sorted."""
    return sorted(str(p) for p in _p(folder).glob(pattern))


def read_text(path: str) -> str:
    return _p(path).read_text()


def read_bytes(path: str) -> bytes:
    return _p(path).read_bytes()


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file: never half-written (temporary file + rename locally; objects are
    written in one request)."""
    if is_remote(path):
        _p(path).write_bytes(data)
        return
    path = resolve(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def copy(src: str, dst: str) -> None:
    write_bytes(dst, read_bytes(src))


def rename(src: str, dst: str) -> None:
    """Move a file or folder (on object storage: copy, then delete)."""
    _p(src).rename(_p(dst))


def cache_path(path: str) -> str:
    """The local folder or file that stands for an object-storage `path`."""
    scheme, _, rest = resolve(path).partition("://")
    return os.path.join(os.path.expanduser(CACHE), scheme, rest)


def upload_tree(local: str, remote: str, last: str | None = None) -> None:
    """Copy every file under the local folder `local` to `remote` (a folder URL), the file named
    `last` after all the others."""
    files = sorted(os.path.relpath(os.path.join(d, f), local)
                   for d, _, names in os.walk(local) for f in names)
    for rel in sorted(files, key=lambda r: os.path.basename(r) == last):
        with open(os.path.join(local, rel), "rb") as f:
            write_bytes(join(remote, *rel.split(os.sep)), f.read())


@contextlib.contextmanager
def writing_folder(path: str):
    """A local folder to write a whole directory into (an export): `path` itself, or, for
    object storage, a temporary folder uploaded to `path` when the block ends without error."""
    if not is_remote(path):
        os.makedirs(resolve(path), exist_ok=True)
        yield resolve(path)
        return
    with tempfile.TemporaryDirectory(prefix="jaxlm-out-") as local:
        yield local
        upload_tree(local, path)


def local_file(path: str) -> str:
    """A local path with `path`'s bytes: `path` itself when local, else a fresh copy under
    CACHE. (Fetched on every call: an object rewritten with the same size within the same second
    looks unchanged to every check epath offers, and a stale model is worse than a download.)"""
    if not is_remote(path):
        return resolve(path)
    local = cache_path(path)
    write_bytes(local, read_bytes(path))
    return local


def local_tree(path: str) -> str:
    """`local_file` for every file under a folder; the local folder."""
    if not is_remote(path):
        return resolve(path)
    folders = [_p(path)]
    while folders:  # (epath refuses rglob on gs://: it could cost thousands of requests)
        for p in folders.pop().iterdir():
            if p.is_dir():
                folders.append(p)
            else:
                local_file(str(p))
    return cache_path(path)


class Appender:
    """Appends text to a file that may already exist (metrics.jsonl)."""

    def __init__(self, path: str, every: float = 5.0):
        self.path, self.every = resolve(path), every
        self.remote = is_remote(path)
        if not self.remote:
            self._file = open(self.path, "a")
            return
        self._text = read_text(self.path) if exists(self.path) else ""
        self._written = len(self._text)
        self._last = 0.0

    def write(self, text: str) -> None:
        if not self.remote:
            self._file.write(text)
            self._file.flush()
            return
        self._text += text
        if time.monotonic() - self._last >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.remote:
            self._file.flush()
        elif len(self._text) != self._written:
            write_text(self.path, self._text)
            self._written, self._last = len(self._text), time.monotonic()

    def close(self) -> None:
        self.flush()
        if not self.remote:
            self._file.close()
