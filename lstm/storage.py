"""Where the project writes: run and search folders, local or remote (``s3://``), naming them and
every read and write in them, and the atomic local writes beneath them.

A folder's reads and writes go through :mod:`pyarrow.fs`, as Ray's ``storage_path`` does, query options
included (:func:`display` prints them, so a printed folder can be passed back). A URI carrying
credentials is refused; S3 errors of a known cause are one line; a write is whole or absent.
The default root is absolute, so a job under ``ray job submit`` writes where its user finds it.
An atomic local write goes to a temporary file beside its target, is fsynced and renamed over
it, so a reader sees the old file or the new one.
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
from typing import Any, Callable, Iterator, Optional
from urllib.parse import parse_qsl, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from lstm.errors import UserError

DEFAULT_ROOT = "~/lstm-ray/runs"
STORAGE_ENV = "LSTM_RAY_STORAGE"


# --------------------------------------------------------------------------- atomic local writes


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Call ``write(fileobj)`` on a binary temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def jsonable(obj: Any) -> Any:
    """``json.dumps`` default for numpy/torch scalars and arrays, and paths."""
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --------------------------------------------------------------------------- run and search folders


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
    """``storage_path``, else ``$LSTM_RAY_STORAGE``, else ``~/lstm-ray/runs``; a local root made absolute."""
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
    """The folder of a run or search: the root and the name, by default ``<default_prefix>-YYYYmmdd-HHMMSS``."""
    name = check_name(name) if name else f"{default_prefix}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    return Location(resolve_root(storage_path), name)


CREDENTIAL_OPTIONS = ("access_key", "secret_key", "session_token")
MASK = "***"


def display(location: str) -> str:
    """A location as a user passes it back: the URI with its query, any credentials in it masked."""
    if not is_remote(location) or not _credentials_in(location):
        return location
    parts = urlsplit(location)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{MASK}@{host}" if "@" in parts.netloc else host
    query = "&".join(
        f"{k}={MASK if k in CREDENTIAL_OPTIONS else v}" for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    return parts._replace(netloc=netloc, query=query).geturl()


def _credentials_in(location: str) -> bool:
    """Whether a URI carries credentials: a user (not GCS's ``anonymous``) or a credential option."""
    try:
        parts = urlsplit(location)
    except ValueError:  # not a URI; pyarrow refuses it too
        return False
    user = parts.netloc.rpartition("@")[0]
    options = {k for k, _ in parse_qsl(parts.query, keep_blank_values=True)}
    return bool(user and user != "anonymous") or bool(options & set(CREDENTIAL_OPTIONS))


# --------------------------------------------------------------------------- filesystem


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``location`` and its path; credentials in a URI are refused (it is printed)."""
    remote = is_remote(location)
    if remote and _credentials_in(location):
        raise UserError(
            f"{display(location)}: credentials in a storage URI are refused (they would be printed and saved "
            "with the folder); remove them and set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) instead"
        )
    try:
        with _named_errors(location):  # from_uri asks S3 for the bucket's region when no endpoint is set
            return pafs.FileSystem.from_uri(location if remote else os.path.abspath(location))
    except (pa.ArrowInvalid, ValueError, OSError) as e:
        raise UserError(
            f"storage path {display(location)} is not usable ({_reason(e)}); pass --storage-path "
            "with a local folder or a URI such as s3://bucket/prefix"
        ) from None


def _reason(error: BaseException) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


# pyarrow reports an S3 failure as an OSError whose message has "AWS Error <CODE> during <Op>".
AWS_ERROR = re.compile(r"AWS Error (\w+)(?: \(HTTP status (\d+)\))? during (\w+)")
CREDENTIALS_UNKNOWN = {
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "INVALID_CLIENT_TOKEN_ID",
    "UNRECOGNIZED_CLIENT",
    "EXPIRED_TOKEN",
    "MISSING_AUTHENTICATION_TOKEN",
}
CREDENTIALS_FIX = (
    "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to keys that may read, write and delete there; "
    "a job under `ray job submit` gets them as docs/cluster.md says"
)


@contextlib.contextmanager
def _named_errors(location: str, fallback: Optional[str] = None) -> Iterator[None]:
    """Turn an error of a known cause into a one-line UserError; others become ``fallback``, or propagate."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - named, or re-raised as it is
        cause = _cause(location, e) if isinstance(e, OSError) else None
        if cause:
            raise UserError(cause) from None
        if fallback is None:
            raise
        raise UserError(fallback.format(reason=_reason(e))) from None


def _cause(location: str, error: OSError) -> Optional[str]:
    """The one-line message for an S3 error with a known cause, else None."""
    text = " ".join(str(error).split())
    found = AWS_ERROR.search(text)
    if not found:
        return None
    code, status, operation = found.groups()
    what = f"{code}{f' {status}' if status else ''} during {operation}"
    where = display(location)
    if code in CREDENTIALS_UNKNOWN:
        return f"{where}: the S3 server does not accept the credentials ({what}); {CREDENTIALS_FIX}"
    if code == "ACCESS_DENIED" or status == "403":
        if not _credentials_configured():
            return (
                f"{where}: access denied ({what}) and no S3 credentials are set (AWS_ACCESS_KEY_ID, AWS_PROFILE, "
                f"~/.aws/credentials); {CREDENTIALS_FIX}, or give the node an instance profile with access to it"
            )
        return (
            f"{where}: access denied ({what}): wrong credentials, or keys without access to this bucket or "
            f"prefix; {CREDENTIALS_FIX}"
        )
    if code == "NO_SUCH_BUCKET" or (code == "RESOURCE_NOT_FOUND" and operation == "HeadBucket"):
        bucket = urlsplit(location).netloc.rpartition("@")[2]
        return f"{where}: the bucket {bucket!r} does not exist ({what}); create it or correct the bucket name"
    if code == "NETWORK_CONNECTION":
        detail = text.partition("Details: ")[2] or text[found.end() :].strip(" :")
        return (
            f"{where}: cannot reach the S3 endpoint ({what}: {detail[:120]}); check endpoint_override in the "
            "URI or $AWS_ENDPOINT_URL, and that the server is up"
        )
    return None


def _credentials_configured() -> bool:
    """Whether S3 credentials are set in the environment or the shared files (not an instance profile)."""
    env = os.environ
    names = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    if any(env.get(name) for name in (*names, "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")):
        return True
    files = (env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), env.get("AWS_CONFIG_FILE", "~/.aws/config"))
    return any(os.path.isfile(os.path.expanduser(f)) for f in files)


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    with _named_errors(location):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_dir(location: str) -> list[str]:
    """Names of the entries of the folder ``location`` ([] if it does not exist)."""
    fs, path = filesystem(location)
    with _named_errors(location):
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path)))


def read_bytes(location: str) -> bytes:
    """The bytes of a file; FileNotFoundError if it does not exist."""
    fs, path = filesystem(location)
    with _named_errors(location):
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
    with _named_errors(location):
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
    """A local folder with the contents of ``location``: itself if local, else a temporary copy."""
    if not is_remote(location):
        yield Path(location)
        return
    fs, path = filesystem(location)
    tmp = Path(tempfile.mkdtemp(prefix="lstm-ray-"))
    try:
        with _named_errors(location):
            pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staging(location: str) -> Iterator[Path]:
    """A local folder whose files end up in ``location``: itself if local, else one uploaded on exit."""
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


PROBE_PREFIX = ".lstm-ray-write-test-"


def check_writable(root: str) -> None:
    """Write, read back and delete a small file in ``root`` before anything is trained; a
    one-line UserError naming the cause if any of that fails. On S3 pyarrow's delete leaves a
    zero-byte folder object, so a folder the probe brought into being is removed again."""
    fs, folder = filesystem(root)
    path = f"{folder.rstrip('/')}/{PROBE_PREFIX}{uuid.uuid4().hex[:8]}"
    remote = is_remote(root)
    fallback = (
        f"cannot write to storage path {display(root)} ({{reason}}); pass --storage-path with a folder you can "
        "write to, or an s3:// URI with credentials that allow writing"
    )
    with _named_errors(root, fallback):
        made = _missing_folder(fs, folder) if remote else None
        try:
            if not remote:
                fs.create_dir(folder, recursive=True)
            with fs.open_output_stream(path) as f:
                f.write(b"ok")
            with fs.open_input_stream(path) as f:
                if f.readall() != b"ok":
                    raise OSError("a file written there read back different")
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                _remove_probe(fs, path, made)
            raise
        _remove_probe(fs, path, made)


def _missing_folder(fs: pafs.FileSystem, folder: str) -> Optional[str]:
    """The outermost missing folder of ``folder`` (``bucket/a/b``), the bucket aside; None if it exists."""
    missing = None
    while "/" in folder and fs.get_file_info(folder).type == pafs.FileType.NotFound:
        missing, folder = folder, folder.rpartition("/")[0]
    return missing


def _remove_probe(fs: pafs.FileSystem, path: str, made: Optional[str]) -> None:
    """Delete the probe, then the folder ``made`` for it if it holds only pyarrow's empty folder objects."""
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)
    if made and all(
        info.type == pafs.FileType.Directory for info in fs.get_file_info(pafs.FileSelector(made, recursive=True))
    ):
        fs.delete_dir(made)
