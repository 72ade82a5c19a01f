"""NT-ASGD (Merity et al. 2017): SGD that, once the global validation loss is worse than all but
the last ``nonmono`` epochs' (AWD-LSTM's trigger), keeps each parameter's mean over its steps
(``ASGD(t0=0, lambd=0)``'s) and is evaluated with it. All of it is in the ``state_dict``, so it
survives a resume, and every rank switches at the same epoch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch

AVERAGE = "average"  # the per-parameter state entry holding the running mean


class NTASGD(torch.optim.SGD):
    """Non-monotonically triggered averaged SGD; see the module docstring."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, *, nonmono: int = 5, weight_decay: float = 0.0):
        super().__init__(params, lr=lr, weight_decay=weight_decay)
        self.nonmono = nonmono
        self.losses: list[float] = []  # validation losses seen, one per epoch
        self.averaging = False
        self.averaged_steps = 0

    def observe(self, valid_loss: float) -> bool:
        """Record an epoch's validation loss; True when this loss triggers the switch."""
        trigger = (
            not self.averaging and len(self.losses) > self.nonmono and valid_loss > min(self.losses[: -self.nonmono])
        )
        self.losses.append(float(valid_loss))
        if trigger:
            self.averaging = True
        return trigger

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        if self.averaging:
            self.averaged_steps += 1
            params = self._params()
            if self.averaged_steps == 1:
                for p in params:
                    self.state[p][AVERAGE] = p.detach().clone()
            else:
                averages = [self.state[p][AVERAGE] for p in params]
                torch._foreach_lerp_(averages, [p.detach() for p in params], 1.0 / self.averaged_steps)
        return loss

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def swap_averages(self) -> None:
        """Exchange every parameter with its average (a second call undoes it); nothing before averaging."""
        if self.averaged_steps == 0:
            return
        for p in self._params():
            average = self.state[p][AVERAGE]
            kept = p.detach().clone()
            p.copy_(average)
            average.copy_(kept)

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """The parameters hold their averages inside the block (the model as NT-ASGD evaluates it)."""
        self.swap_averages()
        try:
            yield
        finally:
            self.swap_averages()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["nt_asgd"] = {"losses": list(self.losses), "averaging": self.averaging, "steps": self.averaged_steps}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        own = state_dict.pop("nt_asgd", {"losses": [], "averaging": False, "steps": 0})
        super().load_state_dict(state_dict)
        self.losses, self.averaging = [float(x) for x in own["losses"]], bool(own["averaging"])
        self.averaged_steps = int(own["steps"])


@torch.no_grad()
def load_averages(params: Iterable[torch.Tensor], state_dict: dict[str, Any]) -> bool:
    """Put a saved NT-ASGD ``state_dict``'s averages into ``params``; False, changing nothing, before averaging."""
    if not state_dict.get("nt_asgd", {}).get("steps"):
        return False
    ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    for p, i in zip(params, ids, strict=True):
        p.copy_(state_dict["state"][i][AVERAGE])
    return True
