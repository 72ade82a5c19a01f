"""Softmax layer + cross entropy in one autograd node, for CPU speed: ``scale *
F.cross_entropy(h @ W.T + b, y, reduction="sum")``, value and gradients, with fewer passes over
the (rows x vocab) logits that dominate a word LM's memory traffic. The forward takes softmax
and ``p - onehot(y)`` in place and computes the gradients at once, so no logits-sized tensor
outlives it; rows whose target probability underflows (a diverging model) are recomputed
exactly. Under autocast or on a GPU it is the plain composition (its check would sync a GPU).
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
    """A (rows, cols) buffer reused across steps: a fresh logits-sized tensor costs page faults and zeroing."""
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
    """``(scale * summed cross entropy, summed cross entropy (detached))`` of ``h @ weight.T + bias``."""
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
