"""Softmax layer + cross entropy in one autograd node, for CPU speed.

``linear_cross_entropy(h, W, b, y, scale)`` is ``scale * F.cross_entropy(h @ W.T + b, y,
reduction="sum")`` -- the same value and the same gradients -- computed with fewer passes over
the (rows x vocab) logits, which for a word LM dominate the memory traffic:

* forward: one GEMM writes the logits, softmax runs in place on them, the loss is read off at
  the targets, and ``p - onehot(y)`` (the gradient of the summed cross entropy) is formed in
  place too. The three gradients (d h = G W, d W = G^T h, d b = sum G) are computed right
  away, so no logits-sized tensor survives the forward;
* backward: hands back the stored gradients, times ``grad_output`` (1 for ``loss.backward()``).

The plain composition instead writes logits, log-softmax output, a zero-filled one-hot grad,
the log-softmax grad and the logits grad: five logits-sized tensors per step.

``-log(p_target)`` loses precision once ``p_target`` underflows float32 (a loss above ~87
nats, i.e. a diverging model); those few rows are recomputed exactly from their logits.

Without gradients (evaluation) it computes only the loss, in row blocks. Under autocast and
on a GPU it is the plain composition: the fused node is an fp32 CPU path, and its underflow
check would cost a GPU sync every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EVAL_BLOCK_ROWS = 2048  # rows of logits materialised at once when evaluating
UNDERFLOW = 1e-30  # below this p_target, recompute that row's loss from its logits


def _exact_row_losses(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = torch.addmm(bias, h, weight.t())
    return torch.logsumexp(logits, 1) - logits.gather(1, y.unsqueeze(1)).squeeze(1)


_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """A (rows, cols) buffer reused from step to step: a fresh logits-sized tensor every step
    costs the allocator page faults and zeroing. Only used inside one forward call."""
    key = (rows, cols, like.dtype, like.device)
    buf = _SCRATCH.get(key)
    if buf is None:
        if len(_SCRATCH) > 4:
            _SCRATCH.clear()
        buf = _SCRATCH[key] = torch.empty(rows, cols, dtype=like.dtype, device=like.device)
    return buf


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, y: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        probs = _scratch(h.shape[0], weight.shape[0], h)
        torch.addmm(bias, h, weight.t(), out=probs)  # logits, (N, V)
        torch.softmax(probs, 1, out=probs)  # in place: row-wise max, exp-sum, scale
        y1 = y.unsqueeze(1)
        p_target = probs.gather(1, y1).squeeze(1)
        row_loss = -torch.log(p_target)
        low = p_target < UNDERFLOW
        if bool(low.any()):
            idx = low.nonzero().squeeze(1)
            row_loss[idx] = _exact_row_losses(h[idx], weight, bias, y[idx])
        loss_sum = row_loss.sum()
        probs.scatter_add_(1, y1, torch.full_like(p_target, -1.0).unsqueeze(1))  # G = p - onehot(y)
        grad_h = torch.mm(probs, weight).mul_(scale)
        grad_w = torch.mm(probs.t(), h * scale)
        grad_b = probs.sum(0).mul_(scale)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(loss_sum)
        return loss_sum * scale, loss_sum

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_sum: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if grad_loss.device.type != "cpu" or float(grad_loss) != 1.0:
            grad_h, grad_w, grad_b = grad_h * grad_loss, grad_w * grad_loss, grad_b * grad_loss
        return grad_h, grad_w, grad_b, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale * summed cross entropy, summed cross entropy)`` of ``h @ weight.T + bias``.

    ``h`` is (N, hidden), ``weight`` (vocab, hidden), ``targets`` (N,) int64. The first value
    is differentiable; the second is a detached copy of the plain sum, for metrics.
    """
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad or bias.requires_grad)
    if torch.is_autocast_enabled(h.device.type) or h.device.type != "cpu":
        loss_sum = F.cross_entropy(F.linear(h, weight, bias), targets, reduction="sum")
        return loss_sum * scale, loss_sum.detach().float()
    if needs_grad:
        return _LinearCrossEntropy.apply(h, weight, bias, targets, float(scale))
    with torch.no_grad():
        total = h.new_zeros((), dtype=torch.float64)
        for start in range(0, h.shape[0], EVAL_BLOCK_ROWS):
            rows = slice(start, start + EVAL_BLOCK_ROWS)
            hr = h[rows]
            logp = _scratch(hr.shape[0], weight.shape[0], h)
            torch.addmm(bias, hr, weight.t(), out=logp)
            torch.log_softmax(logp, 1, out=logp)
            total -= logp.gather(1, targets[rows].unsqueeze(1)).sum(dtype=torch.float64)
        loss_sum = total.to(h.dtype)
        return loss_sum * scale, loss_sum
