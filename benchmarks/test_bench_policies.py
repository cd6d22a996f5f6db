"""Inference cost of every registered learned policy, and a reference matmul that the comparison
step (benchmarks/compare.py, rule in divla_eval/regression.py) divides every median by, so that a
slower or faster machine cancels.

Policies are built as `divla-eval bench` builds them (divla_eval.timing): the checkpoint the repository
ships (DiVLA), else the untrained default config; one torch thread; the same rendered observation.
A policy registered later (OpenVLA, Octo) is benchmarked without a change here.
"""

import pytest

torch = pytest.importorskip("torch")

from divla_eval.regression import benchmarked_policies, reference_call  # noqa: E402
from divla_eval.timing import SceneObservations, build_policy, image_size_of  # noqa: E402

THREADS = 1
LEARNED = (
    benchmarked_policies()
)  # also what tests/test_regression_gate.py expects results/bench_sim.json to hold


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    """name -> policy, or the exception its build raised (reported by that policy's benchmark only)."""
    torch.set_num_threads(THREADS)
    work = tmp_path_factory.mktemp("policies")
    built = {}
    for name in LEARNED:
        try:
            built[name] = build_policy(name, "bin_picking", workdir=work)[0]
        except Exception as exc:
            built[name] = exc
    return built


@pytest.fixture(scope="module")
def scene(policies):
    # made after every policy is built: an untrained build collects a demo with its own renderer
    s = SceneObservations("bin_picking")
    yield s
    s.close()


def test_reference_matmul(benchmark):
    """512 x 512 float32 matmul on one thread: the yardstick for machine speed (the same call that
    `divla-eval regression` times, `divla_eval.regression.reference_call`)."""
    call, label = reference_call()
    assert label.startswith("torch.mm")
    benchmark(call)


@pytest.mark.parametrize("name", LEARNED)
def test_policy_infer(timed, policies, scene, name):
    policy = policies[name]
    if isinstance(policy, Exception):
        raise policy
    torch.set_num_threads(THREADS)
    obs = scene.get(policy.metadata.cameras, image_size_of(policy))
    policy.reset(obs.instruction, 0)
    for _ in range(3):  # warm-up
        policy.infer(obs)
    chunk = timed(policy.infer, obs)
    assert len(chunk.actions) >= 1
