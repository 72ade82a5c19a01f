"""How a search chooses its trials' values (``--search-alg``).

* ``random`` (default): Tune's ``BasicVariantGenerator``, seeded by ``--seed``. Every trial
  draws its values independently of the others' results; ``grid:`` entries are expanded (every
  value, times ``--num-samples``).
* ``tpe``: Optuna's Tree-structured Parzen Estimator through Ray Tune's ``OptunaSearch``. The
  first :func:`startup_trials` trials are drawn at random; each later one is drawn where the
  trials finished so far scored best (Optuna's ``TPESampler`` with its defaults, among them
  the "constant liar": a running trial counts as a bad one, so that concurrent trials spread out). A trial stopped
  early by ASHA counts with its last reported metric. Tune saves the searcher with the search's
  state, so ``--resume`` continues the same study.

Optuna is an optional extra (``pip install 'lstm-ray[optuna]'``). TPE samples every trial
itself, so it cannot expand a grid, and PBT (which replaces trials' values as they train)
keeps random sampling: both are refused in one line before anything starts.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from lstm.errors import UserError
from tune.space import SearchSpace

SEARCH_ALGS = ("random", "tpe")
INSTALL_OPTUNA = "pip install 'lstm-ray[optuna]' (or pip install 'optuna>=5')"


def check_search_alg(search_alg: str, scheduler: str, space: SearchSpace) -> None:
    """UserError for a search algorithm that cannot run with this scheduler or space, or
    whose library is missing."""
    if search_alg not in SEARCH_ALGS:
        raise UserError(f"--search-alg {search_alg!r} is not one of {', '.join(SEARCH_ALGS)}")
    if search_alg != "tpe":
        return
    if scheduler == "pbt":
        raise UserError(
            "--search-alg tpe cannot run with --scheduler pbt (PBT replaces the trials' values as they "
            "train, so TPE would learn from values the trials no longer have); use --scheduler asha, or "
            "drop --search-alg for PBT's random sampling"
        )
    grids = [p for p in space.params.values() if p.kind == "grid"]
    if grids:
        entries = " ".join(f"{p.name}=grid:{','.join(str(v) for v in p.values)}" for p in grids)
        choices = " ".join(f"{p.name}={','.join(str(v) for v in p.values)}" for p in grids)
        raise UserError(
            f"--search-alg tpe chooses every trial's values itself and cannot run every value of a grid "
            f"({entries}); write a choice ({choices}) for TPE to pick from, or drop --search-alg for the grid"
        )
    import_optuna()


def import_optuna() -> Any:
    """Optuna, its INFO lines off (the search prints a line per trial itself); UserError naming
    what to install when it cannot be imported."""
    try:
        import optuna
    except ImportError:
        raise UserError(f"--search-alg tpe needs Optuna, which is not installed; {INSTALL_OPTUNA}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def startup_trials(num_samples: int) -> int:
    """TPE's random trials before it models the results: Optuna's default of 10 would leave
    little of a small budget to TPE, so a quarter of the budget, between 2 and 10."""
    return min(10, max(2, num_samples // 4))


def make_search_alg(spec: Any, max_concurrent: int) -> Any:
    """The search algorithm of ``spec`` (a :class:`tune.spec.SearchSpec`), running at most
    ``max_concurrent`` trials at once. Tune ignores ``TuneConfig(max_concurrent_trials)`` with
    a ``BasicVariantGenerator``, so the limit is given to the algorithm itself."""
    if spec.search_alg == "random":
        return BasicVariantGenerator(random_state=spec.seed, max_concurrent=max_concurrent)
    from ray.tune.search.optuna import OptunaSearch

    optuna = import_optuna()
    sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=startup_trials(spec.num_samples))
    searcher = OptunaSearch(metric=spec.metric, mode=spec.mode, sampler=sampler)
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
