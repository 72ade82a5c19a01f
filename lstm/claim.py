"""One writer per run or search folder: a claim file in ``<folder>/.writers/`` (host, pid and
its start time, command); a second writer refuses with one line while the first runs.

A writer writes its claim, then lists the claims, and holds the folder only if its claim is
the only one (two that start at once both refuse). That needs only read-after-write
consistency, which local disks and S3 both give, so both share this code. A claim is deleted
when its holder ends; one left by a killed process is removed by the next writer on the same
host, and from another host the refusal names the file to delete.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import socket
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from lstm import storage
from lstm.errors import UserError

CLAIMS_DIR = ".writers"


@dataclass(frozen=True)
class Claim:
    """A held claim: the folder and this writer's claim file in it."""

    folder: str
    location: str


def holder() -> dict[str, Any]:
    """Who this process is, as a claim records it."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_started": process_start(os.getpid()),
        "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:300],
    }


def process_start(pid: int) -> Optional[str]:
    """The start time of ``pid`` in ticks since boot, which tells it from a later one; None without /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def is_gone(claimed: dict[str, Any]) -> bool:
    """Whether the holder of a claim made on this host no longer runs (False for another host's)."""
    if claimed.get("host") != socket.gethostname():
        return False
    pid = int(claimed.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    started = claimed.get("process_started")
    return started is not None and process_start(pid) not in (None, started)


def claims(folder: str) -> dict[str, dict[str, Any]]:
    """The claims in ``folder``: {claim file: its content} (an unreadable one counts as held)."""
    found: dict[str, dict[str, Any]] = {}
    claims_dir = storage.join(folder, CLAIMS_DIR)
    for name in storage.list_dir(claims_dir):
        if name.startswith("."):  # a local claim still being written (lstm.storage.atomic_write)
            continue
        location = storage.join(claims_dir, name)
        try:
            found[location] = storage.read_json(location)
        except (OSError, ValueError, UserError):
            found[location] = {}
    return found


def remove_stale(folder: str, what: str) -> None:
    """Delete the claims in ``folder`` whose holder, on this host, no longer runs."""
    for location, claimed in claims(folder).items():
        if claimed and is_gone(claimed):
            storage.delete(location)
            print(
                f"[{what}] removed the claim of process {claimed.get('pid')} (started {claimed.get('since')}), "
                "which no longer runs",
                flush=True,
            )


def refusal(folder: str, what: str, other: str, claimed: dict[str, Any]) -> UserError:
    who = (
        f"process {claimed.get('pid')} on {claimed.get('host')} since {claimed.get('since')}"
        if claimed
        else "another writer"
    )
    return UserError(
        f"the {what} at {storage.display(folder)} is being written by {who}; wait for it to end, or choose "
        f"another --name (if that job is no longer running, delete {storage.display(other)})"
    )


def claim(folder: str, what: str = "run") -> Claim:
    """Claim ``folder`` for this process, or raise the one-line refusal."""
    remove_stale(folder, what)
    mine = storage.join(folder, CLAIMS_DIR, f"{uuid.uuid4().hex}.json")
    storage.write_json(mine, holder())
    others = {location: c for location, c in claims(folder).items() if location != mine}
    if others:
        storage.delete(mine)
        other, claimed = next(iter(others.items()))
        raise refusal(folder, what, other, claimed)
    return Claim(folder, mine)


def release(held_claim: Claim) -> None:
    """Delete this writer's claim (and the claims folder once it is empty)."""
    with contextlib.suppress(OSError, UserError):
        storage.delete(held_claim.location)
        claims_dir = storage.join(held_claim.folder, CLAIMS_DIR)
        if not storage.list_dir(claims_dir):
            storage.delete_dir(claims_dir)


@contextlib.contextmanager
def held(folder: str, what: str = "run") -> Iterator[Claim]:
    """Hold ``folder``'s claim for the body's duration."""
    held_claim = claim(folder, what)
    try:
        yield held_claim
    finally:
        release(held_claim)
