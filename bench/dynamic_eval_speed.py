"""The time of ``jobs/ptb.py score --dynamic`` on a checkpoint: the training statistics (rms),
then the scoring, per segment length, beside the static score of the same words.

    python bench/dynamic_eval_speed.py --checkpoint RUN --text ../shared/data/ptb/ptb.test.txt \\
        --data-dir ../shared/data/ptb --segment-lengths 5 20

One thread, as ``score`` runs at batch 1. Prints one JSON line: the static score's seconds,
and per segment length the statistics' and the scoring's wall and CPU seconds, the
milliseconds per segment and the perplexity (with the default step size and decay scaled to
the length as Krause et al.'s grid scales them: x N/5 from eta 5e-5, lambda 0.002). CPU
seconds are this process's: on a shared machine the wall is longer by what others took.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn):
    """(result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    import torch

    from lstm import dynamic_eval
    from lstm.data import ptb
    from lstm.task import perplexity
    from lstm.tasks.ptb_trained import load_trained, score_ids

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--data-dir", default=None, help="the PTB folder the run trained on")
    p.add_argument("--words", type=int, default=0, help="score only the first N words (0: all)")
    p.add_argument("--segment-lengths", type=int, nargs="+", default=[5, 20])
    args = p.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    trained = load_trained(args.checkpoint)
    ids = trained.vocab.encode(ptb.read_words(args.text)[: args.words or None], unknown="<unk>")
    train = dynamic_eval.training_ids(trained.vocab, trained.config.train_fraction, args.data_dir)
    (loss, tokens), wall, cpu = timed(lambda: score_ids(trained.model, ids, 1, trained.config.eval_shape[1]))
    out: dict = {"checkpoint": args.checkpoint, "text": args.text, "words": len(ids)}
    out["static"] = {"ppl": round(perplexity(loss, tokens), 3), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
    for n in args.segment_lengths:
        settings = dynamic_eval.DynamicSettings(segment_length=n, lr=5e-5 * n / 5, decay=0.002 * n / 5)
        _, stats_wall, stats_cpu = timed(lambda s=settings: dynamic_eval.gradient_rms(trained.model, train, s))
        (loss, tokens), wall, cpu = timed(lambda s=settings: dynamic_eval.score_dynamic(trained.model, ids, s, train))
        segments = -(-tokens // n)
        out[f"segments_of_{n}"] = {
            **{k: v for k, v in dataclasses.asdict(settings).items() if k in ("lr", "decay")},
            "ppl": round(perplexity(loss, tokens), 3),
            "stats_wall_s": round(stats_wall, 1),
            "stats_cpu_s": round(stats_cpu, 1),
            "wall_s": round(wall, 1),  # statistics included
            "cpu_s": round(cpu, 1),
            "ms_per_segment": round(1000 * (cpu - stats_cpu) / segments, 2),
        }
        print(f"segments of {n}: {out[f'segments_of_{n}']}", file=sys.stderr, flush=True)
    out["load_avg_1min"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
