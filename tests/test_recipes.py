"""The shell recipes every reference script shares (scripts/lib/recipes.sh): which cells a policy is
scored on decides which rows of the paper tables can be compared, so the selection is tested here."""

from __future__ import annotations

import subprocess
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "scripts" / "lib" / "recipes.sh"


def cells(task: str, cells_filter: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"}
    if cells_filter is not None:
        env["CELLS"] = cells_filter
    script = (
        f'set -euo pipefail; source "{RECIPES}"; recipe {task}; '
        'for c in "${cells[@]}"; do cell_name "$c"; done'
    )
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)


def test_every_task_has_its_cells():
    assert cells("sorting").stdout.split() == ["easy-seen", "easy-mixed", "hard-seen", "hard-mixed"]
    assert cells("bussing").stdout.split() == ["seen", "mixed"]
    assert len(cells("multitask").stdout.split()) == 5


def test_cells_filter_keeps_only_the_named_cells_in_table_order():
    out = cells("sorting", "easy-mixed easy-seen")
    assert out.returncode == 0
    assert out.stdout.split() == ["easy-seen", "easy-mixed"]


def test_cells_filter_naming_no_cell_fails_and_lists_the_valid_ones():
    out = cells("bussing", "hard-seen")
    assert out.returncode == 2
    assert "seen mixed" in out.stderr
    assert out.stdout == ""


def test_unknown_task_names_the_valid_ones():
    out = cells("sortin")
    assert out.returncode != 0
    assert "bin_picking, multitask, sorting, bussing" in out.stderr
