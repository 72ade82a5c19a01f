"""Where runs and searches live: a local folder or a URI (``s3://bucket/prefix``), handled here
and nowhere else.

Every read and write of a run's files goes through :mod:`pyarrow.fs`, the filesystem layer
Ray Train and Tune use for their own ``storage_path``, so a path that Ray accepts works here
too, including a URI that carries its options in the query string
(``s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http``): :func:`join` puts the
run name into the path, before the query.

Local writes go to a temporary file that is renamed into place; an S3 object appears whole
when its upload completes. Either way a reader sees the old file or the new one, never half.

Default root: ``--storage-path``, else ``$LSTM_RAY_STORAGE``, else ``~/lstm-ray/runs``. The
default is absolute and outside the working directory, so a job started with
``ray job submit --working-dir .`` (whose working directory is Ray's temporary copy of the
upload) still writes where its user will find it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs

from lstm.errors import UserError
from lstm.io import atomic_write, jsonable

DEFAULT_ROOT = "~/lstm-ray/runs"
STORAGE_ENV = "LSTM_RAY_STORAGE"


def is_remote(path: str) -> bool:
    """A URI of a remote filesystem (s3://, gs://, ...), as opposed to a local path."""
    return "://" in path and not path.startswith("file://")


def join(base: str, *parts: str) -> str:
    """``base/part/...``; a URI's query string stays at the end."""
    path, sep, query = str(base).partition("?")
    for part in parts:
        path = path.rstrip("/") + "/" + str(part).strip("/")
    return path + sep + query


def parent_and_name(location: str) -> tuple[str, str]:
    """(the folder holding ``location``, its last name), the inverse of :func:`join`."""
    path, sep, query = location.rstrip("/").partition("?")
    parent, _, name = path.rstrip("/").rpartition("/")
    return parent + sep + query, name


def resolve_root(storage_path: str = "") -> str:
    """The storage root: ``storage_path``, else ``$LSTM_RAY_STORAGE``, else ``~/lstm-ray/runs``;
    a local root is made absolute (Ray needs an absolute path or a URI)."""
    root = storage_path or os.environ.get(STORAGE_ENV) or DEFAULT_ROOT
    if is_remote(root):
        return root
    if root.startswith("file://"):
        root = root[len("file://") :]
    return os.path.abspath(os.path.expanduser(root))


@dataclass(frozen=True)
class Location:
    """A run's (or a search's) folder: ``root/name``."""

    root: str
    name: str

    @property
    def path(self) -> str:
        return join(self.root, self.name)


# A run's or search's name is one folder name inside the storage path: no "/", no "..", nothing
# hidden, nothing a shell or a URI would read otherwise.
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100 characters"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(name: str) -> str:
    """``name`` if it is a valid run or search name (:data:`NAME_RULE`), else a one-line UserError."""
    if not _NAME.fullmatch(name):
        raise UserError(
            f"--name {name!r} is not a folder name of {NAME_RULE}; choose one such as my-run-1 "
            "(the storage path is set by --storage-path)"
        )
    return name


def locate(storage_path: str, name: str, default_prefix: str) -> Location:
    """The folder of a run or search: the resolved root (see :func:`resolve_root`) and the
    name (:func:`check_name`), by default ``<default_prefix>-YYYYmmdd-HHMMSS``."""
    name = check_name(name) if name else f"{default_prefix}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    return Location(resolve_root(storage_path), name)


def display(location: str) -> str:
    """A location as a user reads it: a URI without its query options."""
    return location.partition("?")[0]


# --------------------------------------------------------------------------- filesystem


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``location`` and the path inside it."""
    try:
        return pafs.FileSystem.from_uri(location if is_remote(location) else os.path.abspath(location))
    except (pafs.ArrowInvalid, ValueError, OSError) as e:  # type: ignore[attr-defined]
        raise UserError(
            f"storage path {display(location)} is not usable ({_reason(e)}); pass --storage-path "
            "with a local folder or a URI such as s3://bucket/prefix"
        ) from None


def _reason(error: BaseException) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_dir(location: str) -> list[str]:
    """Names of the entries of the folder ``location`` ([] if it does not exist)."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path)))


def read_bytes(location: str) -> bytes:
    """The bytes of a file; FileNotFoundError if it does not exist."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(display(location))
    with fs.open_input_stream(path) as f:
        return f.readall()


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


def read_json(location: str) -> Any:
    return json.loads(read_text(location))


def write_bytes(location: str, data: bytes) -> str:
    """Write a whole file (atomically, see the module docstring); returns ``location``."""
    if not is_remote(location):
        atomic_write(location, lambda f: f.write(data))
        return location
    fs, path = filesystem(location)
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)
    return location


def write_text(location: str, text: str) -> str:
    return write_bytes(location, text.encode("utf-8"))


def write_json(location: str, obj: Any) -> str:
    return write_text(location, json.dumps(obj, indent=2, default=jsonable) + "\n")


def delete(location: str) -> None:
    """Delete a file (nothing if it is not there)."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def delete_dir(location: str) -> None:
    """Delete a folder and everything in it (nothing if it is not there)."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def upload_dir(local_dir: str | os.PathLike, location: str) -> None:
    """Copy every file under ``local_dir`` into the folder ``location``, one file at a time."""
    for file in sorted(Path(local_dir).rglob("*")):
        if file.is_file():
            write_bytes(join(location, file.relative_to(local_dir).as_posix()), file.read_bytes())


@contextlib.contextmanager
def local_dir(location: str) -> Iterator[Path]:
    """A local folder with the contents of the folder ``location``: the folder itself when it
    is local, else a temporary copy, removed on exit."""
    if not is_remote(location):
        yield Path(location)
        return
    fs, path = filesystem(location)
    tmp = Path(tempfile.mkdtemp(prefix="lstm-ray-"))
    try:
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staging(location: str) -> Iterator[Path]:
    """A local folder whose files end up in the folder ``location``: the folder itself when it
    is local, else a temporary one that is uploaded on exit."""
    if not is_remote(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        yield Path(location)
        return
    tmp = Path(tempfile.mkdtemp(prefix="lstm-ray-out-"))
    try:
        yield tmp
        upload_dir(tmp, location)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(root: str) -> None:
    """Create ``root`` if needed and write, read back and delete a small file there; a
    one-line UserError if any of that fails (before anything is trained)."""
    probe = join(root, f".lstm-ray-write-test-{uuid.uuid4().hex[:8]}")
    fs, path = filesystem(probe)
    try:
        fs.create_dir(path.rpartition("/")[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(b"ok")
        with fs.open_input_stream(path) as f:
            if f.readall() != b"ok":
                raise OSError("a file written there read back different")
        fs.delete_file(path)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any filesystem error is the same problem to the user
        raise UserError(
            f"cannot write to storage path {display(root)} ({_reason(e)}); pass --storage-path with "
            "a folder you can write to, or an s3:// URI with credentials that allow writing"
        ) from None
