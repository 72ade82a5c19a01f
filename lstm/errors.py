"""One exception type for mistakes a user can make, and the CLI wrapper that prints it.

Anything a user can cause (missing data, unknown config, impossible hyperparameter, a
checkpoint from another vocabulary, a diverging loss) is raised as :class:`UserError` with a
one-line message naming the problem and the fix. Job entry points run under :func:`run_cli`,
which prints that line without a traceback and exits with status 2. Bugs keep their traceback.
"""

from __future__ import annotations

import atexit
import gc
import sys
from typing import Callable, NoReturn, Optional, Sequence

# What a command closes before it prints its last line (an error, or "interrupted"): the Ray
# connection it made (lstm.cluster.ensure_ray registers its shutdown), whose forwarded log lines
# from Ray's actors would otherwise still arrive after that line.
BEFORE_LAST_LINE: list[Callable[[], None]] = []


class UserError(Exception):
    """A problem the user can fix; its message is one line saying what and how."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def find_user_error(exc: BaseException) -> Optional[UserError]:
    """The UserError behind ``exc`` (itself, chained, or in Ray Train's worker or controller error), or None."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        for attr in ("worker_failures",):
            failures = getattr(e, attr, None)
            if isinstance(failures, dict):
                stack.extend(failures.values())
        for attr in ("controller_failure", "cause", "__cause__", "__context__"):
            inner = getattr(e, attr, None)
            if isinstance(inner, BaseException):
                stack.append(inner)
        # Ray wraps task errors as RayTaskError(cls) which subclasses the cause's class.
        as_instanceof = getattr(e, "as_instanceof_cause", None)
        if callable(as_instanceof):
            try:
                stack.append(as_instanceof())
            except Exception:  # pragma: no cover - defensive
                pass
    return None


def run_cli(main: Callable[[Optional[Sequence[str]]], int | None], argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Run ``main(argv)``, a UserError printed as ``error: <message>`` and exit 2; gc frozen at exit."""
    atexit.unregister(gc.freeze)  # registered once, however many commands a process runs
    atexit.register(gc.freeze)
    try:
        code = main(argv)
    except KeyboardInterrupt:
        last_line("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - we re-raise anything that is not the user's
        user_error = find_user_error(exc)
        if user_error is None:
            raise
        last_line(f"error: {user_error}", 2)
    sys.exit(code or 0)


def last_line(line: str, status: int) -> NoReturn:
    """Close what :data:`BEFORE_LAST_LINE` holds, print ``line`` to stderr, exit with ``status``."""
    while BEFORE_LAST_LINE:
        try:
            BEFORE_LAST_LINE.pop()()
        except Exception:  # noqa: BLE001 - the line matters more than a clean close
            pass
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    sys.exit(status)
