"""The peer of ``jobs/search.py`` in bench/search_overhead.py: what a Ray Tune user writes by
hand for the same search. A function trainable runs a plain PyTorch loop of the tutorial's
model (embedding, 2-layer LSTM, softmax; SGD, clipping, truncated BPTT with the state carried),
reports valid perplexity and a checkpoint every epoch, and evaluates test after the last one.
ASHA (grace 1, reduction 2), ``reuse_actors=True``, one CPU per trial. It imports nothing of
this project, so it is the yardstick, not a second copy of the project's code.

    python bench/peer_tune_ptb.py --data-dir ../shared/data/ptb --storage-path /tmp/peer --name p1

Prints one JSON line: wall time, trials, and each trial's train and eval seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import numpy as np
import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from torch import nn

SMALL = dict(init_scale=0.1, lr=1.0, clip=5.0, layers=2, steps=20, max_epoch=4, batch=20)


def read_ids(path: str, vocab: dict[str, int]) -> np.ndarray:
    with open(path) as f:
        words = f.read().replace("\n", " <eos> ").split()
    return np.array([vocab[w] for w in words], dtype=np.int64)


def load(data_dir: str) -> dict[str, np.ndarray]:
    with open(os.path.join(data_dir, "ptb.train.txt")) as f:
        words = f.read().replace("\n", " <eos> ").split()
    counts: dict[str, int] = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    vocab = {w: i for i, (w, _) in enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))}
    return {s: read_ids(os.path.join(data_dir, f"ptb.{s}.txt"), vocab) for s in ("train", "valid", "test")}


class LM(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, keep_prob: float):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.drop = nn.Dropout(1 - keep_prob)
        self.lstm = nn.LSTM(hidden, hidden, layers, dropout=1 - keep_prob, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x, state):
        h, state = self.lstm(self.drop(self.embed(x)), state)
        return self.out(self.drop(h)), state


def rows(ids: np.ndarray, batch: int) -> torch.Tensor:
    n = len(ids) // batch
    return torch.from_numpy(ids[: n * batch].reshape(batch, n))


def run_epoch(model, data: torch.Tensor, steps: int, opt=None) -> float:
    loss_sum, words, state = 0.0, 0, None
    for i in range(0, (data.shape[1] - 1) // steps * steps, steps):
        x, y = data[:, i : i + steps], data[:, i + 1 : i + 1 + steps]
        logits, state = model(x, state)
        state = tuple(s.detach() for s in state)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        if opt is not None:
            opt.zero_grad()
            (loss / x.shape[0]).backward()
            nn.utils.clip_grad_norm_(model.parameters(), SMALL["clip"])
            opt.step()
        loss_sum, words = loss_sum + loss.item(), words + y.numel()
    return math.exp(loss_sum / words)


def trainable(config: dict, data=None, epochs: int = 2, fraction: float = 0.02) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train = rows(data["train"][: int(len(data["train"]) * fraction)], SMALL["batch"])
    valid, test = rows(data["valid"], SMALL["batch"]), rows(data["test"], SMALL["batch"])
    model = LM(10000, config["hidden_size"], SMALL["layers"], config["keep_prob"])
    for p in model.parameters():
        nn.init.uniform_(p, -SMALL["init_scale"], SMALL["init_scale"])
    opt = torch.optim.SGD(model.parameters(), lr=SMALL["lr"])
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = SMALL["lr"] * config["lr_decay"] ** max(epoch + 1 - SMALL["max_epoch"], 0)
        start = time.perf_counter()
        model.train()
        train_ppl = run_epoch(model, train, SMALL["steps"], opt)
        train_s, start = time.perf_counter() - start, time.perf_counter()
        model.eval()
        with torch.no_grad():
            metrics = {"epoch": epoch + 1, "train_ppl": train_ppl, "valid_ppl": run_epoch(model, valid, SMALL["steps"])}
            if epoch == epochs - 1:
                metrics["test_ppl"] = run_epoch(model, test, SMALL["steps"])
        metrics.update(train_s=train_s, eval_s=time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, os.path.join(tmp, "model.pt"))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--storage-path", required=True)
    p.add_argument("--name", default="peer")
    p.add_argument("--num-samples", type=int, default=6)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-fraction", type=float, default=0.02)
    args = p.parse_args()
    start = time.perf_counter()
    ray.init(include_dashboard=False, logging_level="WARNING")
    data = load(args.data_dir)
    tuner = tune.Tuner(
        tune.with_resources(
            tune.with_parameters(trainable, data=data, epochs=args.epochs, fraction=args.train_fraction), {"cpu": 1}
        ),
        # The project's default space for ptb, in its order, drawn by the same seeded
        # generator: both searches train the same six configs.
        param_space={
            "keep_prob": tune.uniform(0.3, 1.0),
            "hidden_size": tune.choice([200, 400]),
            "lr_decay": tune.uniform(0.5, 1.0),
        },
        tune_config=tune.TuneConfig(
            metric="valid_ppl",
            mode="min",
            num_samples=args.num_samples,
            search_alg=BasicVariantGenerator(random_state=0),
            scheduler=ASHAScheduler(time_attr="epoch", max_t=args.epochs, grace_period=1, reduction_factor=2),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(name=args.name, storage_path=args.storage_path, verbose=0),
    )
    results = tuner.fit()
    trials = [
        {
            "epochs": len(r.metrics_dataframe),
            "train_s": float(r.metrics_dataframe["train_s"].sum()),
            "eval_s": float(r.metrics_dataframe["eval_s"].sum()),
            "time_total_s": float(r.metrics["time_total_s"]),
        }
        for r in results
    ]
    ray.shutdown()
    print(json.dumps({"wall_s": time.perf_counter() - start, "trials": trials}))


if __name__ == "__main__":
    main()
