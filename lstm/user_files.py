"""Files a user names (data files, texts, config files): read with one-line errors, checksummed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

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


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
