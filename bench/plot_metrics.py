"""Draw a training run's metrics.jsonl (loss, KL, CE, grad norm, lr, tokens/s, completion length) into a PNG.

    python bench/plot_metrics.py runs/train/metrics.jsonl            # -> runs/train/metrics.png
    python bench/plot_metrics.py runs/train/metrics.jsonl -o curves.png

Needs matplotlib (pip install 'minissb[plot]'); `train.py --plot` does the same at the end of a run.
"""

import argparse
import sys
from pathlib import Path

from minissb.training import plot_metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", help="metrics.jsonl written by train.py")
    p.add_argument("-o", "--out", default=None, help="PNG to write (default: metrics.png next to the metrics file)")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else Path(a.metrics).with_suffix(".png")
    try:
        print(plot_metrics(a.metrics, out))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
