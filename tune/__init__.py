"""Ray Tune hyperparameter search over the lstm tasks (``python jobs/tune_ptb.py``).

Each trial trains exactly what ``jobs/<task>.py`` trains (the same plan, :mod:`lstm.plan`, and
loop, :mod:`lstm.loop`): a one-worker trial in Tune's own trial process, a trial of more
workers as a Ray Train run whose reports reach Tune through :mod:`tune.bridge`.

* :mod:`tune.space` -- the search space and its ``--space NAME=SPEC`` syntax
* :mod:`tune.schedulers` -- ASHA (default) and PopulationBasedTraining on the task's metric
* :mod:`tune.bridge` -- how a Train run's reports and checkpoints reach its Tune trial (2+ workers)
* :mod:`tune.runner` -- the trial function, resource accounting, the Tuner, ``--resume``
* :mod:`tune.report` -- results table, ``best_config.json`` and plots of a finished search
* :mod:`tune.cli` -- the command line of ``jobs/tune_ptb.py``
* :mod:`tune.api` -- :func:`search` for notebooks and scripts (docs/api.md)
"""

from typing import Any

__all__ = ["search", "SearchResult"]


def __getattr__(name: str) -> Any:
    """``tune.search`` and ``tune.SearchResult``, imported on first use (they import Ray Tune)."""
    if name in __all__:
        from tune import api

        return getattr(api, name)
    raise AttributeError(f"module 'tune' has no attribute {name!r}")
