"""The regularized PTB model and its config fields: with every field neutral the task trains the
tutorial's WordLM exactly as before; each regularizer changes training only when switched on;
tying shares one tensor; weight drop resamples per batch and is off in eval; locked and
embedding dropout drop what they should; AR/TAR add what they should; variable-length BPTT
draws the same windows on every rank; presets, validation and search spaces."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lstm import config as cfg
from lstm.data import ptb
from lstm.errors import UserError
from lstm.models.awd import RegularizedLM, embedding_dropout, locked_dropout
from lstm.models.word import WordLM, detach_state
from lstm.step import DivergenceGuard, StepModule, Stepper
from lstm.task import WorkerInfo
from lstm.tasks.ptb import PTBTask
from lstm.tasks.ptb_config import PRESETS, PTBConfig
from tune.space import parse_space

VOCAB = 30
TINY = dict(vocab_size=VOCAB, hidden_size=8, num_layers=2, num_steps=6, batch_size=4, max_epoch=1, max_max_epoch=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> ptb.Corpus:
    """A small corpus with structure to learn: each word mostly follows its predecessor + 1."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for split, n in (("train", 2400), ("valid", 600), ("test", 600)):
        words = np.cumsum(rng.choice([1, 2, 7], size=n, p=[0.7, 0.2, 0.1])) % (VOCAB - 1)
        lines = [" ".join(f"w{w}" for w in words[i : i + 8]) for i in range(0, n, 8)]
        (folder / f"ptb.{split}.txt").write_text("".join(f" {line} \n" for line in lines))
    return ptb.load_corpus(folder)


def task_losses(config: PTBConfig, corpus: ptb.Corpus) -> list[float]:
    """One epoch through the job's own step (task.train_step inside StepModule, Stepper):
    every step's summed loss."""
    task = PTBTask(config)
    task.setup(corpus)
    torch.manual_seed(config.seed)
    model = task.build_model()
    stepper = Stepper(
        StepModule(task, model),
        task.build_optimizer(model),
        list(model.parameters()),
        max_grad_norm=task.max_grad_norm(),
        guard=DivergenceGuard(task.loss_limit(), torch.device("cpu")),
    )
    stepper.set_lr(task.learning_rate(0))
    torch.manual_seed(1)
    model.train()
    losses, state = [], None
    for index, batch in enumerate(task.train_batches(0)):
        out = stepper.step(batch, state, index, 0)
        losses.append(float(out.sums["loss_sum"]))
        state = out.state
    return losses


def reference_losses(config: PTBConfig, corpus: ptb.Corpus) -> list[float]:
    """The tutorial's training as the task did it before the regularized fields existed:
    WordLM, loss summed over time and averaged over the batch, SGD, clipping."""
    torch.manual_seed(config.seed)
    model = WordLM(config.vocab_size, config.hidden_size, config.num_layers, config.keep_prob, config.init_scale)
    opt = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    rows = torch.from_numpy(ptb.batchify(corpus.train, config.batch_size))
    torch.manual_seed(1)
    losses, state = [], None
    for x, y in ptb.iterate(rows, config.num_steps):
        loss, loss_sum, state = model(x, y, state, 1.0 / x.shape[0])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        opt.step()
        state = detach_state(state)
        losses.append(loss_sum.item())
    return losses


def test_the_default_config_trains_the_tutorial_model_exactly_as_before(corpus):
    for keep_prob in (1.0, 0.5):
        config = PTBConfig(**TINY, keep_prob=keep_prob)
        assert type(PTBTask(config).build_model()) is WordLM
        assert task_losses(config, corpus) == reference_losses(config, corpus)
    for preset in ("small", "medium", "large", "test"):
        assert not cfg.build(PTBConfig, PRESETS[preset]).regularized, preset


def test_the_regularized_model_with_neutral_fields_computes_wordlm():
    """Same parameters in the same order, same initial weights, same losses step after step."""

    def losses(model):
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        g = torch.Generator().manual_seed(0)
        out, state = [], None
        for _ in range(4):
            x, y = torch.randint(0, 50, (4, 6), generator=g), torch.randint(0, 50, (4, 6), generator=g)
            loss, loss_sum, state = model(x, y, state, 0.25)
            opt.zero_grad()
            loss.backward()
            opt.step()
            state = detach_state(state)
            out.append(loss_sum.item())
        return out

    torch.manual_seed(3)
    word = WordLM(50, 8, 2)
    torch.manual_seed(3)
    regularized = RegularizedLM(PTBConfig(vocab_size=50, hidden_size=8, num_layers=2))
    assert [p.shape for p in word.parameters()] == [p.shape for p in regularized.parameters()]
    assert losses(word) == losses(regularized)


SWITCHED_ON = {  # field -> a value that is on; True: the model becomes RegularizedLM
    "tied": (True, True),
    "embedding_size": (6, True),
    "locked_dropout_input": (0.3, True),
    "locked_dropout_hidden": (0.3, True),
    "locked_dropout_output": (0.3, True),
    "embedding_dropout": (0.3, True),
    "weight_drop": (0.3, True),
    "ar": (2.0, True),
    "tar": (2.0, True),
    "init": ("awd", True),
    "weight_decay": (0.05, False),
    "loss_per_token": (True, False),
    "vary_num_steps": (True, False),
}
# Fields that act on the update only (a penalty added to the training loss, which the reported
# loss leaves out, weight decay, the loss's scale): the first step's loss is the base run's.
# The others act on the forward pass or the batches, from the first step on.
ACT_ON_THE_UPDATE = {"ar", "tar", "weight_decay", "loss_per_token"}


@pytest.mark.parametrize("name", sorted(SWITCHED_ON))
def test_each_regularizer_changes_training_only_when_switched_on(corpus, name):
    value, regularized_model = SWITCHED_ON[name]
    # init_scale 0.5: the tiny model's output depends on its input from the first step (at the
    # default 0.1 a dropped input moves a step's loss by about 1e-6)
    base = PTBConfig(**{**TINY, "init_scale": 0.5})
    on = cfg.build(PTBConfig, {**cfg.to_dict(base), name: value})
    assert type(PTBTask(on).build_model()) is (RegularizedLM if regularized_model else WordLM)
    base_losses, on_losses = task_losses(base, corpus), task_losses(on, corpus)
    assert task_losses(on, corpus) == on_losses  # reproducible: any difference is the field's
    steps = list(zip(on_losses, base_losses, strict=name != "vary_num_steps"))  # variable windows: fewer
    first = next(i for i, (a, b) in enumerate(steps) if a != b)
    assert first == (1 if name in ACT_ON_THE_UPDATE else 0)
    # by far more than float rounding (1e-7): the epoch's steps move by 1% or more on average
    # (measured: from 2.3% for locked_dropout_input to 36% for vary_num_steps)
    assert np.mean([abs(a - b) / b for a, b in steps]) > 0.01


def tiny_model(**reg) -> RegularizedLM:
    torch.manual_seed(0)
    return RegularizedLM(PTBConfig(vocab_size=VOCAB, hidden_size=8, num_layers=2, **reg))


def test_tying_shares_one_tensor_and_the_fused_loss_sums_both_gradients():
    model = tiny_model(tied=True, embedding_size=6)
    assert model.decoder.weight is model.embedding.weight
    assert [tuple(p.shape) for p in model.parameters()] == [
        (VOCAB, 6),  # the embedding, which is also the softmax weight
        *[(32, 6), (32, 8), (32,), (32,)],  # layer 1: 6 -> 8 units
        *[(24, 8), (24, 6), (24,), (24,)],  # layer 2: 8 -> 6 units, the embedding size
        (VOCAB,),  # the softmax bias
    ]
    assert (model.layers[0].input_size, model.layers[-1].hidden_size) == (6, 6)  # the last layer projects to E
    x, y = torch.randint(0, VOCAB, (3, 5)), torch.randint(0, VOCAB, (3, 5))
    loss, _, _ = model(x, y, None, 1 / 3)
    (fused,) = torch.autograd.grad(loss, [model.embedding.weight])
    out, _, _ = model.run(x)  # the plain composition: embedding lookup and softmax on one weight
    logits = F.linear(out.reshape(-1, 6), model.embedding.weight, model.decoder.bias)
    plain = F.cross_entropy(logits, y.t().reshape(-1), reduction="sum") / 3
    (reference,) = torch.autograd.grad(plain, [model.embedding.weight])
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-6)
    untied = tiny_model(embedding_size=6)
    assert untied.decoder.weight is not untied.embedding.weight
    copy = tiny_model(tied=True, embedding_size=6)
    copy.load_state_dict(model.state_dict())
    assert copy.decoder.weight is copy.embedding.weight


def test_weight_drop_resamples_every_batch_only_the_recurrent_matrix_and_is_off_in_eval(monkeypatch):
    model = tiny_model(weight_drop=0.5)
    raw = [layer.weight_hh_l0.detach().clone() for layer in model.layers]
    x, y = torch.randint(0, VOCAB, (3, 5)), torch.randint(0, VOCAB, (3, 5))
    dropped = []  # per LSTM call: which entries of the recurrent matrix it ran with are zero
    forward = torch.nn.LSTM.forward
    monkeypatch.setattr(
        torch.nn.LSTM, "forward", lambda self, *a: dropped.append(self.weight_hh_l0.detach() == 0) or forward(self, *a)
    )
    model.train()
    first, second = model(x, y)[0], model(x, y)[0]
    assert len(dropped) == 2 * 2  # one fused call per layer and forward: no loop over the 5 steps
    for layer in range(2):  # a new mask per forward (per batch): two draws at 0.5 differ in half the entries
        once, again = dropped[layer], dropped[2 + layer]
        assert 0.35 < once.float().mean().item() < 0.65 and 0.35 < (once != again).float().mean().item() < 0.65
    assert first.item() != second.item()  # (at init the loss moves little: by about 1e-5)
    for layer, before in zip(model.layers, raw, strict=True):
        assert torch.equal(layer.weight_hh_l0, before)  # the raw weight is what is trained
    model.zero_grad()
    model(x, y)[0].backward()
    hh, ih = model.layers[0].weight_hh_l0.grad, model.layers[0].weight_ih_l0.grad
    assert 0.35 < (hh == 0).float().mean().item() < 0.65  # dropped entries get no gradient
    assert (ih == 0).float().mean().item() < 0.05
    model.eval()
    plain = tiny_model()  # the same initial weights without weight drop
    plain.eval()
    with torch.no_grad():
        assert model(x, y)[1].item() == model(x, y)[1].item() == plain(x, y)[1].item()


def test_locked_dropout_keeps_one_mask_over_time_and_embedding_dropout_drops_whole_words():
    torch.manual_seed(0)
    x = torch.ones(7, 3, 50)
    dropped = locked_dropout(x, 0.5)
    assert torch.equal(dropped, dropped[:1].expand_as(dropped))  # the same mask at every step
    assert set(dropped.unique().tolist()) == {0.0, 2.0}
    assert locked_dropout(x, 0.0) is x
    embedding = torch.nn.Embedding(20, 4)
    torch.nn.init.ones_(embedding.weight)
    words = torch.tensor([[1, 2, 1, 3], [2, 1, 3, 1]] * 10)
    vectors = embedding_dropout(embedding, words, 0.5)
    for w in (1, 2, 3):
        values = vectors[words == w]
        assert (values == 0).all() or (values == 2).all(), w  # a word is dropped everywhere or nowhere
    assert torch.equal(embedding_dropout(embedding, words, 0.0), embedding(words))


def test_ar_and_tar_add_their_penalties_per_token():
    x, y = torch.randint(0, VOCAB, (3, 5)), torch.randint(0, VOCAB, (3, 5))
    plain = tiny_model().train()
    base_loss, _, _ = plain(x, y, None, 1 / 3)
    for reg, penalty in (
        ({"ar": 2.0}, lambda out: 2.0 * out.pow(2).mean()),
        ({"tar": 1.5}, lambda out: 1.5 * (out[1:] - out[:-1]).pow(2).mean()),
    ):
        model = tiny_model(**reg).train()
        loss, loss_sum, _ = model(x, y, None, 1 / 3)
        out, _, _ = model.run(x)  # no dropout: the dropped and raw outputs are the same
        assert loss_sum.item() == pytest.approx(plain(x, y, None, 1 / 3)[1].item(), rel=1e-6)  # metrics: CE only
        assert loss.item() == pytest.approx(base_loss.item() + 15 / 3 * penalty(out).item(), rel=1e-5)
        model.eval()
        assert model(x, y, None, 1 / 3)[0].item() == pytest.approx(base_loss.item(), rel=1e-6)  # off in eval


def test_loss_per_token_averages_over_every_token_and_scales_the_lr_by_the_window(corpus):
    config = PTBConfig(**TINY, loss_per_token=True, vary_num_steps=True)
    task = PTBTask(config)
    task.setup(corpus)
    torch.manual_seed(0)
    model = task.build_model()
    batch = next(iter(task.train_batches(0)))
    out = task.train_step(model, batch, None)
    words = batch[0].numel()
    assert out.loss.item() == pytest.approx(out.sums["loss_sum"].item() / words, rel=1e-6)
    assert out.lr_scale == batch[0].shape[1] / config.num_steps
    summed = PTBTask(cfg.build(PTBConfig, {**cfg.to_dict(config), "loss_per_token": False}))
    summed.setup(corpus)
    assert summed.train_step(model, batch, None).lr_scale == 1.0  # a summed loss already grows with T


def window_lengths(config: PTBConfig, corpus: ptb.Corpus, epoch: int, worker: WorkerInfo) -> list[int]:
    task = PTBTask(config, worker)
    task.setup(corpus)
    return [x.shape[1] for x, _ in task.train_batches(epoch)]


def test_variable_lengths_are_the_same_on_every_rank_and_on_resume_and_cover_every_target(corpus):
    config = PTBConfig(**{**TINY, "num_steps": 12}, vary_num_steps=True)
    ranks = [window_lengths(config, corpus, 3, WorkerInfo(rank=r, world_size=2)) for r in range(2)]
    assert ranks[0] == ranks[1] == window_lengths(config, corpus, 3, WorkerInfo())
    assert window_lengths(config, corpus, 3, WorkerInfo()) == ranks[0]  # an epoch re-run draws them again
    assert window_lengths(config, corpus, 4, WorkerInfo()) != ranks[0]
    other_seed = cfg.build(PTBConfig, {**cfg.to_dict(config), "seed": 1})
    assert window_lengths(other_seed, corpus, 3, WorkerInfo()) != ranks[0]
    row_len = len(corpus.train) // config.batch_size
    assert sum(ranks[0]) == row_len - 1  # every target, once
    assert min(ranks[0][:-1]) >= ptb.MIN_STEPS
    lengths = ptb.variable_lengths(np.random.default_rng(0), 100_000, 70)
    assert np.mean(lengths) == pytest.approx(0.95 * 70 + 0.05 * 35, abs=1.0)
    assert 0.03 < np.mean(np.array(lengths) < 50) < 0.07  # the half-length windows


@pytest.mark.parametrize(
    "change,message",
    [
        ({"locked_dropout_output": 1.0}, r"^--locked-dropout-output must be in \[0, 1\) \(0 = off\) \(got 1.0\)$"),
        ({"weight_drop": -0.1}, r"^--weight-drop must be in \[0, 1\)"),
        ({"ar": -1.0}, r"^--ar must be >= 0 and finite \(got -1.0\)$"),
        ({"weight_decay": float("inf")}, r"^--weight-decay must be >= 0 and finite"),
        ({"optimizer": "adam"}, r"^--optimizer must be one of sgd, nt-asgd \(got 'adam'\)$"),
        ({"init": "xavier"}, r"^--init must be one of uniform, awd"),
        ({"nonmono": 0}, r"^--nonmono must be >= 1 \(got 0\)$"),
        ({"embedding_size": -1}, r"^--embedding-size must be >= 0"),
        ({"test_batch_size": -1}, r"^--test-batch-size must be >= 0"),
        (
            {"keep_prob": 0.5, "locked_dropout_hidden": 0.2},
            r"^--keep-prob 0.5 \(the tutorial's dropout\) and --locked-dropout-hidden \(locked dropout\) act at "
            r"the same places; use one kind: .* \(in a search: --space keep_prob=base\)$",
        ),
    ],
)
def test_bad_regularization_values_are_one_line_errors(change, message):
    with pytest.raises(UserError, match=message):
        cfg.build(PTBConfig, {**PRESETS["small"], **change})


AWD_README = (
    dict(  # python main.py --batch_size 20 --data data/penn --dropouti 0.4 --dropouth 0.25 --seed 141 --epoch 500
        num_layers=3,
        embedding_size=400,
        hidden_size=1150,
        tied=True,
        batch_size=20,
        num_steps=70,
        learning_rate=30.0,
        max_grad_norm=0.25,
        locked_dropout_output=0.4,
        locked_dropout_hidden=0.25,
        locked_dropout_input=0.4,
        embedding_dropout=0.1,
        weight_drop=0.5,
        ar=2.0,
        tar=1.0,
        weight_decay=1.2e-6,
        optimizer="nt-asgd",
        nonmono=5,
        max_max_epoch=500,
        seed=141,
        loss_per_token=True,
        vary_num_steps=True,
        eval_batch_size=10,
        test_batch_size=1,
        init="awd",
    )
)


def test_the_awd_preset_is_awd_lstms_ptb_command(capsys):
    from lstm.cli import train_main

    assert train_main("ptb", ["--config", "awd", "--print-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {k: shown[k] for k in AWD_README} == AWD_README
    config = cfg.build(PTBConfig, PRESETS["awd"])
    assert [PTBTask(config).learning_rate(e) for e in (0, 250, 499)] == [30.0] * 3  # no decay
    assert config.shape_of("valid") == (10, 70) and config.shape_of("test") == (1, 70)


def test_small_reg_is_a_tied_regularized_2x200_model():
    config = cfg.build(PTBConfig, PRESETS["small-reg"])
    assert (config.num_layers, config.hidden_size, config.tied) == (2, 200, True) and config.regularized
    torch.manual_seed(0)
    model = PTBTask(config).build_model()
    assert type(model) is RegularizedLM and model.decoder.weight is model.embedding.weight


def test_regularization_fields_are_searchable_and_the_default_space_is_unchanged():
    assert PTBTask.search.space.keys() == {"keep_prob", "hidden_size", "lr_decay"}
    entries = [  # docs/ptb-regularized.md's example search of the small-reg family
        "keep_prob=base",
        "tied=true,false",
        "locked_dropout_output=0.2:0.5",
        "locked_dropout_input=0.1:0.4",
        "weight_drop=0.0:0.4",
        "ar=0,1,2",
        "tar=0,1,2",
    ]
    space = parse_space(
        PTBConfig, entries, base_values=PRESETS["small-reg"], task_name="ptb", defaults=PTBTask.search.space
    )
    assert set(space.params) == {
        "tied",
        "locked_dropout_output",
        "locked_dropout_input",
        "weight_drop",
        "ar",
        "tar",
        "hidden_size",
        "lr_decay",
    }
    assert space.params["tied"].values == (True, False)
    with pytest.raises(UserError, match=r"^--space keep_prob: the value 0.3 is not usable: .*--space keep_prob=base"):
        parse_space(PTBConfig, [], base_values=PRESETS["small-reg"], task_name="ptb", defaults=PTBTask.search.space)
