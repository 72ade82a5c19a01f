"""Ray Tune searches over the lstm tasks (``python jobs/search.py``, :func:`search`).

Each trial trains what ``jobs/<task>.py`` trains, with the same plan and loop: a one-worker
trial in Tune's own trial process, a trial of more workers as a Ray Train run whose reports
reach Tune through :mod:`tune.bridge`. docs/design.md maps the modules.
"""

from typing import Any

__all__ = ["search", "SearchResult"]


def __getattr__(name: str) -> Any:
    """``tune.search`` and ``tune.SearchResult``, imported on first use (they import Ray Tune)."""
    if name in __all__:
        from tune import api

        return getattr(api, name)
    raise AttributeError(f"module 'tune' has no attribute {name!r}")
