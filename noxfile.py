"""Developer sessions. `nox -s tests` is the default suite (what CI runs); the others are separate.

Each session installs the project the same way README.md does: torch first from its pinned CPU wheel
(an unpinned torch pulls a multi-GB CUDA build), then the project with its test extras.
"""

from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.default_venv_backend = "venv"

TORCH = "torch==2.13.0"


def _install(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[test]")


@nox.session
def tests(session: nox.Session) -> None:
    """The fast default suite (slow tests excluded by the pytest config)."""
    _install(session)
    session.run("pytest", "-q", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """Tests marked slow: e.g. the scripted expert on every unseen object."""
    _install(session)
    session.run("pytest", "-q", "-m", "slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


BENCH_BASELINE = "results/bench_sim.json"
BENCH_LATEST = ".benchmarks/latest.json"


def _benchmarks(session: nox.Session, json_out: str) -> None:
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    session.run(
        "pytest",
        "benchmarks",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--benchmark-json={json_out}",
        "--benchmark-columns=min,median,mean,max,rounds",
        *session.posargs,
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks compared with the stored baseline (pytest-benchmark; not part of `tests`).

    Env step, camera frame (target <= 5 ms at the policy resolution), every learned policy's inference
    call and a reference matmul; each median, in units of the matmul's (timed between its rounds), is
    compared with the baseline (benchmarks/compare.py, docs/regression.md): fails past 2x in the run and
    in a rerun of that benchmark, and on a benchmark the baseline lacks. Exit 1: a regression."""
    _install(session)
    _benchmarks(session, BENCH_LATEST)
    session.run("python", "benchmarks/compare.py", BENCH_LATEST, BENCH_BASELINE, "--confirm")


@nox.session
def bench_baseline(session: nox.Session) -> None:
    """Run the benchmarks and store them as the baseline `bench` compares with (results/bench_sim.json)."""
    _install(session)
    _benchmarks(session, BENCH_BASELINE)


@nox.session
def regression(session: nox.Session) -> None:
    """Success rates on a small fixed grid against results/regression_baseline.json.

    The shipped DiVLA and Diffusion Policy checkpoints and the scripted expert (scripts/regression.py,
    divla_eval/regression.py): a cell fails when its rate fell by a one-sided 5% test (docs/regression.md)
    or its stored entry is missing or stale; `nox -s regression -- --update` stores a new baseline,
    `-- --cells NAME --update` one cell anew."""
    _install(session)
    session.run("python", "scripts/regression.py", *session.posargs)


# The long reference sessions run named experiments (divla_eval/experiments.py) with the project's own
# venv, as `divla-eval experiment NAME` does: `divla-eval experiment ls` lists them.
DIVLA_EVAL = ".venv/bin/divla-eval"


@nox.session(python=False)
def experiment(session: nox.Session) -> None:
    """Any named experiment: `nox -s experiment -- NAME [--stage S] [--dry-run]` (resumable)."""
    session.run(DIVLA_EVAL, "experiment", *(session.posargs or ["ls"]), external=True)


@nox.session(python=False)
def reference(session: nox.Session) -> None:
    """The scripted-expert reference grid (hours on 2 cores; resumable): results/experts/.
    `nox -s reference -- experts-sorting` runs one of its two experiments."""
    for name in session.posargs or ["experts", "experts-sorting"]:
        session.run(DIVLA_EVAL, "experiment", name, external=True)


@nox.session(python=False)
def divla_reference(session: nox.Session) -> None:
    """Demos, training, fp16 export and evaluation of the shipped DiVLA checkpoint (~1 h 45 min)."""
    stages = ["--stage", "collect,train,eval"]
    session.run(DIVLA_EVAL, "experiment", "divla-bin_picking", *stages, *session.posargs, external=True)
