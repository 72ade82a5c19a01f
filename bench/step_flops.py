"""The FLOPs of one PTB training step, and the machine's ``torch.mm`` speed on the step's own shapes.

FLOP count
----------
A step trains on N = batch_size * num_steps words with hidden size H, vocabulary V and L
layers. Only the matrix products are counted, at 2 FLOPs per multiply-add; the rest (bias
adds, gate nonlinearities, softmax, embedding lookup, clipping, the SGD update) is O(N*V + N*H)
memory traffic, not arithmetic a matmul rate describes.

* softmax layer, (N x H) by (H x V): the logits ``h W^T`` forward, and backward ``dh = G W``
  and ``dW = G^T h`` (G = p - onehot(y)): 3 products of 2*N*H*V = **6 N H V**;
* each LSTM layer, gates 4H wide: forward the input product ``X W_ih^T`` (all N rows at
  once, 8 N H^2) and num_steps recurrent products ``h_{t-1} W_hh^T`` (batch rows each,
  8 N H^2 in all); backward, for each of the two, the gradient of its input (``dG W``; the
  recurrent one again step by step) and of its weight (``dG^T X``, over all N rows at once,
  as cuDNN and oneDNN do it): 4 more products of 8 N H^2. That is **48 N H^2 per layer**.

Per word: ``6 H V + 48 L H^2`` -- small (H 200, V 10,000, L 2): 12.0M + 3.84M = 15.84 MFLOP;
medium (H 650): 39.0M + 40.6M = 79.6 MFLOP; large (H 1500): 90M + 216M = 306 MFLOP.

Measured rate
-------------
:func:`matmul_trainer` runs exactly these products with ``torch.mm`` -- the same shapes, the
same transposed operands, as many times per step -- and nothing else. Its words/sec is how
fast the step would go if it were only its matrix products at this machine's speed, so the
job's words/sec over it (``matmul_fraction`` in ``bench/ptb_speed.py``) is its achieved FLOP/s
over the machine's measured ``torch.mm`` rate on the step's shapes. The LSTM's products run
inside oneDNN's RNN kernel on a CPU (cuDNN's on a GPU), which packs the weights and can beat
``torch.mm`` on the same shapes: where the LSTM's share is large (medium, large) the
fraction can exceed 1. On a GPU one step's products are replayed from a CUDA graph, as the
job's captured step is: launched one by one, the small config's products measured the
launches, not the device (the captured step ran at 1.57 times that "rate" on an H200).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Product:
    """``count`` products (m x k) @ (k x n) per step; ``ta``/``tb``: that operand is a
    transposed view in the step (e.g. ``G^T``), and is one here too."""

    name: str
    m: int
    k: int
    n: int
    count: int = 1
    ta: bool = False
    tb: bool = False

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n * self.count


def step_products(batch_size: int, num_steps: int, hidden: int, vocab: int, layers: int) -> list[Product]:
    """The matrix products of one training step (see the module docstring)."""
    b, t, h, v, n, g = batch_size, num_steps, hidden, vocab, batch_size * num_steps, 4 * hidden
    return [
        Product("softmax forward h W^T", n, h, v, tb=True),
        Product("softmax backward dh = G W", n, v, h),
        Product("softmax backward dW = G^T h", v, n, h, ta=True),
        Product("LSTM forward X W_ih^T", n, h, g, layers, tb=True),
        Product("LSTM forward h W_hh^T", b, h, g, layers * t, tb=True),
        Product("LSTM backward dX = dG W_ih", n, g, h, layers),
        Product("LSTM backward dW_ih = dG^T X", g, n, h, layers, ta=True),
        Product("LSTM backward dh = dG W_hh", b, g, h, layers * t),
        Product("LSTM backward dW_hh = dG^T h", g, n, h, layers, ta=True),
    ]


def config_products(config) -> list[Product]:
    """:func:`step_products` of a :class:`lstm.tasks.ptb_config.PTBConfig`."""
    return step_products(config.batch_size, config.num_steps, config.hidden_size, config.vocab_size, config.num_layers)


def flops_per_word(config) -> float:
    return sum(p.flops for p in config_products(config)) / (config.batch_size * config.num_steps)


def _operand(rows: int, cols: int, transposed: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(cols, rows, device=device).t() if transposed else torch.randn(rows, cols, device=device)
    return x.to(dtype)


def captured(work: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``work`` captured in a CUDA graph on a side stream of its own, after one eager run on
    that stream (as ``lstm.step.CapturedStepper`` does); returns the graph's replay. The eager
    run gives cuBLAS its workspace for this stream outside any graph's memory pool, and the
    capture reuses it."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        work()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        work()
    return graph.replay


def matmul_trainer(config, device: torch.device, dtype: torch.dtype = torch.float32) -> Callable[[int], float]:
    """A stand-in "trainer" that runs only the step's products with ``torch.mm``; its
    ``run(steps)`` returns words/sec, like the other trainers of ``bench/ptb_speed.py``."""
    operands = []
    for p in config_products(config):
        a, b = _operand(p.m, p.k, p.ta, device, dtype), _operand(p.k, p.n, p.tb, device, dtype)
        operands.append((a, b, torch.empty(p.m, p.n, device=device, dtype=dtype), p.count))
    words = config.batch_size * config.num_steps

    def one_step() -> None:
        for a, b, out, count in operands:
            for _ in range(count):
                torch.mm(a, b, out=out)

    # On a GPU, captured at the first run: bench/ptb_speed.py warms this trainer up last, after
    # the other trainers have captured or recorded their graphs.
    replays: list[Callable[[], None]] = []

    def run(steps: int) -> float:
        if not replays:
            replays.append(one_step if device.type != "cuda" else captured(one_step, device))
        replay = replays[0]
        start = time.perf_counter()
        for _ in range(steps):
            replay()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return steps * words / (time.perf_counter() - start)

    return run
