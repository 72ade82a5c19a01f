"""Training speed of the PTB job's own step against a plain PyTorch loop, side by side in one process.

    .venv/bin/python bench/ptb_speed.py [--config small] [--threads 2] [--steps 5] [--repeats 30]
    python bench/ptb_speed.py --device cuda --config medium [--precision bf16]   # on a GPU

Every figure this prints, and the command that measured it, is kept in ``bench/README.md``.
The trainers train the same model (the small config by default: 2 x 200 LSTM, vocab 10,000,
batch 20, 20 steps) on the same PTB batches, with the same thread count:

* **reference** -- the plain loop: ``nn.Embedding -> nn.LSTM -> nn.Linear``,
  ``nn.CrossEntropyLoss`` (times num_steps: the tutorial's loss scale), ``zero_grad``,
  ``backward``, ``clip_grad_norm_``, ``SGD.step``, the hidden state detached between batches;
* **job** -- the job's own step: ``lstm.step.Stepper`` on a ``StepModule`` of ``PTBTask`` with
  its ``DivergenceGuard``, called and summed as ``lstm.loop.Loop.train_epoch`` does, so the
  benchmark cannot drift from the job;
* **captured** (``--device cuda`` only) -- what the job runs on a GPU: ``lstm.step.make_stepper``'s
  ``CapturedStepper``, the step replayed from a CUDA graph;
* **compiled** (``--compiled``, CUDA only) -- the plain loop with its forward and loss under
  ``torch.compile(mode="reduce-overhead")`` (cudagraph trees), clipping and SGD eager: the
  alternative to the captured step, measured beside it;
* **matmul** -- only the step's matrix products, with ``torch.mm`` (``bench/step_flops.py``):
  ``matmul_fraction`` = job words/sec over matmul words/sec = the job's achieved FLOP/s over
  the machine's measured ``torch.mm`` rate on the step's own shapes.

They run in blocks of ``--steps`` steps, ``--repeats`` times, in forward then reverse order
(ABBA), after a warm-up; the figures are medians over blocks and each ratio is the median of
the per-block ratios, which cancels most of the drift of a shared machine. Then the job's
evaluation speed (``lstm.tasks.ptb.evaluate_rows``) on the validation split, and the gradient
all-reduce per step for each ``--allreduce-configs`` parameter count (``bench/allreduce.py``:
gloo with 2 processes; nccl too with ``--device cuda`` and 2 GPUs), set beside the step time.
With ``--profile-steps N`` (CPU), the job's step is profiled for N more steps and its time
split into matrix products, LSTM kernels and the rest (``op_split``, ``bench/op_split.py``).
Prints one JSON line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from allreduce import allreduce_ms, param_count  # noqa: E402
from op_split import op_split  # noqa: E402
from step_flops import flops_per_word, matmul_trainer  # noqa: E402
from torch import nn  # noqa: E402

from lstm import config as cfg  # noqa: E402
from lstm.data import ptb  # noqa: E402
from lstm.errors import UserError, run_cli  # noqa: E402
from lstm.step import (  # noqa: E402
    WARMUP_STEPS,
    CapturedStepper,
    DivergenceGuard,
    StepModule,
    Stepper,
    autocast,
    capture_refusal,
    make_stepper,
)
from lstm.task import WorkerInfo  # noqa: E402
from lstm.tasks.ptb import PTBTask, evaluate_rows  # noqa: E402
from lstm.tasks.ptb_config import PRESETS, PTBConfig  # noqa: E402

Trainer = Callable[[int], float]  # run(steps) -> words/sec
log = logging.getLogger("ptb_speed")


class PlainLM(nn.Module):
    """The reference model, written the obvious way, with the job's dropout (``1 - keep_prob``
    on the embedding, between the LSTM layers and on the last layer's output)."""

    def __init__(self, vocab: int, hidden: int, layers: int, init_scale: float, dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden, vocab)
        for p in self.parameters():
            nn.init.uniform_(p, -init_scale, init_scale)

    def forward(self, x, state=None):
        out, state = self.lstm(self.drop(self.embedding(x)), state)
        return self.decoder(self.drop(out)), state


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a block's time is the work's, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_arg(text: str) -> torch.device:
    """``--device``: cpu, or cuda[:N] where torch sees that GPU; a one-line UserError otherwise."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"--device {text!r} is not a device; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {text}: only cpu and cuda are benchmarked")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {text}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def plain_setup(config: PTBConfig, device: torch.device) -> tuple[PlainLM, torch.optim.Optimizer, nn.Module]:
    """The plain loop's seeded model, SGD and loss (the reference and compiled trainers)."""
    torch.manual_seed(config.seed)
    c = config
    model = PlainLM(c.vocab_size, c.hidden_size, c.num_layers, c.init_scale, 1 - c.keep_prob).to(device)
    return model, torch.optim.SGD(model.parameters(), lr=c.learning_rate), nn.CrossEntropyLoss()


def reference_trainer(config: PTBConfig, batches: list, device: torch.device, precision: str) -> Trainer:
    """The plain loop. (Written as pytorch/examples' word_language_model writes it --
    time-major, a hand-written SGD update -- it measured 5-10% slower still here, so this,
    the faster of the two, is the reference.)"""
    model, optimizer, criterion = plain_setup(config, device)
    position: dict[str, Any] = {"i": 0, "state": None}

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


def compiled_trainer(config: PTBConfig, batches: list, device: torch.device, precision: str) -> Trainer:
    """The plain loop with ``torch.compile(mode="reduce-overhead")`` on its forward and loss.
    The compiled function's outputs live in cudagraph trees' static memory, which the next
    replay overwrites: the carried state is cloned before the next step uses it."""
    c = config
    model, optimizer, criterion = plain_setup(config, device)

    def forward_loss(x, y, h, cell):
        logits, (h, cell) = model(x, (h, cell))
        loss = criterion(logits.reshape(-1, c.vocab_size), y.reshape(-1)) * c.num_steps
        return loss, h.detach(), cell.detach()

    compiled = torch.compile(forward_loss, mode="reduce-overhead")
    zeros = torch.zeros(c.num_layers, c.batch_size, c.hidden_size, device=device)
    position: dict[str, Any] = {"i": 0, "state": (zeros, zeros.clone())}

    def run(steps: int) -> float:
        start = time.perf_counter()
        h, cell = position["state"]
        for _ in range(steps):
            x, y = batches[position["i"] % len(batches)]
            position["i"] += 1
            torch.compiler.cudagraph_mark_step_begin()
            with autocast(precision, device):
                loss, h, cell = compiled(x, y, h, cell)
            h, cell = h.clone(), cell.clone()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
        position["state"] = (h, cell)
        sync(device)
        return steps * config.batch_size * config.num_steps / (time.perf_counter() - start)

    return run


def job_trainer(
    config: PTBConfig, batches: list, device: torch.device, precision: str, factory: bool
) -> tuple[Trainer, nn.Module, Any]:
    """The job's step: ``make_stepper``'s choice with ``factory`` (on a GPU, the captured
    step), else the eager ``Stepper``; built and driven as ``lstm.loop.Loop`` does."""
    task = PTBTask(config, WorkerInfo(device=device))
    torch.manual_seed(config.seed)
    model = task.build_model().to(device)
    optimizer = task.build_optimizer(model)
    guard = DivergenceGuard(task.loss_limit(), device, check_gradients=precision != "fp16")
    args = (StepModule(task, model), optimizer, [p for p in model.parameters() if p.requires_grad])
    kwargs: dict[str, Any] = dict(max_grad_norm=task.max_grad_norm(), guard=guard, precision=precision, device=device)
    stepper = make_stepper(*args, **kwargs) if factory else Stepper(*args, **kwargs)
    stepper.set_lr(task.learning_rate(0))
    model.train()
    position: dict[str, Any] = {"i": 0, "state": None}
    sums: dict[str, Any] = defaultdict(float)

    def run(steps: int) -> float:
        start = time.perf_counter()
        state, words = position["state"], 0
        for _ in range(steps):  # Loop.train_epoch's per-step work, less its hooks and progress line
            i = position["i"]
            position["i"] += 1
            out = stepper.step(batches[i % len(batches)], state, i, 0)
            for key, value in out.sums.items():
                sums[key] = sums[key] + (value.detach() if torch.is_tensor(value) else value)
            state, words = out.state, words + out.samples
        position["state"] = state
        sync(device)
        return words / (time.perf_counter() - start)

    return run, model, stepper


def run_blocks(trainers: dict[str, Trainer], steps: int, repeats: int) -> dict[str, list[float]]:
    """words/sec of each trainer per block, the order reversed every other block (ABBA)."""
    names = list(trainers)
    wps: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            wps[name].append(trainers[name](steps))
        if (r + 1) % 5 == 0 or r + 1 == repeats:
            log.info("block %d/%d: %s", r + 1, repeats, "  ".join(f"{n} {wps[n][-1]:,.0f}" for n in names))
    return wps


def block_ratio(wps: dict[str, list[float]], a: str, b: str) -> tuple[float, list[float]]:
    """The median over blocks of a's words/sec over b's in the same block, and the per-block ratios."""
    ratios = [x / y for x, y in zip(wps[a], wps[b], strict=True)]
    return round(statistics.median(ratios), 3), [round(x, 3) for x in ratios]


def eval_speed(model: nn.Module, corpus: Any, config: PTBConfig, device: torch.device, precision: str, words: int):
    eval_batch, eval_steps = config.eval_shape
    valid = torch.from_numpy(ptb.batchify(corpus.valid[:words], eval_batch)).to(device)
    eval_n = (valid.shape[1] - 1) // eval_steps
    model.eval()
    speeds = []
    for _ in range(3):
        start = time.perf_counter()
        with autocast(precision, device):
            sums = evaluate_rows(model, valid, eval_steps, eval_n)
        sync(device)
        speeds.append(sums["words"] / (time.perf_counter() - start))
    return statistics.median(speeds)


def allreduce_figures(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Gradient all-reduce time per step for each ``--allreduce-configs`` model (gloo, and
    nccl on 2 GPUs), keyed by config, with their parameter counts."""
    names = list(dict.fromkeys([args.config, *args.allreduce_configs.split(",")]))
    for name in names:
        if name not in PRESETS:
            raise UserError(f"--allreduce-configs: unknown config {name!r}; choose from {', '.join(sorted(PRESETS))}")
    params = {name: param_count(cfg.resolve(PTBConfig, PRESETS, preset=name)) for name in names}
    out: dict[str, Any] = {"params_by_config": params}
    if args.allreduce_iters <= 0:
        return out
    log.info("gradient all-reduce, gloo, 2 processes: %s", ", ".join(f"{n} {p:,} params" for n, p in params.items()))
    out["allreduce_gloo_ms_by_config"] = allreduce_ms(params, "gloo", args.allreduce_iters)
    if device.type == "cuda":
        if torch.cuda.device_count() >= 2:
            out["allreduce_nccl_ms_by_config"] = allreduce_ms(params, "nccl", args.allreduce_iters)
        else:
            out["allreduce_nccl"] = f"not measured: nccl needs 2 GPUs, this machine has {torch.cuda.device_count()}"
    return out


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small", choices=sorted(PRESETS))
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "ptb"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (all trainers)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=30, help="timed blocks per trainer")
    p.add_argument("--device", default="cpu", help="cpu, or cuda[:N] for a GPU")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="autocast dtype (all trainers)")
    p.add_argument("--eval-words", type=int, default=40_000, help="validation words per evaluation pass")
    p.add_argument("--allreduce-configs", default="small,medium,large", help="configs whose all-reduce is timed")
    p.add_argument("--allreduce-iters", type=int, default=5, help="timed all-reduce rounds (0: skip)")
    p.add_argument(
        "--compiled", action="store_true", help="CUDA: also time the plain loop under torch.compile(reduce-overhead)"
    )
    p.add_argument("--profile-steps", type=int, default=0, help="CPU: profile the job's step this many steps more")
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.threads < 1:
        raise UserError("--steps, --repeats and --threads must be >= 1")
    if args.profile_steps < 0:
        raise UserError("--profile-steps must be >= 0 (0: no profile)")
    if args.profile_steps and args.device.split(":")[0] != "cpu":
        raise UserError("--profile-steps splits a CPU step; on a GPU the profiler times launches: use --device cpu")
    return args


def build_trainers(config: PTBConfig, batches: list, device: torch.device, precision: str, compiled: bool):
    """(trainers by name, the job's model, the captured trainer's stepper or why there is none)."""
    trainers = {"reference": reference_trainer(config, batches, device, precision)}
    if compiled:
        trainers["compiled"] = compiled_trainer(config, batches, device, precision)
    trainers["job"], job_model, _ = job_trainer(config, batches, device, precision, factory=False)
    captured: Any = "cuda only"
    if device.type == "cuda":
        run, _, stepper = job_trainer(config, batches, device, precision, factory=True)
        if isinstance(stepper, CapturedStepper):
            trainers["captured"], captured = run, stepper
        else:
            captured = "refused: " + str(capture_refusal(device, precision, 1, PTBTask(config), stepper.optimizer))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    trainers["matmul"] = matmul_trainer(config, device, dtype)
    return trainers, job_model, captured


def captured_status(captured: Any) -> str:
    if not isinstance(captured, CapturedStepper):
        return captured
    return "eager: the capture failed (see the log line)" if captured.failed else "captured in a CUDA graph"


def step_figures(config: PTBConfig, wps: dict[str, list[float]]) -> dict[str, Any]:
    words = config.batch_size * config.num_steps
    med = {name: statistics.median(v) for name, v in wps.items()}
    ratio, ratio_blocks = block_ratio(wps, "job", "reference")
    fraction, fraction_blocks = block_ratio(wps, "job", "matmul")
    out: dict[str, Any] = {
        "reference_words_per_sec": round(med["reference"]),
        "job_words_per_sec": round(med["job"]),
        "ratio": ratio,
        "ratio_blocks": ratio_blocks,
        "step_ms": round(1000 * words / med["job"], 2),
        "flops_per_word": round(flops_per_word(config)),
        "achieved_gflops": round(flops_per_word(config) * med["job"] / 1e9, 1),
        "matmul_gflops": round(flops_per_word(config) * med["matmul"] / 1e9, 1),
        "matmul_fraction": fraction,
        "matmul_fraction_blocks": fraction_blocks,
    }
    if "captured" in wps:
        out["captured_words_per_sec"] = round(med["captured"])
        out["captured_step_ms"] = round(1000 * words / med["captured"], 2)
        out["captured_ratio"] = block_ratio(wps, "captured", "reference")[0]
        out["captured_over_job"] = block_ratio(wps, "captured", "job")[0]
        out["captured_matmul_fraction"] = block_ratio(wps, "captured", "matmul")[0]
    if "compiled" in wps:
        out["compiled_words_per_sec"] = round(med["compiled"])
        out["compiled_ratio"] = block_ratio(wps, "compiled", "reference")[0]
        if "captured" in wps:
            out["captured_over_compiled"] = block_ratio(wps, "captured", "compiled")[0]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = device_arg(args.device)
    if args.compiled and device.type != "cuda":
        raise UserError("--compiled times CUDA graphs (reduce-overhead): it needs --device cuda")
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    config = cfg.resolve(PTBConfig, PRESETS, preset=args.config)
    corpus = ptb.load_corpus(args.data_dir)
    rows = torch.from_numpy(ptb.batchify(corpus.train, config.batch_size)).to(device)
    n = min((args.steps * (args.repeats + 2)) * 2, (rows.shape[1] - 1) // config.num_steps)
    batches = list(ptb.iterate(rows, config.num_steps, n))
    trainers, job_model, captured = build_trainers(config, batches, device, args.precision, args.compiled)
    log.info("warm-up (%d threads)", args.threads)
    warmup_s = {}
    for name, run in trainers.items():
        start = time.perf_counter()
        run(WARMUP_STEPS + 2 if name in ("captured", "compiled") else 2)  # captured or compiled, then replayed
        warmup_s[name] = round(time.perf_counter() - start, 2)
    wps = run_blocks(trainers, args.steps, args.repeats)
    figures = step_figures(config, wps)
    if args.profile_steps > 0:
        figures["op_split"] = op_split(trainers["job"], args.profile_steps)
    eval_wps = eval_speed(job_model, corpus, config, device, args.precision, args.eval_words)
    comm = allreduce_figures(args, device)
    gloo = comm.get("allreduce_gloo_ms_by_config", {})
    result = {
        "bench": "ptb_speed",
        "config": args.config,
        "threads": args.threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": args.precision,
        "steps_per_block": args.steps,
        "blocks": args.repeats,
        "captured": captured_status(captured),
        **figures,
        "warmup_s": warmup_s,
        "params": comm["params_by_config"][args.config],
        "grad_mb": round(comm["params_by_config"][args.config] * 4 / 1e6, 1),
        **({"allreduce_ms": gloo[args.config], "allreduce_backend": "gloo x2"} if gloo else {}),
        **({"allreduce_over_step": round(gloo[args.config] / figures["step_ms"], 2)} if gloo else {}),
        **comm,
        "eval_words_per_sec": round(eval_wps),
        "eval_over_train": round(eval_wps / statistics.median(wps["job"]), 2),
        "eval_shape": list(config.eval_shape),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **(
            {"peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)} if device.type == "cuda" else {}
        ),
        "torch": torch.__version__,
        "load_avg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
