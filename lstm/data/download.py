"""Find a dataset locally or download it once into a cache, with sha256 checks.

Looked for in ``--data-dir``, then ``$LSTM_DATA_DIR``, then the cache (``$LSTM_CACHE_DIR`` or
``~/.cache/lstm-ray``), which a download fills from upstream or ``$LSTM_<NAME>_URL``. A
download is checked, and extracted, in a temporary place before it is renamed into place, so a
corrupt or interrupted one leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lstm import user_files
from lstm.errors import UserError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Dataset:
    """Files of a dataset, their sha256, and where to fetch them."""

    name: str
    files: dict[str, str]  # file name -> sha256
    url: str  # a single file, or a .tgz archive holding the files
    archive_sha256: Optional[str] = None  # for archives; None: check the extracted files only
    archive_members: dict[str, str] = field(default_factory=dict)  # file name -> path inside the archive


DATASETS: dict[str, Dataset] = {
    "ptb": Dataset(
        name="ptb",
        files={
            "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
            "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
            "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        },
        url="http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",
        archive_members={f"ptb.{s}.txt": f"./simple-examples/data/ptb.{s}.txt" for s in ("train", "valid", "test")},
    ),
    "nietzsche": Dataset(
        name="nietzsche",
        # The upstream file has CRLF line ends and a BOM; the checksum is of the normalised text.
        files={"nietzsche.txt": "dea01ca2da603db6736fd856c585d073ccf3dca68efe4a59c5e73242cdf0b028"},
        url="https://s3.amazonaws.com/text-datasets/nietzsche.txt",
    ),
    "tinyshakespeare": Dataset(
        name="tinyshakespeare",
        files={"tinyshakespeare.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"},
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LSTM_CACHE_DIR") or Path.home() / ".cache" / "lstm-ray")


def normalise_text(raw: bytes) -> bytes:
    """Drop a UTF-8 BOM and turn CRLF into LF (the Nietzsche file upstream has both)."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return raw.replace(b"\r\n", b"\n")


def _download(url: str, dest: Path, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            shutil.copyfileobj(response, out, CHUNK)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"could not download {url} ({reason}); if this machine is offline, "
            f"pass --data-dir with a folder holding the files yourself"
        ) from None


def locate(
    dataset: str | Dataset,
    data_dir: Optional[str | os.PathLike] = None,
    *,
    download: bool = True,
    timeout: float = 60.0,
) -> Path:
    """The folder holding all of ``dataset``'s files, downloading them into the cache if needed."""
    ds = DATASETS[dataset] if isinstance(dataset, str) else dataset
    mirror = os.environ.get(f"LSTM_{ds.name.upper()}_URL")  # e.g. LSTM_PTB_URL: a mirror of the same bytes
    if mirror:
        ds = dataclasses.replace(ds, url=mirror)
    explicit = data_dir or os.environ.get("LSTM_DATA_DIR")
    if explicit:
        folder = user_files.existing_folder(
            explicit,
            what="--data-dir" if data_dir else "$LSTM_DATA_DIR",
            fix=f"pass --data-dir with a folder that holds {', '.join(ds.files)}, or omit it to download {ds.url}",
        )
        # Accept either the folder itself or a parent with a <dataset> or <kind> subfolder.
        for candidate in (folder, folder / ds.name, folder / "char", folder / "ptb"):
            if all((candidate / f).is_file() for f in ds.files):
                return candidate
        missing = [f for f in ds.files if not (folder / f).is_file()]
        raise UserError(
            f"{folder} lacks {', '.join(missing)} ({ds.name}); pass --data-dir with a folder "
            f"that holds {', '.join(ds.files)}, or omit it to download {ds.url}"
        )
    target = cache_dir() / ds.name
    if all((target / f).is_file() for f in ds.files):
        return target
    if not download:
        raise UserError(f"{ds.name} is not in the cache {target}; pass --data-dir or allow the download")
    fetch(ds, target, timeout=timeout)
    return target


def fetch(ds: Dataset, target: Path, *, timeout: float = 60.0) -> None:
    """Download ``ds`` into ``target`` atomically; reject it (leaving nothing) on a bad checksum."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{ds.name}-", dir=target.parent))
    try:
        blob = staging / "download"
        print(f"downloading {ds.name} from {ds.url} ...", flush=True)
        _download(ds.url, blob, timeout)
        out = staging / "files"
        out.mkdir()
        if ds.archive_members:
            if ds.archive_sha256 and user_files.sha256_file(blob) != ds.archive_sha256:
                raise UserError(f"the download of {ds.url} is corrupt (sha256 mismatch); try again or pass --data-dir")
            _extract(blob, ds, out)
        else:
            (out / next(iter(ds.files))).write_bytes(normalise_text(blob.read_bytes()))
        for name, digest in ds.files.items():
            got = user_files.sha256_file(out / name)
            if got != digest:
                raise UserError(
                    f"the download of {ds.url} is corrupt: {name} has sha256 {got[:12]}..., "
                    f"expected {digest[:12]}...; try again or pass --data-dir with a good copy"
                )
        _move_into_place(out, target, ds)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(out: Path, target: Path, ds: Dataset) -> None:
    """Rename the checked files into ``target``, unless another process already put a complete copy there."""
    if all((target / f).is_file() for f in ds.files):
        return
    if target.exists():
        shutil.rmtree(target)
    try:
        os.replace(out, target)
    except OSError:
        if not all((target / f).is_file() for f in ds.files):
            raise


def _extract(archive: Path, ds: Dataset, out: Path) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            names = set(tar.getnames())
            for name, member in ds.archive_members.items():
                alt = member[2:] if member.startswith("./") else "./" + member
                key = member if member in names else alt
                if key not in names:
                    raise UserError(f"the archive from {ds.url} lacks {member}; try again or pass --data-dir")
                src = tar.extractfile(key)
                if src is None:
                    raise UserError(f"{member} in {ds.url} is not a regular file; pass --data-dir")
                with src, open(out / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        # a truncated or corrupted .tgz fails while reading a member, not only when opening
        raise UserError(
            f"the download of {ds.url} is not a valid archive ({e}); try again or pass --data-dir"
        ) from None
