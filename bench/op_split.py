"""Where a CPU training step's time goes, by operator: what ``matmul_fraction`` leaves unsaid.

``bench/ptb_speed.py --profile-steps N`` runs the job's step N more times under
``torch.profiler`` and splits the time of its operators three ways. Each operator counts its
own time (the profiler's ``self_cpu_time_total``: wall time on the calling thread less its
child operators', so an intra-op parallel kernel counts once), and the parts add up to the
profiled steps' time:

* ``matrix products``: ``aten::mm``/``addmm``/``bmm``/``baddbmm`` -- on the PTB step, the
  softmax layer's three products (its LSTM's products run inside the next group's kernels);
* ``LSTM kernels``: the RNN kernels and their autograd nodes (oneDNN's ``mkldnn_rnn_layer``
  and its backward on a CPU): the LSTM's products and its gate arithmetic, not separable;
* ``other``: everything else -- softmax, clipping, the optimizer's update, the embedding's
  gradient, copies, Python-side bookkeeping -- with its largest operators listed.

CPU only: on a GPU the profiler's CPU times are launch times, not the device's work.
"""

from __future__ import annotations

from typing import Any, Callable

from torch.profiler import ProfilerActivity, profile

MATRIX_PRODUCTS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})
TOP_OTHER = 8  # operators of the "other" group listed by name


def group_of(op: str) -> str:
    if op in MATRIX_PRODUCTS:
        return "matrix products"
    return "LSTM kernels" if "rnn" in op.lower() else "other"


def split(self_us: dict[str, float], steps: int) -> dict[str, Any]:
    """Per-step milliseconds and shares of each group, from each operator's self CPU time in
    microseconds over ``steps`` steps; the ``other`` group's largest operators by name."""
    total = sum(self_us.values())
    groups: dict[str, float] = {"matrix products": 0.0, "LSTM kernels": 0.0, "other": 0.0}
    for op, us in self_us.items():
        groups[group_of(op)] += us
    other = sorted(((us, op) for op, us in self_us.items() if group_of(op) == "other"), reverse=True)
    return {
        "profiled_steps": steps,
        "ms_per_step": round(total / steps / 1000, 2),
        "share": {name: round(us / total, 3) for name, us in groups.items()},
        "ms_per_step_by_group": {name: round(us / steps / 1000, 2) for name, us in groups.items()},
        "other_top_share": {op: round(us / total, 3) for us, op in other[:TOP_OTHER]},
        "other_ops": len(other),
    }


def op_split(run: Callable[[int], Any], steps: int) -> dict[str, Any]:
    """:func:`split` of ``run(steps)`` (a trainer of ``bench/ptb_speed.py``) under the profiler."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(steps)
    return split({e.key: e.self_cpu_time_total for e in prof.key_averages()}, steps)
