"""``jobs/ptb.py score --dynamic`` (lstm/dynamic_eval.py): with a learning rate of 0 it is the
static score, bit for bit; one step lowers the loss of the segment it was fitted to and the
decay pulls the weights back toward the trained ones; it adapts tutorial, regularized and
NT-ASGD-averaged checkpoints; bad settings are one line and exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_nt_asgd import CONFIG as ASGD_CONFIG
from test_nt_asgd import drifting_data  # noqa: F401  (a fixture)
from test_ptb_errors import train
from test_ptb_score import run_job

from lstm import dynamic_eval
from lstm.data import ptb
from lstm.dynamic_eval import DynamicSettings, adapter_for
from lstm.tasks.ptb_config import PRESETS, PTBConfig
from lstm.tasks.ptb_trained import load_trained, one_thread, score_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TUTORIAL = PTBConfig(
    **{**PRESETS["test"], "hidden_size": 16, "train_fraction": 0.005, "eval_batch_size": 20, "eval_num_steps": 35}
)


@pytest.fixture(scope="module")
def tutorial(ptb_dir, tmp_path_factory) -> Path:
    """The tutorial's model (WordLM) trained in this process for one epoch on 0.5% of PTB."""
    keep = tmp_path_factory.mktemp("dynamic") / "tutorial"
    train(TUTORIAL, ptb_dir, keep=keep)
    return keep


@pytest.fixture(scope="module")
def averaged(drifting_data, tmp_path_factory) -> Path:  # noqa: F811
    """A regularized (tied) model whose run switched NT-ASGD to averaging (tests/test_nt_asgd.py)."""
    keep = tmp_path_factory.mktemp("dynamic") / "averaged"
    train(ASGD_CONFIG, drifting_data, keep=keep)
    return keep


@pytest.fixture(scope="module")
def valid_head(ptb_dir, tmp_path_factory) -> Path:
    """The first 2,000 or so words of PTB's validation text."""
    text = tmp_path_factory.mktemp("text") / "valid-head.txt"
    text.write_text("\n".join((ptb_dir / "ptb.valid.txt").read_text().splitlines()[:90]) + "\n")
    return text


def score(capsys, checkpoint: Path, text: Path, *flags: str) -> dict:
    status, out, err = run_job(["score", "--checkpoint", str(checkpoint), "--text", str(text), *flags], capsys)
    assert status == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_learning_rate_zero_is_the_static_score(tutorial, valid_head, ptb_dir, capsys):
    """Segments as long as the run's evaluation windows (35): the same figures, bit for bit,
    through the whole machinery (training statistics, decay, steps of size 0). Segments of 20
    words (the default): the same up to the rounding of each window's float32 sum."""
    static = score(capsys, tutorial, valid_head)
    data = ["--data-dir", str(ptb_dir)]
    same = score(capsys, tutorial, valid_head, "--dynamic", "--dynamic-lr", "0", "--segment-length", "35", *data)
    assert (same["ppl"], same["loss"], same["tokens"]) == (static["ppl"], static["loss"], static["tokens"])
    assert same["dynamic"] == {
        "rule": "rms",
        "lr": 0.0,
        "decay": 0.008,
        "segment_length": 35,
        "epsilon": 2e-5,
        "stats_batch_size": 100,
        "stats_words": 100_000,
    }
    assert "dynamic" not in static
    twenties = score(capsys, tutorial, valid_head, "--dynamic", "--dynamic-rule", "sgd", "--dynamic-lr", "0")
    assert twenties["tokens"] == static["tokens"] and twenties["ppl"] == pytest.approx(static["ppl"], rel=1e-6)
    assert twenties["dynamic"] == {"rule": "sgd", "lr": 0.0, "decay": 0.008, "segment_length": 20}


@pytest.mark.parametrize("rule", ["rms", "sgd"])
def test_one_step_lowers_the_loss_of_its_segment_and_the_decay_pulls_back(tutorial, ptb_dir, rule):
    trained = load_trained(tutorial)
    model = trained.model
    words = (ptb_dir / "ptb.valid.txt").read_text().split()[:200]
    ids = torch.from_numpy(trained.vocab.encode(words, unknown="<unk>"))[None]
    with torch.no_grad():
        _, _, state = model(ids[:, :100], ids[:, 1:101])  # some context, then the segment
    inputs, targets = ids[:, 101:106], ids[:, 102:107]
    settings = DynamicSettings(rule=rule, lr=DynamicSettings().eta if rule == "rms" else 0.01)
    train_ids = dynamic_eval.training_ids(trained.vocab, TUTORIAL.train_fraction, str(ptb_dir))
    adapter = adapter_for(model, settings, train_ids if rule == "rms" else None)

    def segment_loss() -> float:
        with torch.no_grad():
            return float(model(inputs, targets, state)[1])

    before = segment_loss()
    model.zero_grad(set_to_none=True)
    loss, _, _ = model(inputs, targets, state, scale=1.0 / targets.numel())
    loss.backward()
    adapter.step()
    after = segment_loss()
    assert after < before - 0.01, (before, after)
    # with no gradient, a step only decays: every weight moves toward the trained one
    origin = [w.clone() for w in adapter.origin]
    moved = [p.detach() - w for p, w in zip(model.parameters(), origin, strict=True)]
    assert all(bool(d.any()) for d in moved)
    for p in model.parameters():
        p.grad.zero_()
    adapter.step()
    for p, w, d, decay in zip(model.parameters(), origin, moved, adapter.decay, strict=True):
        ulps = 4 * torch.finfo(w.dtype).eps * (p.detach().abs() + w.abs()) + 1e-12  # float32 rounding
        assert ((p.detach() - w) - d * (1 - decay)).abs().le(ulps).all()


def test_dynamic_evaluation_lowers_the_perplexity_and_leaves_the_model_as_it_was(tutorial, valid_head, ptb_dir):
    """The default rule and settings on 2,000 words of validation text: a lower perplexity
    than the static one (this tiny model learns the text's vocabulary), from a copy of the model."""
    from lstm.tasks.ptb_trained import score_words

    trained = load_trained(tutorial)
    weights = {k: v.clone() for k, v in trained.model.state_dict().items()}
    words = ptb.read_words(valid_head)
    static = score_words(trained, words)
    dynamic = score_words(trained, words, dynamic=DynamicSettings(data_dir=str(ptb_dir)))
    assert dynamic["ppl"] < 0.95 * static["ppl"], (static["ppl"], dynamic["ppl"])
    assert all(torch.equal(v, weights[k]) for k, v in trained.model.state_dict().items())


def test_an_nt_asgd_checkpoint_adapts_its_averaged_weights(averaged, drifting_data, capsys):  # noqa: F811
    """A tied, regularized model whose run averaged: the dynamic score starts from the averages
    (with a learning rate of 0 it is their static score, which test_nt_asgd.py shows is the
    averages'), and adapting them lowers the perplexity of the validation text."""
    text = drifting_data / "ptb.valid.txt"
    static = score(capsys, averaged, text)
    assert static["averaged_weights"] is True
    data = ["--data-dir", str(drifting_data), "--stats-batch-size", "4"]
    zero = score(capsys, averaged, text, "--dynamic", "--dynamic-lr", "0", "--segment-length", "10", *data)
    assert (zero["ppl"], zero["averaged_weights"]) == (static["ppl"], True)
    trained = load_trained(averaged)
    with one_thread():
        total, tokens = score_ids(trained.model, trained.vocab.encode(ptb.read_words(text)), 1, 10)
    assert static["loss"] == pytest.approx(total / tokens, rel=1e-12)
    adapted = score(capsys, averaged, text, "--dynamic", "--segment-length", "10", "--dynamic-lr", "1e-3", *data)
    assert adapted["ppl"] < static["ppl"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dynamic", "--dynamic-lr", "-1"], r"^error: --dynamic-lr must be a finite number >= 0 \(got -1.0\)$"),
        (["--dynamic", "--dynamic-decay", "nan"], r"^error: --dynamic-decay must be a finite number >= 0"),
        (["--dynamic", "--segment-length", "0"], r"^error: --segment-length must be >= 1 \(got 0\)$"),
        (["--dynamic", "--dynamic-epsilon", "0"], r"^error: --dynamic-epsilon must be positive"),
        (["--dynamic", "--stats-words", "-1"], r"^error: --stats-words must be >= 0"),
        (["--dynamic", "--dynamic-rule", "sgd", "--dynamic-decay", "2"], r"--dynamic-decay must be <= 1 with"),
        (["--dynamic-lr", "0.001"], r"^error: --dynamic-lr is for dynamic evaluation; add --dynamic, or drop it$"),
        (["--data-dir", "x"], r"^error: --data-dir is for dynamic evaluation; add --dynamic"),
        (
            ["--dynamic", "--dynamic-rule", "sgd", "--stats-words", "9"],
            r"^error: --stats-words has no effect with --dynamic-rule sgd; drop it, or use rms$",
        ),
        (["--dynamic", "--batch-size", "2"], r"^error: --dynamic scores with batch 1 .*; drop --batch-size 2$"),
        (
            ["--dynamic", "--dynamic-lr", "10", "--data-dir", "{ptb}"],
            r"^error: dynamic evaluation diverged after [\d,]+ words \(--dynamic-lr 10\); lower --dynamic-lr",
        ),
        (["--dynamic", "--data-dir", "{nowhere}"], r"^error: --data-dir \S+ does not exist"),
    ],
)
def test_bad_settings_are_one_line_and_exit_status_2(tutorial, valid_head, ptb_dir, tmp_path, capsys, flags, message):
    import re

    paths = {"ptb": str(ptb_dir), "nowhere": str(tmp_path / "nowhere")}
    argv = ["score", "--checkpoint", str(tutorial), "--text", str(valid_head), *(f.format(**paths) for f in flags)]
    status, out, err = run_job(argv, capsys)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and re.search(message, err.strip()), err


def test_training_text_of_another_vocabulary_is_one_line(tutorial, drifting_data):  # noqa: F811
    from lstm.errors import UserError

    trained = load_trained(tutorial)
    with pytest.raises(UserError, match=r"^the training text has 12 word\(s\) the checkpoint's vocabulary lacks"):
        dynamic_eval.training_ids(trained.vocab, 1.0, str(drifting_data))
