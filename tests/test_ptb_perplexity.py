"""The job's test perplexity, checked by code that shares nothing with the project: a short run
trained by `jobs/ptb.py`, its saved weights loaded into a model of plain `torch.nn` layers, the
vocabulary and the test text read as the TensorFlow tutorial's reader reads them, and
`exp(mean F.cross_entropy)` at batch 1 with the state carried through the text."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lstm.cli import train_main

NUM_STEPS = 35  # the evaluation's steps; the state is carried across them, so only the count of words depends on it


def tutorial_words(path: Path) -> list[str]:
    """The tutorial's `_read_words`: newlines become `<eos>`, then split on whitespace."""
    return path.read_text().replace("\n", " <eos> ").split()


def tutorial_vocabulary(train: Path) -> dict[str, int]:
    """The tutorial's `_build_vocab`: words by decreasing count, ties in alphabetical order."""
    counts = collections.Counter(tutorial_words(train))
    return {word: i for i, (word, _) in enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))}


class PlainLM(nn.Module):
    """Embedding -> LSTM -> linear, named as the saved state dict names its tensors."""

    def __init__(self, vocab: int, hidden: int, layers: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers)
        self.decoder = nn.Linear(hidden, vocab)


@torch.no_grad()
def perplexity(model: PlainLM, ids: list[int]) -> float:
    """exp(mean cross entropy) of predicting ids[1:] from ids[:-1], over the words the
    tutorial's test loop covers at batch 1: ((len(ids) // 1 - 1) // NUM_STEPS) * NUM_STEPS."""
    n = (len(ids) - 1) // NUM_STEPS * NUM_STEPS
    data = torch.tensor(ids)
    out, _ = model.lstm(model.embedding(data[:n]).unsqueeze(1))  # (time, batch 1, hidden), state carried throughout
    loss = F.cross_entropy(model.decoder(out.squeeze(1)), data[1 : n + 1])
    return math.exp(float(loss))


def test_the_jobs_test_perplexity_is_what_plain_pytorch_computes(ptb_dir, tmp_path, ray_session):
    argv = ["--config", "test", "--hidden-size", "16", "--train-fraction", "0.02", "--max-max-epoch", "1"]
    argv += ["--eval-num-steps", str(NUM_STEPS), "--test-batch-size", "1"]
    assert train_main("ptb", [*argv, "--data-dir", str(ptb_dir), "--storage-path", str(tmp_path), "--name", "r"]) == 0
    run = tmp_path / "r"
    results = json.loads((run / "results.json").read_text())
    checkpoint = Path(results["checkpoint"])
    weights = torch.load(checkpoint / "model.pt", map_location="cpu", weights_only=True)
    vocab = tutorial_vocabulary(ptb_dir / "ptb.train.txt")
    model = PlainLM(len(vocab), hidden=16, layers=1)
    model.load_state_dict(weights)  # strict: the saved tensors are exactly these layers'
    model.eval()
    ids = [vocab[w] for w in tutorial_words(ptb_dir / "ptb.test.txt")]
    reference = perplexity(model, ids)
    assert abs(results["final"]["test_ppl"] / reference - 1) < 1e-3, (results["final"]["test_ppl"], reference)
