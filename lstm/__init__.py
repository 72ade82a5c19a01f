"""lstm-ray: LSTM sequence models trained as distributed jobs on Ray.

docs/design.md maps the modules: one loop (:mod:`lstm.loop`) trains every task
(:mod:`lstm.tasks`) through the contract in :mod:`lstm.task`.
"""

import time

__version__ = "0.2.0"
IMPORTED_AT = time.time()  # when a job's process first imported the package: lstm.timings' "imports" start here
