"""PTB word language model (Zaremba et al. 2014; AWD-LSTM's regularizers) trained by Ray Train
on any number of workers, and a trained run's uses: score a text, generate one.

    python jobs/ptb.py --config small --data-dir DIR       # the tutorial's small config, 13 epochs
    python jobs/ptb.py --config medium --num-workers 4     # 4 workers share the batch of 20 rows
    python jobs/ptb.py --config small --max-max-epoch 1    # any config field is a flag
    python jobs/ptb.py --config small --eval-batch-size 1 --eval-num-steps 1   # the tutorial's test eval
    python jobs/ptb.py --config small-reg                  # 2 x 200, tied and regularized (CPU-sized)
    python jobs/ptb.py --config awd --gpu                  # AWD-LSTM's PTB command (docs/ptb-regularized.md)
    python jobs/ptb.py --name my-run --resume              # continue an interrupted run
    python jobs/ptb.py score --checkpoint RUN --text FILE  # perplexity of FILE; last line is JSON
    python jobs/ptb.py generate --checkpoint RUN --prompt "the company" --length 50 --temperature 0.8 --seed 1

Without --data-dir (or $LSTM_DATA_DIR) it downloads Mikolov's simple-examples.tgz once into
~/.cache/lstm-ray. Prints one line per epoch (lr, train/valid perplexity, words/sec), and at the
end the test perplexity and where results.json, learning_curve.png and TensorBoard logs are.
"""

import argparse
import json
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lstm.cli import train_main  # noqa: E402
from lstm.errors import run_cli  # noqa: E402

CHECKPOINT_HELP = "a run folder (its newest checkpoint) or a checkpoint_* folder, local or s3://..."


def score_main(argv: Sequence[str]) -> int:
    """``score``: perplexity of a text file under a saved run; the last line printed is JSON."""
    from lstm import config as cfg
    from lstm import dynamic_eval
    from lstm.tasks.ptb_trained import score_text

    p = argparse.ArgumentParser(
        prog="jobs/ptb.py score",
        description="Perplexity of a text under a saved PTB run (batch 1, state carried: the tutorial's test).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--text", required=True, help="a text file; each newline is <eos>, unknown words <unk>")
    p.add_argument("--batch-size", type=int, default=1, help="rows scored side by side (1: exact, context kept)")
    dynamic_eval.add_arguments(p)
    args = p.parse_args(argv)
    dynamic = dynamic_eval.settings_from(args, cfg.options_given(p, argv), args.batch_size)
    result = score_text(args.checkpoint, args.text, batch_size=args.batch_size, dynamic=dynamic)
    print(
        f"{result['tokens']:,} tokens ({result['unk']:,} words mapped to <unk>): perplexity {result['ppl']:.2f}"
        + (" (NT-ASGD's averaged weights)" if result["averaged_weights"] else "")
        + (" (dynamic evaluation)" if dynamic else "")
    )
    print(json.dumps(result))
    return 0


def generate_main(argv: Sequence[str]) -> int:
    """``generate``: sample words after a prompt from a saved run."""
    from lstm.tasks.ptb_trained import generate_text, render

    p = argparse.ArgumentParser(
        prog="jobs/ptb.py generate",
        description="Sample text from a saved PTB run (<eos> printed as a line break).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--prompt", required=True, help="words to continue (from the run's vocabulary: PTB is lower case)")
    p.add_argument("--length", type=int, default=50, help="words to sample")
    p.add_argument("--temperature", type=float, default=1.0, help="log(p)/T, renormalised; lower is more conservative")
    p.add_argument("--seed", type=int, default=0, help="random seed of the draws")
    args = p.parse_args(argv)
    words = generate_text(
        args.checkpoint, args.prompt, length=args.length, temperature=args.temperature, seed=args.seed
    )
    print(render(args.prompt.split() + words))
    return 0


COMMANDS = {"score": score_main, "generate": generate_main}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """No sub-command: train (all flags of lstm.cli); ``score`` or ``generate``: use a checkpoint."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return train_main("ptb", argv)


if __name__ == "__main__":
    run_cli(main)
