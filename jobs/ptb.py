"""PTB word language model (Zaremba et al. 2014) trained by Ray Train on any number of workers.

    python jobs/ptb.py --config small --data-dir DIR       # the tutorial's small config, 13 epochs
    python jobs/ptb.py --config medium --num-workers 4     # 4 workers share the batch of 20 rows
    python jobs/ptb.py --config small --max-max-epoch 1    # any config field is a flag
    python jobs/ptb.py --config small --eval-batch-size 1 --eval-num-steps 1   # the tutorial's test eval
    python jobs/ptb.py --name my-run --resume              # continue an interrupted run

Without --data-dir (or $LSTM_DATA_DIR) it downloads Mikolov's simple-examples.tgz once into
~/.cache/lstm-ray. Prints one line per epoch (lr, train/valid perplexity, words/sec), and at the
end the test perplexity and where results.json, learning_curve.png and TensorBoard logs are.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lstm.cli import train_main  # noqa: E402
from lstm.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda argv: train_main("ptb", argv))
