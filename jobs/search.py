"""Ray Tune search over any task's hyperparameters (PTB's by default; --task picks another).

python jobs/search.py --base small --train-fraction 0.1 --max-epochs 4 --num-samples 8
python jobs/search.py --space keep_prob=0.4:1.0 hidden_size=200,650 learning_rate=log:0.5:2
python jobs/search.py --scheduler pbt --space learning_rate=log:0.25:2
python jobs/search.py --name tune-ptb-20250101-120000 --resume
python jobs/search.py --task rectangle --base test --space hidden_size=4,16 learning_rate=log:0.0001:0.05
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lstm.errors import run_cli  # noqa: E402
from tune.cli import main  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
