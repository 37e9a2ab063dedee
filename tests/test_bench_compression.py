"""The compression benchmark's pieces on real Atari frames: the recorder is
deterministic for a seed and stores what the env showed, replays are
consistent transitions (stacks shift by one frame, next_obs is the next
obs unless the episode ended, loops start a new episode), and every
compressed peer's adapter returns what it was fed (or, where its project
documents a difference, exactly that difference)."""

import numpy as np
import pytest
import torch

from dqn_fast.bench import atari_frames as A
from dqn_fast.bench import compression as CB
from dqn_fast.bench import peers as P
from dqn_fast.bench import peers_compression as C
from dqn_fast.bench import report_compression as R
from test_bench_peers import exact, feed, key, sb3_optimized, tianshou

K = A.K


@pytest.fixture(scope="module")
def breakout(tmp_path_factory):
    """400 steps: random Breakout episodes last about 130-280 steps, so some end inside."""
    return A.recording("Breakout", 400, seed=5, out_dir=str(tmp_path_factory.mktemp("frames")))


# --------------------------------------------------------------------------- recorder
def test_the_recorder_is_deterministic_for_a_seed_and_stores_frames_once():
    a, b = A.record("Pong", 200, seed=1), A.record("Pong", 200, seed=1)
    for field in ("frames", "frame", "start", "action", "reward", "terminated", "truncated"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.frames.dtype == np.uint8 and a.frames.shape[1:] == (84, 84)
    assert a.steps == 200 and a.frames.shape[0] == 200 + a.episodes  # each step's frame, each episode's reset frame
    assert a.action.dtype == np.int64 and a.reward.dtype == np.float32
    assert a.truncated[-1] or a.terminated[-1]  # the recording's end closes its episode
    assert np.all(np.diff(a.frame) >= 1) and np.all(a.start <= a.frame - 1)
    assert a.frames.std() > 0  # real pictures, not a blank screen
    c = A.record("Pong", 200, seed=2)
    assert not np.array_equal(a.action, c.action)


def test_recordings_are_cached_and_reused(tmp_path, monkeypatch):
    rec = A.recording("Breakout", 50, seed=3, out_dir=str(tmp_path))
    path = A.cache_path(str(tmp_path), "Breakout", 50, 3)
    assert path.endswith("atari-frames/Breakout-50-seed3.npz")
    monkeypatch.setattr(A, "record", lambda *a, **k: pytest.fail("recorded again instead of reusing the cache"))
    again = A.recording("Breakout", 50, seed=3, out_dir=str(tmp_path))
    assert np.array_equal(again.frames, rec.frames) and np.array_equal(again.frame, rec.frame)
    assert again.meta["policy"] == A.POLICY and again.meta["game"] == "Breakout"


# --------------------------------------------------------------------------- replay
def _episode_ends(rec):
    return np.flatnonzero(rec.terminated | rec.truncated)


def test_replayed_transitions_are_consistent_and_loop_into_a_new_episode(breakout):
    rec = breakout
    assert len(_episode_ends(rec)) >= 2  # an episode ended inside, and the recording's end
    envs = A.RecordedEnvs(rec, 1)
    prev = None
    for t in range(2 * rec.steps + 7):  # past the loop point twice
        obs, action, reward, nxt, term, trunc = envs.step()
        i = t % rec.steps
        assert obs.shape == nxt.shape == (1, K, 84, 84) and obs.dtype == nxt.dtype == np.uint8
        assert action[0] == rec.action[i] and reward[0] == rec.reward[i]
        assert term[0] == rec.terminated[i] and trunc[0] == rec.truncated[i]
        assert np.array_equal(nxt[0, :-1], obs[0, 1:])  # the stack shifts by one frame
        assert np.array_equal(nxt[0, -1], rec.frames[rec.frame[i]])  # the env's new frame
        if prev is not None:
            p_nxt, p_done = prev
            if p_done:  # a reset: the first frame repeated, not the old episode's final obs
                assert all(np.array_equal(obs[0, j], obs[0, 0]) for j in range(K))
            else:
                assert np.array_equal(obs, p_nxt)
        prev = (nxt, bool(term[0] or trunc[0]))
        if i == rec.steps - 1:
            assert term[0] or trunc[0]  # the loop point ends the episode
    assert envs.produced == 2 * rec.steps + 7


def test_eight_envs_replay_the_recording_in_order_from_their_offsets(breakout):
    rec = breakout
    envs = A.RecordedEnvs(rec, 8, offset=11)
    singles = [A.RecordedEnvs(rec, 1, offset=11 + e * (rec.steps // 8)) for e in range(8)]
    for _ in range(rec.steps // 8 + 30):  # env 7 crosses the loop point
        many = envs.step()
        for e, single in enumerate(singles):
            one = single.step()
            for a, b in zip(many, one):
                assert np.array_equal(a[e], b[0])
    n = sum(1 for _ in A.transitions(rec, 100, num_envs=8))
    assert n == 13  # whole steps of 8 envs


def test_concatenated_recordings_play_back_to_back(breakout):
    pong = A.record("Pong", 60, seed=0)
    both = A.concat([breakout, pong])
    assert both.steps == breakout.steps + pong.steps and len(both.frames) == len(breakout.frames) + len(pong.frames)
    envs = A.RecordedEnvs([breakout, pong], 1)
    for _ in range(breakout.steps):
        *_, nxt, term, trunc = envs.step()
    assert term[0] or trunc[0]
    obs = envs.step()[0]
    assert np.array_equal(obs[0, -1], pong.frames[0])  # Pong's reset frame follows Breakout's last step


# --------------------------------------------------------------------------- adapters on real frames
def expected(cls, per_env, cap_per_env):
    out = set()
    for stream in per_env:
        live = stream[-cap_per_env:]
        if issubclass(cls, C.SB3Extra):
            out |= sb3_optimized(live, len(stream) >= cap_per_env, stream[-1]["next_obs"])
        elif issubclass(cls, P.Tianshou):
            out |= tianshou(live, K)
        else:
            out |= exact(live)
    return out


def sampled(peer, draws, batch=32):
    got = set()
    for _ in range(draws // batch + 1):
        obs, action, reward, nxt, done = (x.numpy() for x in peer.sample(batch))
        got.update(key(obs[i], action[i], reward[i], nxt[i], done[i]) for i in range(batch))
    return got


CASES = [(cls, n, False) for cls in C.COMPRESSION_PEERS for n in (1, 3) if cls.supports(n) is None]
CASES += [(cls, n, True) for cls in C.OURS for n in (1, 3)]  # window mode


@pytest.mark.parametrize("cls,num_envs,window", CASES,
                         ids=[f"{c.name}{' window' if w else ''}-{n}env" for c, n, w in CASES])
@pytest.mark.parametrize("steps", [40, 200], ids=["partial", "wrapped"])
def test_adapter_returns_the_transitions_it_was_fed_from_real_frames(cls, num_envs, window, steps, breakout):
    assert cls.missing() is None, f"{cls.name}: {cls.missing()} (the test extra installs every peer)"
    assert C.unavailable(cls) is None, C.unavailable(cls)
    capacity = 90  # 30 per env with 3 envs
    first_end = int(_episode_ends(breakout)[0])
    envs = A.RecordedEnvs(breakout, num_envs, offset=max(0, first_end - steps // (2 * num_envs)))  # crosses an end
    peer = cls(capacity, envs.obs_shape, K, num_envs, seed=1, **({"window": True} if window else {}))
    try:
        per_env = feed(peer, envs, steps // num_envs)
        assert any(t["term"] or t["trunc"] for s in per_env for t in s)
        want = expected(cls, per_env, capacity // num_envs)
        got = sampled(peer, 40 * len(want))
        assert got == want, f"{len(got - want)} unexpected, {len(want - got)} never sampled"
        obs, action, reward, nxt, done = peer.sample(5)
        assert obs.shape == nxt.shape == (5, K, 84, 84) and obs.dtype == nxt.dtype == torch.uint8
        assert action.shape == reward.shape == done.shape == (5,)
        pay = C.payload(peer)
        if isinstance(peer, C.DqnFastCompressed):
            assert pay["compression"] == cls.compression and pay["nbytes"] > 0 and pay["len"] == len(peer.buf)
            if cls.compression:
                assert 0 < pay["frame_memory_used"] <= pay["frame_memory"]
                raw = (capacity + K) * 84 * 84
                assert pay["frame_memory_used"] < raw / 2, "real frames should compress"
    finally:
        peer.close()


def test_missing_peers_are_reported_not_dropped(monkeypatch, tmp_path):
    monkeypatch.setattr(C.SB3ExtraZstd, "modules", ("no_such_module_dqn_fast",))
    direct = lambda fn, *args, env=None: fn(*args)  # noqa: E731  (no child processes needed here)
    s = {**CB.sizes(True), "out_dir": str(tmp_path), "games": ["Breakout"], "record_steps": 30}
    r = CB.run_compression(s, direct, {"default": {}}, log=lambda m: None, only=["sb3-extra-buffers zstd-3"])
    assert r["peers"] == {"sb3-extra-buffers zstd-3": {"missing": "not installed (pip install sb3-extra-buffers[zstd])"}}
    assert "not installed (pip install sb3-extra-buffers[zstd])" in R.format_table(r)
    assert all(g["met"] is None for g in r["goals"])  # nothing measured, nothing claimed


TINY = dict(games=["Breakout"], record_steps=300, capacity=300, add_capacity=100, add_steps_1env=20, add_steps_8env=4,
            repeats=2, calls={32: 2, 256: 1}, round_s=0.0, ratio_capacity=400)


def test_the_benchmark_end_to_end_on_tiny_sizes(tmp_path):
    """Child processes, both allocator states, the goals, the table and the plot."""
    from dqn_fast.bench.suite import ALLOCATOR_STATES, in_child

    s = {**CB.sizes(True), **TINY, "out_dir": str(tmp_path)}
    r = CB.run_compression(s, in_child, ALLOCATOR_STATES, log=lambda m: None,
                           only=["dqn_fast lz4", "cpprb next_of+stack_compress", "compression-ratio"])
    lz4 = r["peers"]["dqn_fast lz4"]
    row = lz4["default"]["games"]["Breakout"]
    mem = row["memory"]
    assert mem["capacity"] == 300 and mem["rss_bytes_per_transition"] > 0 and mem["frame_memory_used"] > 0
    assert row["sample_32"]["per_s"] > 0 and row["sample_32"]["window_per_s"] > 0
    assert len(row["sample_256"]["repeats"]) == TINY["repeats"]
    assert row["add_1env"]["per_s"] > 0 and row["add_8env"]["over_1env"] > 0
    assert lz4["warm"]["malloc_env"] and "memory" not in lz4["warm"]["games"]["Breakout"]
    cpprb = r["peers"]["cpprb next_of+stack_compress"]["default"]["games"]["Breakout"]
    assert cpprb["sample_32"]["beside"]["dqn_fast lz4"]["speedup"] > 0
    assert "add_8env" not in cpprb and cpprb["add_1env"]["beside"]["dqn_fast lz4"]["speedup"] > 0
    ratio = r["ratio"]["default"]["games"]["Breakout"]
    assert ratio["sample_32"]["dqn_fast lz4"]["over_uncompressed"] > 0
    assert ratio["sample_256"]["dqn_fast zstd"]["window_over_uncompressed"] > 0
    assert "fill_10m" not in r  # full runs only
    kinds = {(g["goal"], g["config"]) for g in r["goals"]}
    assert ("a", "dqn_fast lz4") in kinds and ("d", "dqn_fast lz4") in kinds
    d = next(g for g in r["goals"] if g["goal"] == "d" and g["config"] == "dqn_fast lz4" and "batch" not in g)
    assert d["best_peer"] == {"Breakout": "cpprb next_of+stack_compress"} and d["met"] is not None
    table = R.format_table({"compression": r})
    assert "Breakout" in table and "dqn_fast lz4" in table and "Goals (issue #11)" in table
    assert "| **dqn_fast lz4** |" in R.markdown({"compression": r})
    data = open(R.plot({"compression": r}, str(tmp_path))[0], "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_dqn_fast_bench_runs_the_compression_rows_with_every_peer_or_when_named():
    from dqn_fast.bench import _runs_compression

    assert _runs_compression(None)
    assert not _runs_compression(["dqn_fast", "SB3", "cpprb next_of+stack_compress"])  # the suite's rows only
    assert _runs_compression(["compression-10m"]) and _runs_compression(["sb3-extra-buffers zstd-3"])
    lz4_only = CB._wanted(["dqn_fast lz4"])
    assert lz4_only("dqn_fast lz4") and not lz4_only("dqn_fast zstd") and not lz4_only("compression-10m")
    ours = CB._wanted(["dqn_fast"])
    assert ours("dqn_fast zstd") and ours("compression-ratio") and not ours("Tianshou")
