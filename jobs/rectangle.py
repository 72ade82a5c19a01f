"""Generative LSTM that draws rectangles (and circles, stars, crosses) point by point.

python jobs/rectangle.py                      # the chapter: LSTM(10), MAE, 25,000 rectangles
python jobs/rectangle.py --config mdn         # mixture density head: diverse shapes
python jobs/rectangle.py --shape star --points-per-edge 2 --num-workers 2
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lstm.cli import train_main  # noqa: E402
from lstm.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda argv: train_main("rectangle", argv))
