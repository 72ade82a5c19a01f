"""Local files: those a user names, read with one-line errors, and atomic writes.

An atomic write goes to a temporary file beside its target, is fsynced and renamed over it,
so a reader sees the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from lstm.errors import UserError


def read_text(path: str | os.PathLike, *, what: str, fix: str) -> str:
    """The UTF-8 text of a file a user named (no BOM, ``\\n`` line ends); a missing path, a
    folder, an unreadable or non-UTF-8 file is a UserError ``<what> <path> <problem>; <fix>``."""
    p = Path(path).expanduser()
    try:
        return p.read_text(encoding="utf-8-sig")
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{what} {p} does not exist; {fix}") from None
    except IsADirectoryError:
        raise UserError(f"{what} {p} is a folder, not a file; {fix}") from None
    except UnicodeDecodeError as e:
        raise UserError(
            f"{what} {p} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8, or {fix}"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read {what} {p} ({e.strerror or e}); check its permissions, or {fix}") from None


def existing_folder(path: str | os.PathLike, *, what: str, fix: str) -> Path:
    """``path`` if it is a folder; else a one-line UserError ``<what> <path> <problem>; <fix>``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} {p} does not exist; {fix}")
    if not p.is_dir():
        raise UserError(f"{what} {p} is a file, not a folder; {fix}")
    return p


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(fileobj)`` on a temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=jsonable) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def jsonable(obj: Any) -> Any:
    """``json.dumps`` default for numpy/torch scalars and arrays, and paths."""
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
