"""Do the successes of run directories last once the robot stops? (divla_eval/persistence.py)

    .venv/bin/python scripts/success_persists.py RUN_DIR [RUN_DIR ...] [--hold 40]

Re-runs every successful episode of each run, freezes the robot for --hold steps and judges the task
again; prints one line per episode and a count per run. Exit status 1 when a success does not
reproduce or does not last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from divla_eval.errors import DivlaEvalError
from divla_eval.persistence import HOLD_STEPS, check_run


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--hold", type=int, default=HOLD_STEPS, help="frozen steps after the success")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    failed = False
    for run_dir in args.run_dirs:
        try:
            results = check_run(run_dir, args.hold, progress=not args.no_progress)
        except DivlaEvalError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for r in results:
            print(
                f"{r.episode_key}: recorded {r.recorded_steps} steps, re-run {r.rerun_steps}"
                f"{'' if r.reproduced else ' (NOT REPRODUCED)'}; "
                f"{'lasts' if r.persists else 'DOES NOT LAST'} {args.hold} frozen steps"
            )
        lasting = sum(r.reproduced and r.persists for r in results)
        print(f"{run_dir}: {lasting} of {len(results)} successes reproduce and last {args.hold} frozen steps")
        failed |= lasting < len(results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
