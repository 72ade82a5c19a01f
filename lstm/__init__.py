"""lstm-ray: LSTM sequence models trained as distributed jobs on Ray.

The Python API (docs/api.md): :func:`train` a task, :func:`load` a trained run and use it
(``tune.search`` is the search counterpart). docs/design.md maps the modules: one loop
(:mod:`lstm.loop`) trains every task (:mod:`lstm.tasks`) through the contract in :mod:`lstm.task`.
"""

import time
from typing import Any

IMPORTED_AT = time.time()  # when a job's process first imported the package: lstm.timings' "imports" start here

from lstm.errors import UserError  # noqa: E402

__version__ = "0.2.0"
__all__ = ["train", "load", "Run", "Model", "UserError"]


def __getattr__(name: str) -> Any:
    """The API (:mod:`lstm.api`), imported on first use: a job imports this package before torch."""
    if name in __all__:
        from lstm import api

        return getattr(api, name)
    raise AttributeError(f"module 'lstm' has no attribute {name!r}")
