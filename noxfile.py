"""Developer sessions. `nox -s tests` is the default suite (what CI runs); the others are separate.

Each session installs the project the same way README.md does: torch first from its pinned CPU wheel
(an unpinned torch pulls a multi-GB CUDA build), then the project with its test extras.
"""

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


@nox.session
def bench(session: nox.Session) -> None:
    """pytest-benchmark: env step, camera frame (target <= 5 ms at the policy resolution)."""
    _install(session)
    session.run(
        "pytest",
        "benchmarks",
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-json=results/bench_sim.json",
        "--benchmark-columns=min,median,mean,max,rounds",
        *session.posargs,
    )


@nox.session(python=False)
def reference(session: nox.Session) -> None:
    """The scripted-expert reference grid (hours on 2 cores; resumable): results/experts/."""
    session.run("bash", "scripts/reference_runs.sh", *session.posargs, external=True)


@nox.session(python=False)
def divla_reference(session: nox.Session) -> None:
    """Demos, training, fp16 export and evaluation of the shipped DiVLA checkpoint (~1 h 45 min)."""
    session.run("bash", "scripts/divla_reference.sh", external=True)
