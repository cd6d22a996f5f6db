"""Success-rate regression check: rerun a fixed small episode grid and compare with stored rates.

    python scripts/regression.py                 # run the grid fresh, compare, exit 1 on a regression
    python scripts/regression.py --update        # run it and store the rates as the new baseline
    python scripts/regression.py --cells A --update   # store cell A anew, keep the others
    python scripts/regression.py --no-run        # compare the run directories already in --out

The grid (`CELLS`), the rule and the code live in divla_eval/regression.py (also `python -m
divla_eval.regression`): a cell fails when its new rate is below the stored one by a one-sided 5% test
that counts both runs' sampling noise (the 90% Newcombe interval of new - stored, from the two Wilson
intervals, lies below 0), and when its stored entry is missing or stale (another task version or
checkpoint). Each cell is an ordinary `divla-eval run` (runs/regression/<cell>/, readable with
`divla-eval report`). Exit codes: 0 pass, 1 regression or stale baseline, 2 bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from divla_eval.regression import grid_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(grid_main())
