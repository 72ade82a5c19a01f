"""Training speed of the PTB job's step against a plain PyTorch loop, side by side in one process.

    .venv/bin/python bench/ptb_speed.py [--config small] [--threads 2] [--steps 5] [--repeats 30]
    python bench/ptb_speed.py --device cuda --config medium [--precision bf16]   # on a GPU

Both train the same model (the small config by default: 2 x 200 LSTM, vocab 10,000, batch 20,
20 steps) on the same PTB batches, with the same thread count:

* **reference** -- the plain loop: ``nn.Embedding -> nn.LSTM -> nn.Linear``,
  ``nn.CrossEntropyLoss`` (times num_steps: the tutorial's loss scale), ``zero_grad``,
  ``backward``, ``clip_grad_norm_``, ``SGD.step``, the hidden state detached between batches;
* **job** -- the job's own code: ``PTBTask.train_step`` on its ``WordLM`` and optimizer, and
  the per-step body of :func:`lstm.loop.run_training` (zero_grad, backward, clip, step,
  summing the metrics).

They run in alternating blocks of ``--steps`` steps (ABBA order), ``--repeats`` times, after a
warm-up; the figures are medians over blocks and the ratio is the median of the per-pair
ratios, which cancels most of the drift of a shared machine. Evaluation speed is the job's
evaluation (``lstm.tasks.ptb.evaluate_rows``, the default batch) on the validation split.
Prints one JSON line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lstm import config as cfg  # noqa: E402
from lstm.data import ptb  # noqa: E402
from lstm.loop import _autocast as autocast  # noqa: E402
from lstm.task import WorkerInfo  # noqa: E402
from lstm.tasks.ptb import PRESETS, PTBConfig, PTBTask, evaluate_rows  # noqa: E402


class PlainLM(nn.Module):
    """The reference model, written the obvious way."""

    def __init__(self, vocab: int, hidden: int, layers: int, init_scale: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)
        for p in self.parameters():
            nn.init.uniform_(p, -init_scale, init_scale)

    def forward(self, x, state=None):
        out, state = self.lstm(self.embedding(x), state)
        return self.decoder(out), state


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a block's time is the work's, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_trainer(config: PTBConfig, batches: list, device: torch.device, precision: str) -> Callable[[int], float]:
    """The plain loop. (Written as pytorch/examples' word_language_model writes it --
    time-major, a hand-written SGD update -- it measured 5-10% slower still here, so this,
    the faster of the two, is the reference.)"""
    torch.manual_seed(config.seed)
    model = PlainLM(config.vocab_size, config.hidden_size, config.num_layers, config.init_scale).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    criterion = nn.CrossEntropyLoss()
    position = {"i": 0, "state": None}

    def run(steps: int) -> float:
        start = time.perf_counter()
        state = position["state"]
        for _ in range(steps):
            x, y = batches[position["i"] % len(batches)]
            position["i"] += 1
            if state is not None:
                state = tuple(s.detach() for s in state)
            with autocast(precision, device):
                logits, state = model(x, state)
                # the tutorial's loss scale: summed over time, averaged over the batch
                loss = criterion(logits.reshape(-1, config.vocab_size), y.reshape(-1)) * config.num_steps
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            if device.type == "cpu":
                float(loss.detach())
        position["state"] = state
        sync(device)
        return steps * config.batch_size * config.num_steps / (time.perf_counter() - start)

    return run


def job_trainer(
    task: PTBTask, config: PTBConfig, batches: list, device: torch.device, precision: str
) -> tuple[Callable[[int], float], nn.Module]:
    torch.manual_seed(config.seed)
    model = task.build_model(config, None).to(device)
    optimizer = task.build_optimizer(config, model)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = task.max_grad_norm(config)
    worker = WorkerInfo(device=device)
    position: dict = {"i": 0, "state": None}
    sums: dict[str, float] = {}
    sync_free = device.type != "cpu"
    position["bad_step"] = torch.full((), -1, dtype=torch.long, device=device)

    def run(steps: int) -> float:
        start = time.perf_counter()
        state = position["state"]
        for _ in range(steps):  # the per-step body of lstm.loop.run_training
            batch = batches[position["i"] % len(batches)]
            position["i"] += 1
            with autocast(precision, device):
                out = task.train_step(model, batch, state, config, worker)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if not sync_free:
                if torch.isfinite(norm):
                    optimizer.step()
            else:
                bad = position["bad_step"]
                position["bad_step"] = torch.where((bad < 0) & ~torch.isfinite(norm), position["i"], bad)
                optimizer.step()
            for k, v in out.sums.items():
                sums[k] = sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v)
            state = out.state
        position["state"] = state
        sync(device)
        return steps * config.batch_size * config.num_steps / (time.perf_counter() - start)

    return run, model


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small", choices=sorted(PRESETS))
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "ptb"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (both loops)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=30, help="timed blocks per loop")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="autocast dtype (both loops)")
    p.add_argument("--eval-words", type=int, default=40_000, help="validation words per evaluation pass")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = cfg.resolve(PTBConfig, PRESETS, preset=args.config)
    task = PTBTask()
    corpus = ptb.load_corpus(args.data_dir)
    device = torch.device(args.device)
    rows = torch.from_numpy(ptb.batchify(corpus.train, config.batch_size)).to(device)
    n = (args.steps * (args.repeats + 1)) * 2
    batches = [(x, y) for x, y in ptb.iterate(rows, config.num_steps, n)]

    reference = reference_trainer(config, batches, device, args.precision)
    job, job_model = job_trainer(task, config, batches, device, args.precision)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    log(f"warm-up ({args.threads} threads)")
    reference(3), job(3)
    ref_wps, job_wps, ratios = [], [], []
    for r in range(args.repeats):
        if r % 2 == 0:
            a, b = reference(args.steps), job(args.steps)
        else:
            b, a = job(args.steps), reference(args.steps)
        ref_wps.append(a)
        job_wps.append(b)
        ratios.append(b / a)
        if (r + 1) % 5 == 0:
            log(f"block {r + 1}/{args.repeats}: reference {a:,.0f}  job {b:,.0f} words/sec  ratio {b / a:.2f}")

    eval_batch, eval_steps = config.eval_shape
    valid = torch.from_numpy(ptb.batchify(corpus.valid[: args.eval_words], eval_batch)).to(device)
    eval_n = (valid.shape[1] - 1) // eval_steps
    job_model.eval()
    eval_wps = []
    for _ in range(3):
        start = time.perf_counter()
        with autocast(args.precision, device):
            sums = evaluate_rows(job_model, valid, eval_steps, eval_n)
        sync(device)
        eval_wps.append(sums["words"] / (time.perf_counter() - start))
    job_median = statistics.median(job_wps)
    result = {
        "bench": "ptb_speed",
        "config": args.config,
        "threads": args.threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": args.precision,
        "steps_per_block": args.steps,
        "blocks": args.repeats,
        "reference_words_per_sec": round(statistics.median(ref_wps)),
        "job_words_per_sec": round(job_median),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_blocks": [round(x, 3) for x in ratios],
        "eval_words_per_sec": round(statistics.median(eval_wps)),
        "eval_over_train": round(statistics.median(eval_wps) / job_median, 2),
        "eval_shape": [eval_batch, eval_steps],
        "peak_rss_mib": round(peak_rss_mib(), 1),
        **(
            {"peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)} if device.type == "cuda" else {}
        ),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
