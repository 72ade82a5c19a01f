"""The gradient all-reduce of one DDP step, timed for a model's parameter count.

Two processes on this machine (127.0.0.1) form a ``torch.distributed`` group -- gloo on the
CPU, nccl with one GPU each -- and all-reduce fp32 buffers as large as the model's gradients,
cut into DDP's default 25 MiB buckets, all launched asynchronously and then waited for (what
DDP does as backward fills the buckets). The figure is rank 0's median over ``iters`` timed
rounds after one untimed round, each round started after a barrier.

It is a lower bound for DDP: no overlap is lost, but no compute competes with it either.
"""

from __future__ import annotations

import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

BUCKET_BYTES = 25 * 2**20  # DDP's bucket_cap_mb default
WORLD = 2


def param_count(config) -> int:
    """Trainable parameters of the PTB model of ``config`` (built on the meta device: no memory)."""
    from lstm.models.word import WordLM

    with torch.device("meta"):
        model = WordLM(config.vocab_size, config.hidden_size, config.num_layers, config.keep_prob, config.init_scale)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _round(buckets: list[torch.Tensor], device: torch.device) -> float:
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    works = [dist.all_reduce(b, async_op=True) for b in buckets]
    for work in works:
        work.wait()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _worker(rank: int, port: int, backend: str, sizes: dict[str, int], iters: int, out: str) -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        per_bucket = BUCKET_BYTES // 4
        results = {}
        for name, n in sizes.items():
            buckets = [torch.ones(min(per_bucket, n - i), device=device) for i in range(0, n, per_bucket)]
            times = [_round(buckets, device) for _ in range(iters + 1)][1:]
            results[name] = round(statistics.median(times) * 1000, 2)
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def allreduce_ms(sizes: dict[str, int], backend: str = "gloo", iters: int = 5) -> dict[str, float]:
    """{name: milliseconds} to all-reduce ``sizes[name]`` fp32 values over 2 processes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="allreduce-") as tmp:
        out = str(Path(tmp) / "result.json")
        mp.start_processes(
            _worker, args=(free_port(), backend, sizes, iters, out), nprocs=WORLD, start_method="spawn", join=True
        )
        return json.loads(Path(out).read_text())
