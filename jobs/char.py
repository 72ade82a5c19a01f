"""Char-level LSTM text generation (the Keras char-LSTM example) as a Ray Train job.

python jobs/char.py                                   # train on Nietzsche (downloaded once)
python jobs/char.py --data-dir DIR --epochs 5         # a local copy of nietzsche.txt
python jobs/char.py --corpus my.txt --num-workers 2   # any UTF-8 text file
python jobs/char.py --corpus-name tinyshakespeare
python jobs/char.py sample --checkpoint runs/char-... --seed-text "the meaning of" --temperature 0.5
"""

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lstm.cli import train_main  # noqa: E402
from lstm.errors import run_cli  # noqa: E402


def sample_main(argv: Sequence[str]) -> int:
    """``sample``: continue a seed text from a saved run and print it."""
    from lstm.tasks.char_trained import sample_from_checkpoint

    p = argparse.ArgumentParser(
        prog="jobs/char.py sample",
        description="Generate text from a saved char run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a run folder (its newest checkpoint) or a checkpoint_* folder")
    p.add_argument("--seed-text", required=True, help="text to continue (lower-cased if the run lower-cased)")
    p.add_argument("--temperature", type=float, default=0.5, help="diversity: log(p)/T, renormalised")
    p.add_argument("--length", type=int, default=400, help="characters to generate")
    p.add_argument("--seed", type=int, default=0, help="random seed of the draws")
    args = p.parse_args(argv)
    text = sample_from_checkpoint(
        args.checkpoint, args.seed_text, temperature=args.temperature, length=args.length, seed=args.seed
    )
    print(args.seed_text + text)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """No sub-command: train (all flags of lstm.cli); ``sample``: generate from a checkpoint."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sample":
        return sample_main(argv[1:])
    return train_main("char", argv)


if __name__ == "__main__":
    run_cli(main)
