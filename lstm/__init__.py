"""lstm-ray: LSTM sequence models trained as distributed jobs on Ray.

The library is organised so that what is common to every task lives once:

- :mod:`lstm.config`   -- frozen dataclass configs, presets, command-line overrides
- :mod:`lstm.task`     -- the plug-in interface a task implements (data, model, loss, metrics)
- :mod:`lstm.loop`     -- the one Ray Train worker loop (DDP, checkpoints, metric reduction)
- :mod:`lstm.trainer`  -- ``fit()``: the only place that touches Ray Train's driver API
- :mod:`lstm.tasks`    -- rectangle/shape, char and PTB tasks
"""

__version__ = "0.1.0"
