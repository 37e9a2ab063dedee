"""The trainer end to end: it learns CartPole, runs the whole Atari pipeline,
checkpoints atomically, resumes, and its command line fails politely."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dqn_fast import ReplayBuffer
from dqn_fast import train as train_mod
from dqn_fast.networks import Dueling
from dqn_fast.train import Config, Trainer, evaluate, train


def test_cartpole_recipe_reaches_195(tmp_path):
    cfg = Config.for_env("CartPole-v1", seed=1, run_dir=str(tmp_path), progress=False)
    assert (cfg.total_steps, cfg.n_step, cfg.prioritized) == (60_000, 3, True)
    summary = train(cfg)
    assert summary["steps"] == 60_000
    result = evaluate(str(tmp_path / "checkpoint.pt"), episodes=20, seed=123)
    assert result["episodes"] == 20 and len(result["returns"]) == 20
    assert result["mean_return"] >= 195, result
    rows = (tmp_path / "progress.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 1 + 60_000 // cfg.log_interval
    # A share of wall time: timing belongs in benchmarks, so only its range is checked here.
    assert 0.0 < summary["replay_share"] < 1.0


def short_cartpole(tmp_path, **kw):
    values = dict(total_steps=1500, learning_starts=200, run_dir=str(tmp_path), progress=False, log_interval=500, checkpoint_interval=10**9)
    values.update(kw)
    return Config.for_env("CartPole-v1", **values)


def test_same_seed_same_run(tmp_path):
    runs = []
    for name in ("a", "b"):
        trainer = Trainer(short_cartpole(tmp_path / name, seed=7))
        trainer.run()
        runs.append(trainer.agent.online.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_atari_pipeline_end_to_end_with_resume_and_eval(tmp_path):
    cfg = Config.for_env(
        "ALE/Pong-v5",
        total_steps=1200,
        num_envs=4,
        buffer_size=3000,
        learning_starts=400,
        target_update_interval=25,
        checkpoint_interval=600,
        log_interval=400,
        run_dir=str(tmp_path),
        progress=False,
        seed=3,
    )
    trainer = Trainer(cfg)
    initial_target = [p.clone() for p in trainer.agent.target.parameters()]
    summary = trainer.run()
    assert summary["steps"] == 1200 and len(trainer.buffer) == 1200
    assert trainer.buffer.frames_written < 1.2 * 1200  # frames stored once, not stacked
    assert trainer.agent.updates == (1200 - 400) // 4 + 1
    assert not all(torch.equal(a, b) for a, b in zip(initial_target, trainer.agent.target.parameters()))
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["global_step"] == 1200 and saved["agent"]["updates"] == trainer.agent.updates

    resumed = Trainer(Config(**{**cfg.__dict__, "total_steps": 1600, "resume": True}))
    summary = resumed.run()
    assert summary["resumed"] and summary["steps"] == 1600
    # the buffer restarts empty: learning waits for learning_starts fresh steps
    # (steps 1200-1600), then the first update after the restart
    assert resumed.agent.updates == trainer.agent.updates + 1
    assert len(resumed.buffer) == 400
    assert [int(r.split(",")[0]) for r in (tmp_path / "progress.csv").read_text().splitlines()[1:]] == [400, 800, 1200, 1600]

    out = subprocess.run(
        [sys.executable, "-m", "dqn_fast.cli", "eval", str(tmp_path / "checkpoint.pt"), "--episodes", "1", "--json"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"mean_return", "std_return", "episodes", "env"} <= set(result)
    assert result["env"] == "ALE/Pong-v5" and result["episodes"] == 1
    assert -21 <= result["mean_return"] <= 21 and float(result["mean_return"]).is_integer()  # raw game score


def test_compressed_atari_buffer_trains_and_resumes_with_its_arena(tmp_path):
    # `dqn-fast train --compress lz4`: real Pong frames coded into the arena,
    # saved with the checkpoint and continued after resume.
    cfg = Config.for_env("ALE/Pong-v5", total_steps=600, num_envs=2, buffer_size=2000, learning_starts=300,
                         run_dir=str(tmp_path), progress=False, seed=4, compress="lz4", save_buffer=True,
                         checkpoint_interval=600, log_interval=300)
    trainer = Trainer(cfg)
    trainer.run()
    buf = trainer.buffer
    assert buf.compression == "lz4" and len(buf) == 600
    assert buf.frame_memory_used < buf.frames_written * 7056 / 8  # real frames code far below raw
    resumed = Trainer(Config(**{**cfg.__dict__, "total_steps": 800, "resume": True}))
    resumed.run()
    assert resumed.buffer.compression == "lz4" and len(resumed.buffer) == 800  # the saved arena, continued


def test_resume_with_the_saved_buffer_learns_on_without_refilling(tmp_path):
    first = Trainer(short_cartpole(tmp_path, total_steps=1500, save_buffer=True))
    first.run()
    assert (tmp_path / "replay.dqnf").exists()
    resumed = Trainer(short_cartpole(tmp_path, total_steps=2000, save_buffer=True, resume=True))
    summary = resumed.run()
    assert summary["resumed"] and len(resumed.buffer) == 2000
    assert resumed.agent.updates == first.agent.updates + 500  # one per step, no refill pause


def test_a_crash_mid_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    trainer = Trainer(short_cartpole(tmp_path, total_steps=300))
    trainer.run()
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()

    def crash(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(train_mod.torch, "save", crash)
    trainer.global_step += 1
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    assert path.read_bytes() == good
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dqn_fast.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_command_line_errors_are_one_line_not_tracebacks(tmp_path):
    for args, message in [
        (["train", "--env", "NoSuchEnv-v0", "--no-progress"], "unknown env id"),
        (["train", "--env", "ALE/NoSuchGame-v5", "--no-progress"], "no ROM named"),
        (["train", "--device", "cuda:0", "--no-progress"], "torch sees no CUDA device" if not torch.cuda.is_available() else None),
        (["eval", str(tmp_path / "missing.pt")], "No such file"),
    ]:
        if message is None:
            continue
        out = cli(*args, cwd=tmp_path)
        assert out.returncode == 2, out
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = cli("train", "--bogus-flag", cwd=tmp_path)
    assert out.returncode == 2 and "unrecognized arguments: --bogus-flag" in out.stderr


def test_every_hyperparameter_has_a_flag_with_help(tmp_path):
    out = cli("train", "--help", cwd=tmp_path)
    for name in Config.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in out.stdout, name


@pytest.mark.parametrize("slow_threads", [1, 2])
def test_thread_tuner_keeps_the_faster_thread_count(slow_threads, monkeypatch):
    monkeypatch.setattr(train_mod.os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    now = [0.0]  # a fake clock: updates take 4 units with the slow count, 1 otherwise
    try:
        tuner = train_mod.ThreadTuner(0, trial=3, every=10, clock=lambda: now[0])
        assert tuner.candidates == [1, 2]

        def update():
            now[0] += 4.0 if torch.get_num_threads() == slow_threads else 1.0
            return torch.get_num_threads()

        used = [tuner.run(update) for _ in range(6 + 10 + 6)]
        assert used[:6] == [1, 1, 1, 2, 2, 2]  # the trial
        assert set(used[6:16]) == {3 - slow_threads}  # then the faster count only
        assert used[16:] == [1, 1, 1, 2, 2, 2]  # and the trial again
        assert train_mod.ThreadTuner(3).candidates == [3]  # a fixed count is never tuned
    finally:
        torch.set_num_threads(before)


def test_recipes():
    atari = Config.for_env("ALE/Breakout-v5")
    assert (atari.buffer_size, atari.batch_size, atari.lr, atari.train_freq) == (1_000_000, 32, 1e-4, 4)
    assert (atari.target_update_interval, atari.eps_end, atari.exploration_fraction, atari.learning_starts) == (1000, 0.01, 0.1, 80_000)
    assert atari.loss == "huber" and atari.clip_rewards
    assert Config.for_env("ALE/Breakout-v5", lr=3e-4, batch_size=None).lr == 3e-4
    assert np.isclose(Config.for_env("CartPole-v1").eps_end, 0.05)


def test_replay_flags_parse_into_the_config():
    from dqn_fast.cli import build_parser, train_config

    args = build_parser().parse_args(
        "train --n-step 3 --prioritized --alpha 0.5 --beta0 0.3 --priority-eps 1e-5 --dueling --no-double-dqn "
        "--compress zstd --frame-memory 1000000".split()
    )
    cfg = train_config(args)
    assert (cfg.compress, cfg.frame_memory) == ("zstd", 1_000_000)
    assert (cfg.n_step, cfg.prioritized, cfg.alpha, cfg.beta0, cfg.priority_eps, cfg.dueling) == (3, True, 0.5, 0.3, 1e-5, True)
    assert cfg.double_dqn is False and cfg.env == "CartPole-v1"
    recipe = Config.for_env("CartPole-v1")
    plain = train_config(build_parser().parse_args(["train", "--no-prioritized"]))
    assert plain.prioritized is False and (plain.n_step, plain.dueling, plain.lr) == (recipe.n_step, recipe.dueling, recipe.lr)
    with pytest.raises(SystemExit):  # argparse rejects a non-integer n
        build_parser().parse_args(["train", "--n-step", "2.5"])


def test_beta_is_annealed_from_beta0_to_one_and_reaches_the_sampler(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="beta0"):
        Trainer(short_cartpole(tmp_path, beta0=1.5))
    trainer = Trainer(short_cartpole(tmp_path, total_steps=1000, beta0=0.2))
    for step, beta in ((0, 0.2), (500, 0.6), (1000, 1.0), (4000, 1.0)):
        trainer.global_step = step
        assert trainer.beta() == pytest.approx(beta)
    trainer.global_step = 0
    asked = []
    real_next = train_mod.Prefetcher.next

    def spy(self, beta=0.4):
        asked.append((trainer.global_step, beta))
        return real_next(self, beta)

    monkeypatch.setattr(train_mod.Prefetcher, "next", spy)
    trainer.run()
    assert len(asked) == trainer.agent.updates > 0
    assert all(beta == pytest.approx(0.2 + 0.8 * step / 1000) for step, beta in asked)


def replay_cartpole(tmp_path, **kw):
    return short_cartpole(tmp_path, n_step=3, prioritized=True, dueling=True, **kw)


def test_n_step_prioritized_dueling_trains_cartpole(tmp_path):
    trainer = Trainer(replay_cartpole(tmp_path, total_steps=1500, torch_threads=1))
    assert trainer.buffer.n_step == 3 and trainer.buffer.prioritized and trainer.buffer.gamma == trainer.cfg.gamma
    assert isinstance(trainer.agent.online.net[-1], Dueling)
    summary = trainer.run()
    assert summary["steps"] == 1500 and trainer.agent.updates == 1500 - 200 + 1
    assert np.isfinite(np.loadtxt(tmp_path / "progress.csv", delimiter=",", skiprows=1, usecols=3)).all()  # loss column
    # the TD errors reached the buffer: probabilities are far from uniform
    p = trainer.buffer.probabilities(np.arange(500, 1500))
    assert p.max() > 3 * p.min()
    assert trainer.buffer.max_priority != 1.0
    result = evaluate(str(tmp_path / "checkpoint.pt"), episodes=2, seed=5)  # rebuilds the dueling net
    assert len(result["returns"]) == 2 and all(r >= 1 for r in result["returns"])


def test_resume_keeps_n_step_priorities_and_the_pending_update(tmp_path):
    first = Trainer(replay_cartpole(tmp_path, total_steps=1500, save_buffer=True))
    first.run()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    ids, prios = saved["pending_priorities"]  # the last update: not in the buffer file yet
    assert len(ids) == first.cfg.batch_size and np.isfinite(prios).all()
    on_disk = ReplayBuffer.load(tmp_path / "replay.dqnf")
    assert (on_disk.n_step, on_disk.prioritized, on_disk.alpha) == (3, True, first.cfg.alpha)
    stored = np.arange(1500 - on_disk.capacity if len(on_disk) == on_disk.capacity else 0, 1500)
    without = on_disk.probabilities(stored)
    on_disk.update_priorities(ids, prios)

    resumed = Trainer(replay_cartpole(tmp_path, total_steps=2000, save_buffer=True, resume=True))
    assert resumed.restore()
    assert np.array_equal(resumed.buffer.probabilities(stored), on_disk.probabilities(stored))
    assert not np.array_equal(resumed.buffer.probabilities(stored), without)
    summary = Trainer(replay_cartpole(tmp_path, total_steps=2000, save_buffer=True, resume=True)).run()
    assert summary["resumed"] and summary["steps"] == 2000

    # a buffer of another n (or without priorities) is not reused
    with pytest.warns(UserWarning, match="refilling"):
        other = Trainer(short_cartpole(tmp_path, total_steps=2500, save_buffer=True, resume=True, n_step=2, prioritized=True, dueling=True))
        other.restore()
    assert len(other.buffer) == 0 and other.buffer.n_step == 2
