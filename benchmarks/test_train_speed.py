"""End-to-end Atari training steps/s: dqn_fast against a CleanRL-style loop
(same network and hyperparameters, SB3's buffer, one gymnasium-wrapped env).
`dqn-fast bench --train` prints the same comparison."""

import pytest

pytest.importorskip("ale_py")
pytest.importorskip("stable_baselines3")

from dqn_fast.bench.train_speed import cleanrl_style, ours  # noqa: E402


def test_dqn_fast_training_steps(benchmark):
    result = benchmark.pedantic(ours, args=(400,), rounds=3, iterations=1)
    benchmark.extra_info.update(result)


def test_cleanrl_style_training_steps(benchmark):
    result = benchmark.pedantic(cleanrl_style, args=(400,), rounds=3, iterations=1)
    benchmark.extra_info.update(result)
