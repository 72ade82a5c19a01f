"""One optimizer step (forward inside DDP, backward, clip, divergence check, optimizer step),
written once for the loop and ``bench/ptb_speed.py``.

A step has diverged when its loss or gradient norm is not finite, or its mean loss exceeds the
task's ``loss_limit`` (a saturated softmax keeps an exploding loss finite). The guard keeps the
first bad step on the device and reads it every step on a CPU, every 50 on a GPU (a read stalls
the host); the ranks all-reduce it, so all stop at the same step with the same line.

On a GPU the step is bound by launches, not arithmetic, so :func:`make_stepper` captures the
whole step in a CUDA graph where it can (:class:`CapturedStepper`), else says why in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from typing import Any, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from lstm.errors import UserError
from lstm.task import StepOutput, Task

GPU_CHECK_EVERY = 50
CPU = torch.device("cpu")
NEVER = 2**62
WARMUP_STEPS = 3  # eager steps before capture, on the capture's side stream (PyTorch's recipe)
CAPTURE_ENV = "LSTM_CUDA_GRAPH"  # set to 0 to keep the eager step on a GPU

logger = logging.getLogger(__name__)


class StepModule(nn.Module):
    """``task.train_step`` as a module's forward, so that DDP wraps the step and the task sees its own model."""

    def __init__(self, task: Task, model: nn.Module):
        super().__init__()
        self.task = task
        self.model = model

    def forward(self, batch: Any, state: Any) -> StepOutput:
        return self.task.train_step(self.model, batch, state)


def autocast(precision: str, device: torch.device, cache: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision for ``bf16``/``fp16``; ``cache=False`` for a CUDA graph capture. On a CPU
    without oneDNN kernels of that dtype (no AVX-512), oneDNN is off inside: an autocast
    ``nn.LSTM`` fails to build its oneDNN kernel there, PyTorch's own fp32 kernel runs instead."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    cast = torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)
    if device.type != "cpu" or onednn_has(dtype):
        return cast
    return _without_onednn(cast)


def onednn_has(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN runs ``dtype`` (bf16: AVX-512; fp16: AVX-512-FP16 or AMX);
    False where torch cannot say."""
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a torch without the check: the path that always works
        return False


@contextlib.contextmanager
def _without_onednn(cast: contextlib.AbstractContextManager) -> Iterator[None]:
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        with cast:
            yield
    finally:
        torch.backends.mkldnn.enabled = before


KINDS = ("NaN", "infinite", "too large")  # what a diverged step's loss became, in order of precedence


class DivergenceGuard:
    """The first diverged step, kept on the device as ``step * len(KINDS) + kind``: the minimum
    over steps and ranks is the earliest bad step and what went wrong there."""

    def __init__(
        self,
        limit: float,
        device: torch.device,
        world_size: int = 1,
        check_every: Optional[int] = None,
        check_gradients: bool = True,
    ):
        self.limit = limit
        self.world_size = world_size
        self.check_every = check_every or (1 if device.type == "cpu" else GPU_CHECK_EVERY)
        self.check_gradients = check_gradients  # off with an fp16 scaler, which skips inf steps itself
        self.first_bad = torch.full((), NEVER, dtype=torch.long, device=device)

    def observe(self, step: Union[int, torch.Tensor], mean_loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Record the step if it diverged, in place, so that a CUDA graph replay records it too."""
        values = (
            torch.stack([mean_loss.float(), grad_norm.float()]) if self.check_gradients else mean_loss.float()[None]
        )
        kind = torch.where(values.isnan().any(), 0, torch.where(values.isinf().any(), 1, 2))
        bad = ~torch.isfinite(values).all() | (mean_loss > self.limit)
        code = torch.where(bad, step * len(KINDS) + kind, NEVER)
        torch.minimum(self.first_bad, code, out=self.first_bad)

    def due(self, step: int) -> bool:
        return (step + 1) % self.check_every == 0

    def bad_step(self) -> Optional[tuple[int, str]]:
        """(the earliest diverged step on any rank, what its loss became), or None; a collective."""
        first = self.first_bad.clone()
        if self.world_size > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        code = int(first)
        return None if code >= NEVER else (code // len(KINDS), KINDS[code % len(KINDS)])


def diverged_error(epoch: int, step: int, kind: str, limit: float) -> UserError:
    became = f"too large (over {limit:.4g} per unit, beyond any training model)" if kind == "too large" else kind
    return UserError(
        f"the loss became {became} at epoch {epoch + 1} step {step}; "
        "lower --learning-rate or set a smaller --max-grad-norm"
    )


def clip_cpu_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` bit for bit, less its pass over the gradients when the norm is within
    ``max_norm``. torch always scales so as not to read the norm on the host (a stall on a GPU);
    on a CPU the read is free and most steps clip nothing, so the pass is skipped."""
    if not hasattr(torch.nn.utils, "get_total_norm"):  # torch < 2.6
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if not bool(max_norm / (norm + 1e-6) >= 1.0):  # torch's own factor; NaN scales, as torch does
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


class Stepper:
    """Runs training steps: ``forward`` is the :class:`StepModule`, in DDP with several workers."""

    def __init__(
        self,
        forward: nn.Module,
        optimizer: torch.optim.Optimizer,
        params: list[torch.Tensor],
        *,
        max_grad_norm: Optional[float],
        guard: DivergenceGuard,
        precision: str = "fp32",
        device: torch.device = CPU,
    ):
        self.forward, self.optimizer, self.params = forward, optimizer, params
        self.max_norm = max_grad_norm if max_grad_norm else math.inf
        self.guard, self.precision, self.device = guard, precision, device
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.lr = 0.0

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, batch: Any, state: Any, index: int, epoch: int) -> StepOutput:
        """One training step on ``batch``; UserError when the run has diverged."""
        with autocast(self.precision, self.device):
            out = self.forward(batch, state)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(out.loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            out.loss.backward()
        # After DDP's all-reduce, so every rank sees the same norm.
        if self.device.type == "cpu":
            norm = clip_cpu_gradients(self.params, self.max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.guard.observe(index, out.mean_loss, norm)
        if self.guard.due(index):
            self.raise_if_diverged(epoch)
        self._optimizer_step(out.lr_scale)
        return out

    def raise_if_diverged(self, epoch: int) -> None:
        bad = self.guard.bad_step()
        if bad is not None:
            raise diverged_error(epoch, *bad, self.guard.limit)
        if self.scaler is not None and self.scaler.get_scale() < 1e-6:
            raise UserError(
                f"the fp16 loss scale collapsed in epoch {epoch + 1}; use --precision bf16 or fp32, "
                "or lower --learning-rate"
            )

    def _optimizer_step(self, lr_scale: float) -> None:
        if lr_scale != 1.0:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * lr_scale
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips steps with inf/NaN gradients, as fp16 needs
            self.scaler.update()
        else:
            self.optimizer.step()
        if lr_scale != 1.0:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr


# --------------------------------------------------------------------------- the captured step


def graph_safe_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`make_graph_safe` can make ``optimizer``'s step capturable: plain SGD."""
    return type(optimizer) is torch.optim.SGD and not any(g.get("differentiable") for g in optimizer.param_groups)


def make_graph_safe(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """Switch SGD to its fused kernel reading the lr from a device tensor (returned), its only
    graph-safe form: a replay reads no host value and a new lr is a ``fill_``. Checkpoints still
    hold the float lr and the group's own ``fused``/``foreach``, so they load anywhere."""
    lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), device=device)
    before = [(g.get("fused"), g.get("foreach")) for g in optimizer.param_groups]
    for group in optimizer.param_groups:
        group.update(lr=lr, fused=True, foreach=False)

    def plain_state_dict(_optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        for group, (fused, foreach) in zip(state_dict["param_groups"], before, strict=True):
            group.update(lr=float(group["lr"]), fused=fused, foreach=foreach)
        return state_dict

    optimizer.register_state_dict_post_hook(plain_state_dict)
    return lr


def capture_refusal(
    device: torch.device, precision: str, world_size: int, task: Task, optimizer: torch.optim.Optimizer
) -> Optional[str]:
    """Why the training step cannot be captured in a CUDA graph, or None when it can."""
    if os.environ.get(CAPTURE_ENV, "1") == "0":
        return f"{CAPTURE_ENV}=0"
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    if precision == "fp16":
        return "fp16's GradScaler decides on the host whether each step is applied"
    if world_size > 1:
        # PyTorch's recipe for DDP in a graph needs async NCCL error handling off (Ray Train
        # turns it on), DDP built on a side stream and 11 eager warm-up steps.
        return f"{world_size} workers (DDP): capturing DDP's all-reduce is not set up under Ray Train"
    if not task.static_step():
        return f"task {task.name}'s step changes shapes or learning-rate scale from step to step"
    if not graph_safe_optimizer(optimizer):
        return f"{type(optimizer).__name__} is not known to be graph-safe (torch.optim.SGD is)"
    return None


def _tensors(values: Any, what: str) -> tuple[torch.Tensor, ...]:
    if not isinstance(values, (tuple, list)) or not all(torch.is_tensor(v) for v in values):
        raise RuntimeError(f"a captured step needs its {what} as a tuple of tensors, not {type(values).__name__}")
    return tuple(values)


class CapturedStepper(Stepper):
    """The step captured in a CUDA graph (PyTorch's whole-network recipe): :data:`WARMUP_STEPS`
    eager steps on a side stream (they allocate workspaces and momentum buffers), one capture
    of :meth:`_body` on static buffers, then a copy into them and a replay per step; its output
    is static, to be read before the next step. ``graph=False`` runs the body eagerly (the CPU
    tests); what the graph cannot take falls back to the eager step with one warning. SGD runs
    fused, and dropout draws from the graph's RNG offsets, so a re-run epoch draws other masks.
    ``torch.compile``'s CUDA graphs are not used: per region, they overwrite the carried state
    at the next replay, and ``aten.lstm`` is unrolled over time steps."""

    def __init__(
        self,
        forward: nn.Module,
        optimizer: torch.optim.Optimizer,
        params: list[torch.Tensor],
        *,
        graph: bool = True,
        **kwargs: Any,
    ):
        super().__init__(forward, optimizer, params, **kwargs)
        self.graph = graph
        self.lr_tensor = make_graph_safe(optimizer, self.device)
        self.warmed, self.ready, self.failed = 0, False, False
        self.stream = torch.cuda.Stream(self.device) if graph else None
        self.cuda_graph: Optional[Any] = None  # a torch.cuda.CUDAGraph once captured
        self.static_out: Optional[StepOutput] = None
        self.static_batch: tuple[torch.Tensor, ...] = ()
        self.static_state: Optional[tuple[torch.Tensor, ...]] = None
        self.static_index = torch.zeros((), dtype=torch.long, device=self.device)
        self.state_like: Any = None

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        self.lr_tensor.fill_(lr)

    def step(self, batch: Any, state: Any, index: int, epoch: int) -> StepOutput:
        """One training step on ``batch``; UserError when the run has diverged."""
        if self.failed:
            return super().step(batch, state, index, epoch)
        if self.warmed < WARMUP_STEPS:
            return self._warmup(batch, state, index, epoch)
        try:
            if not self.ready:
                self._capture(batch)
            self._load(batch, state, index)
        except RuntimeError as e:  # an op that cannot be captured, or a shape that changed
            self._give_up(e)
            return super().step(batch, state, index, epoch)
        if self.cuda_graph is not None:
            self.cuda_graph.replay()
        else:
            self.static_out = self._body()
        if self.guard.due(index):
            self.raise_if_diverged(epoch)
        assert self.static_out is not None
        return self.static_out

    def _give_up(self, error: Exception) -> None:
        logger.warning("CUDA graph of the training step abandoned, eager step from here: %s", error)
        self.failed, self.cuda_graph, self.static_out = True, None, None
        self.optimizer.zero_grad(set_to_none=True)  # drop the gradients in the graph's memory pool

    def _warmup(self, batch: Any, state: Any, index: int, epoch: int) -> StepOutput:
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            out = super().step(batch, state, index, epoch)
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.warmed += 1
        self.state_like = out.state
        return out

    def _capture(self, batch: Any) -> None:
        """Allocate the static buffers and capture the body (with ``graph=False``, only allocate)."""
        self.static_batch = tuple(
            torch.empty_like(x, memory_format=torch.contiguous_format) for x in _tensors(batch, "batch")
        )
        if self.state_like is not None:
            self.static_state = tuple(torch.zeros_like(s) for s in _tensors(self.state_like, "state"))
        self.optimizer.zero_grad(set_to_none=True)  # so that the graph's backward allocates the gradients
        if self.graph:
            cuda_graph = torch.cuda.CUDAGraph()
            # The default "global" capture mode: backward runs in autograd's own thread.
            with torch.cuda.graph(cuda_graph, stream=self.stream):
                out = self._body()
            if out.lr_scale != 1.0:
                raise RuntimeError(f"a captured step needs lr_scale 1 at every step (got {out.lr_scale})")
            self.cuda_graph, self.static_out = cuda_graph, out
        self.ready = True

    def _body(self) -> StepOutput:
        """The step on the static buffers: what the graph holds."""
        self.optimizer.zero_grad(set_to_none=True)  # nothing to do in the graph: its gradients are None
        with autocast(self.precision, self.device, cache=not self.graph):
            out = self.forward(self.static_batch, self.static_state)
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.guard.observe(self.static_index, out.mean_loss, norm)
        self.optimizer.step()  # reads lr_tensor on the device
        if self.static_state is not None:
            for buffer, new in zip(self.static_state, _tensors(out.state, "state"), strict=True):
                buffer.copy_(new)
        return dataclasses.replace(out, state=self.static_state)

    def _load(self, batch: Any, state: Any, index: int) -> None:
        """This step's batch, state and index into the static buffers."""
        for buffer, x in zip(self.static_batch, _tensors(batch, "batch"), strict=True):
            if x.shape != buffer.shape:
                raise RuntimeError(f"a batch of shape {tuple(x.shape)} after capturing {tuple(buffer.shape)}")
            buffer.copy_(x)
        if self.static_state is not None and state is not self.static_state:
            if state is None:
                for buffer in self.static_state:
                    buffer.zero_()
            else:
                for buffer, s in zip(self.static_state, _tensors(state, "state"), strict=True):
                    buffer.copy_(s)
        self.static_index.fill_(index)


def make_stepper(
    forward: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    *,
    max_grad_norm: Optional[float],
    guard: DivergenceGuard,
    precision: str = "fp32",
    device: torch.device = CPU,
) -> Union[Stepper, CapturedStepper]:
    """A :class:`CapturedStepper` where possible, else a :class:`Stepper`; a line on rank 0 says why."""
    task: Task = getattr(forward, "module", forward).task
    reason = capture_refusal(device, precision, guard.world_size, task, optimizer)
    kwargs: dict[str, Any] = dict(max_grad_norm=max_grad_norm, guard=guard, precision=precision, device=device)
    if reason is not None:
        if task.worker.is_chief:
            level = logging.INFO if device.type == "cpu" else logging.WARNING
            logger.log(level, "[%s] eager training step, no CUDA graph: %s", task.name, reason)
        return Stepper(forward, optimizer, params, **kwargs)
    if task.worker.is_chief:
        logger.info("[%s] training step captured in a CUDA graph after %d eager steps", task.name, WARMUP_STEPS)
    return CapturedStepper(forward, optimizer, params, **kwargs)
