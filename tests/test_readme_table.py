"""`divla-eval tables --readme`: README's results table is generated between its markers, nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from divla_eval.cli import main
from divla_eval.errors import DivlaEvalError
from divla_eval.paper import MULTITASK_SUBTASKS
from divla_eval.readme_table import BEGIN, END, update_readme
from divla_eval.records import EpisodeRecord, EpisodeStore, write_manifest


def _record(run_id: str, split: str, i: int, success: bool, policy: str) -> EpisodeRecord:
    return EpisodeRecord(
        run_id=run_id,
        task="multitask",
        task_version="1",
        split=split,
        difficulty=None,
        episode_index=i,
        episode_key=f"multitask/{split}/-/none/{i:05d}",
        seed=i,
        object_ids=["pot"],
        instruction="do it",
        perturbations=[],
        policy=policy,
        checkpoint_hash=None,
        success=success,
        partial_score=float(success),
        failure_mode=None if success else "no_grasp",
        steps=50,
        wall_time_s=1.0,
        latency_ms={},
        reasoning_trace=[],
        status="ok",
        error=None,
    )


def _runs(root: Path) -> None:
    """One run directory per multitask sub-task for the random policy: 2 episodes, flip_pot 1 success."""
    for split in MULTITASK_SUBTASKS:
        run_dir = root / "random" / f"multitask-{split}"
        write_manifest(run_dir, {}, {"run_id": f"id-{split}"})
        store = EpisodeStore(run_dir / "episodes.jsonl")
        for i in range(2):
            store.append(_record(f"id-{split}", split, i, split == "flip_pot" and i == 0, "random"))


HEAD = "# Project\r\n\r\nIntro, kept byte for byte (CRLF too).\r\n\r\n## Results\r\n\r\n"
TAIL = "\r\n\r\nText after the table.\r\n"


def test_markers_are_replaced_and_the_rest_is_untouched(tmp_path: Path) -> None:
    _runs(tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_bytes(f"{HEAD}{BEGIN}\nan old table\n{END}{TAIL}".encode())
    update_readme(readme, tmp_path / "results")
    text = readme.read_bytes().decode()
    assert text.startswith(HEAD + BEGIN + "\n") and text.endswith("\n" + END + TAIL)
    block = text[len(HEAD + BEGIN) : -len(END + TAIL)]
    assert "an old table" not in block
    random_row = next(line for line in block.splitlines() if line.startswith("| random |"))
    # a cell per sub-task linked to its run directory, relative to the README; the average pooled
    assert "[1/2](results/random/multitask-flip_pot)" in random_row
    assert "[0/2](results/random/multitask-cube_in_box)" in random_row
    assert random_row.endswith("| 1/10 = 10.0% [1.8%-40.4%] |")
    assert "| divla | not run |" in block  # every paper policy is named, as in paper_tables.md
    assert "`divla-eval tables" in block and "Task versions: 1: random." in block
    # a second run changes nothing: the block is a function of the records
    update_readme(readme, tmp_path / "results")
    assert readme.read_bytes().decode() == text


@pytest.mark.parametrize(
    "content, needle",
    [
        (f"no markers at all\n{END}\n", f"has no '{BEGIN}' marker"),
        (f"{BEGIN}\n", f"has no '{END}' marker"),
        (f"{END}\n{BEGIN}\n", "comes before"),
        (f"{BEGIN}\n{BEGIN}\n{END}\n", f"has 2 '{BEGIN}'"),
    ],
)
def test_a_missing_marker_is_a_one_line_error_before_any_run_is_read(
    tmp_path: Path, content: str, needle: str, capsys
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(content)
    with pytest.raises(DivlaEvalError, match=needle):
        update_readme(readme, tmp_path / "no-results-here")
    # the CLI: one line, exit 2, README and the results folder untouched (it does not even exist)
    with pytest.raises(SystemExit) as exc:
        sys.exit(main(["tables", str(tmp_path / "no-results-here"), "--readme", str(readme)]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("divla-eval: error:") and needle in err[0]
    assert readme.read_text() == content


def test_the_cli_writes_both_the_tables_and_the_readme(tmp_path: Path, capsys) -> None:
    _runs(tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{BEGIN}\n{END}\nbottom\n")
    assert main(["tables", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    assert (tmp_path / "results" / "paper_tables.md").is_file()
    text = readme.read_text()
    assert text.startswith(f"top\n{BEGIN}\n") and text.endswith(f"\n{END}\nbottom\n")
    assert "[1/2](results/random/multitask-flip_pot)" in text
    assert "updated the results table" in capsys.readouterr().out
