"""Ray Tune hyperparameter search over the lstm tasks (``python jobs/tune_ptb.py``).

Each trial runs exactly what ``jobs/<task>.py`` runs: :func:`lstm.trainer.make_trainer` builds
the TorchTrainer, whose reports reach Tune through a Train callback.

* :mod:`tune.space` -- the search space and its ``--space NAME=SPEC`` syntax
* :mod:`tune.schedulers` -- ASHA (default) and PopulationBasedTraining on the task's metric
* :mod:`tune.bridge` -- how a Train run's reports and checkpoints reach its Tune trial
* :mod:`tune.runner` -- the trial function, resource accounting, the Tuner, ``--resume``
* :mod:`tune.report` -- results table, ``best_config.json`` and plots of a finished search
* :mod:`tune.cli` -- the command line of ``jobs/tune_ptb.py``
"""
