"""One optimizer step, written once for the loop and the benchmark (``bench/ptb_speed.py``).

:class:`Stepper` does, per batch: the task's forward (inside DDP when there are several
workers), backward, global-norm clipping, the divergence check and the optimizer step.

Divergence. A step has diverged when its loss or its gradient norm is not finite, or when its
mean loss per unit exceeds the task's :meth:`~lstm.task.Task.loss_limit`, a value no training
model reaches (a loss can stay finite while it explodes: once the softmax saturates, the
gradient ``p - onehot(y)`` stays bounded). :class:`DivergenceGuard` keeps the first such step
on the device and looks at it every ``check_every`` steps -- every step on a CPU, where
looking is free, every 50 on a GPU, where it would stall the host. With several workers the
ranks agree on the earliest bad step (an all-reduce of one integer), so every rank stops at
the same step with the same one-line error, and no checkpoint of a diverged model is written.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from lstm.errors import UserError
from lstm.task import StepOutput, Task

GPU_CHECK_EVERY = 50
CPU = torch.device("cpu")
NEVER = 2**62


class StepModule(nn.Module):
    """``task.train_step`` as a module's forward, so that DDP can wrap the whole step: the
    task's hooks then see only its own model, and DDP still averages the gradients."""

    def __init__(self, task: Task, model: nn.Module):
        super().__init__()
        self.task = task
        self.model = model

    def forward(self, batch: Any, state: Any) -> StepOutput:
        return self.task.train_step(self.model, batch, state)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for ``bf16``/``fp16``; nothing for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


KINDS = ("NaN", "infinite", "too large")  # what a diverged step's loss became, in order of precedence


class DivergenceGuard:
    """The first step whose loss or gradient diverged (see the module docstring). It is kept
    on the device as ``step * len(KINDS) + kind``, so the minimum over steps and ranks is the
    earliest bad step and what went wrong there."""

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

    def observe(self, step: int, mean_loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        values = (
            torch.stack([mean_loss.float(), grad_norm.float()]) if self.check_gradients else mean_loss.float()[None]
        )
        kind = torch.where(values.isnan().any(), 0, torch.where(values.isinf().any(), 1, 2))
        bad = ~torch.isfinite(values).all() | (mean_loss > self.limit)
        code = torch.where(bad, step * len(KINDS) + kind, NEVER)
        self.first_bad = torch.minimum(self.first_bad, code)

    def due(self, step: int) -> bool:
        return (step + 1) % self.check_every == 0

    def bad_step(self) -> Optional[tuple[int, str]]:
        """(the earliest diverged step on any rank, what its loss became), or None. A
        collective with several workers: every rank calls it at the same steps."""
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


class Stepper:
    """Runs training steps: ``forward`` is the :class:`StepModule` (DDP-wrapped with several
    workers), ``params`` the model's trainable parameters."""

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
