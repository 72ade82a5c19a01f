"""Training speed of two PTB presets through the job's own step, interleaved in one process.

    .venv/bin/python bench/ptb_reg_speed.py [--configs small,small-reg] [--threads 2] [--steps 5] [--repeats 10]

Each config trains its own model (``PTBTask.build_model``/``build_optimizer``/``train_step``
under ``lstm.step.Stepper``: DDP aside, what a worker runs) on the first PTB batches. They run
in alternating blocks of ``--steps`` steps (ABBA order), ``--repeats`` times after a warm-up, so
the drift of a shared machine hits both alike; the figures are words/sec medians over blocks
and the ratio is the median of the per-pair ratios. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from lstm import config as cfg  # noqa: E402
from lstm.data import ptb  # noqa: E402
from lstm.step import DivergenceGuard, StepModule, Stepper  # noqa: E402
from lstm.tasks.ptb import PTBTask  # noqa: E402
from lstm.tasks.ptb_config import PRESETS, PTBConfig  # noqa: E402


class Runner:
    """One config's model and an endless stream of its training batches."""

    def __init__(self, name: str, corpus: ptb.Corpus):
        config = cfg.build(PTBConfig, {**PRESETS[name], "train_fraction": 0.1})
        self.task = PTBTask(config)
        self.task.setup(corpus)
        torch.manual_seed(0)
        model = self.task.build_model()
        self.stepper = Stepper(
            StepModule(self.task, model),
            self.task.build_optimizer(model),
            list(model.parameters()),
            max_grad_norm=self.task.max_grad_norm(),
            guard=DivergenceGuard(self.task.loss_limit(), torch.device("cpu")),
        )
        self.stepper.set_lr(self.task.learning_rate(0))
        model.train()
        self.batches, self.state, self.index = iter(()), None, 0

    def words_per_sec(self, steps: int) -> float:
        words, start = 0, time.perf_counter()
        for _ in range(steps):
            batch = next(self.batches, None)
            if batch is None:
                self.batches, self.state = iter(self.task.train_batches(0)), None
                batch = next(self.batches)
            out = self.stepper.step(batch, self.state, self.index, 0)
            self.state, self.index, words = out.state, self.index + 1, words + out.samples
        return words / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="small,small-reg", help="two presets, A,B")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "ptb"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    corpus = ptb.load_corpus(args.data_dir)
    names = args.configs.split(",")
    runners = [Runner(name, corpus) for name in names]
    for r in runners:
        r.words_per_sec(args.steps)  # warm-up
    speeds: list[list[float]] = [[], []]
    for i in range(args.repeats):
        order = (0, 1, 1, 0) if i % 2 == 0 else (1, 0, 0, 1)
        for k in order:
            speeds[k].append(runners[k].words_per_sec(args.steps))
            print(f"repeat {i + 1}: {names[k]} {speeds[k][-1]:,.0f} words/sec", file=sys.stderr)
    ratios = [b / a for a, b in zip(speeds[0], speeds[1], strict=True)]
    print(
        json.dumps(
            {
                "configs": names,
                "threads": args.threads,
                "words_per_sec": {n: round(statistics.median(s)) for n, s in zip(names, speeds, strict=True)},
                "ratio_b_over_a": round(statistics.median(ratios), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
