"""The benchmark compares like with like: on small streams every peer adapter
stores and returns the transitions the reference says it should, as torch
tensors of the same shapes and dtypes. Where a peer is documented to differ
(SB3's optimize_memory_usage, Tianshou's index-rebuilt stacks), the test
spells out exactly how, so the report's `exactness` column is checked too.
"""

import numpy as np
import pytest
import torch

from dqn_fast.bench import peers
from dqn_fast.bench.streams import AtariEnvs, VectorEnvs

K = 4


def key(obs, action, reward, next_obs, done):
    return (np.ascontiguousarray(obs).tobytes(), int(action), float(reward),
            np.ascontiguousarray(next_obs).tobytes(), bool(done))


def feed(peer, envs, steps):
    """Adds `steps` steps; returns each env's transitions in order, with the
    position of each transition in its episode."""
    per_env = [[] for _ in range(envs.n)]
    pos = np.zeros(envs.n, int)
    for _ in range(steps):
        obs, action, reward, nxt, term, trunc = step = envs.step()
        peer.add(*peer.prepare(step))
        for e in range(envs.n):
            per_env[e].append(dict(obs=obs[e].copy(), action=action[e], reward=reward[e], next_obs=nxt[e].copy(),
                                   term=bool(term[e]), trunc=bool(trunc[e]), pos=int(pos[e])))
        pos = np.where(term | trunc, 0, pos + 1)
    return per_env


def sampled(peer, draws, batch=8):
    got = set()
    for _ in range(draws // batch + 1):
        out = peer.sample(batch)
        obs, action, reward, nxt, done = (x.numpy() for x in out)
        got.update(key(obs[i], action[i], reward[i], nxt[i], done[i]) for i in range(batch))
    return got


def exact(live):
    return {key(t["obs"], t["action"], t["reward"], t["next_obs"], t["term"]) for t in live}


def sb3_optimized(live, full, newest_next):
    """next_obs is the next row's obs (the next episode's reset after an end);
    a truncation is stored as terminal; when full the oldest row is skipped."""
    out = set()
    for j, t in enumerate(live):
        if full and j == 0:
            continue
        nxt = live[j + 1]["obs"] if j + 1 < len(live) else newest_next
        out.add(key(t["obs"], t["action"], t["reward"], nxt, t["term"] or t["trunc"]))
    return out


def tianshou(live, k):
    """Stacks rebuilt from one stored frame per transition, padded with the
    first frame of the episode or of the ring (the oldest stored frame);
    obs_next is the next index's stack, or the same index's at an episode end
    and for the newest transition."""
    frames = [t["obs"][-1] for t in live]

    def stack(j):
        lo = max(0, j - live[j]["pos"])  # episode start, or the oldest stored transition
        return np.stack([frames[max(lo, i)] for i in range(j - k + 1, j + 1)])

    out = set()
    for j, t in enumerate(live):
        end = t["term"] or t["trunc"] or j == len(live) - 1
        out.add(key(stack(j), t["action"], t["reward"], stack(j if end else j + 1), t["term"]))
    return out


def expected(cls, per_env, cap_per_env, k):
    out = set()
    for stream in per_env:
        live = stream[-cap_per_env:]
        if cls is peers.SB3Optimized:
            out |= sb3_optimized(live, len(stream) >= cap_per_env, stream[-1]["next_obs"])
        elif cls is peers.Tianshou and k > 1:
            out |= tianshou(live, k)
        else:
            out |= exact(live)
    return out


# (a single-stream buffer is not a configuration for several envs)
CASES = [(cls, n) for cls in peers.PEERS for n in (1, 3) if cls.supports(n) is None]


@pytest.mark.parametrize("cls,num_envs", CASES, ids=[f"{c.name}-{n}env" for c, n in CASES])
@pytest.mark.parametrize("steps", [40, 200], ids=["partial", "wrapped"])
def test_adapter_returns_the_reference_transitions_atari_shaped(cls, num_envs, steps):
    assert cls.missing() is None, f"{cls.name}: {cls.missing()} (the test extra installs every peer)"
    capacity = 90  # 30 per env with 3 envs
    envs = AtariEnvs(num_envs, seed=num_envs + steps, min_len=2, max_len=15, frame=(6, 7), pool_size=200)
    peer = cls(capacity, envs.obs_shape, K, num_envs, seed=1)
    try:
        per_env = feed(peer, envs, steps // num_envs)
        want = expected(cls, per_env, capacity // num_envs, K)
        got = sampled(peer, 40 * len(want))
        assert got == want, f"{len(got - want)} unexpected, {len(want - got)} never sampled"
        obs, action, reward, nxt, done = peer.sample(5)
        assert obs.shape == nxt.shape == (5, K, 6, 7) and obs.dtype == nxt.dtype == torch.uint8
        assert action.shape == reward.shape == done.shape == (5,)
        assert reward.is_floating_point() and not action.is_floating_point()
    finally:
        peer.close()


VECTOR_CASES = [(cls, n) for cls in peers.PEERS if cls is not peers.DqnFastWindow for n in (1, 3)
                if cls.supports(n) is None]


@pytest.mark.parametrize("cls,num_envs", VECTOR_CASES, ids=[f"{c.name}-{n}env" for c, n in VECTOR_CASES])
def test_adapter_returns_the_reference_transitions_vectors(cls, num_envs):
    envs = VectorEnvs(num_envs, seed=5, min_len=2, max_len=20)
    peer = cls(60, envs.obs_shape, 1, num_envs, seed=1)
    try:
        per_env = feed(peer, envs, 120 // num_envs)
        want = expected(cls, per_env, 60 // num_envs, 1)
        assert sampled(peer, 40 * len(want)) == want
        obs = peer.sample(4)[0]
        assert obs.shape == (4, 4) and obs.dtype == torch.float32
    finally:
        peer.close()


def test_every_peer_is_reported_with_a_name_and_how_to_get_it():
    names = [c.name for c in peers.PEERS]
    assert len(set(names)) == len(names)
    for cls in peers.PEERS:
        if cls.modules and cls.modules[0] != "torch":
            assert cls.package, cls.name


def test_a_missing_peer_says_what_to_install(monkeypatch):
    class Ghost(peers.Peer):
        name, package, modules = "ghost", "ghost-replay", ("no_such_module_dqn_fast",)

    assert Ghost.missing() == "not installed (pip install ghost-replay)"
    assert peers.CpprbCompressed.supports(8).startswith("not applicable")


# --------------------------------------------------------------------------- prioritized and n-step peers
from dqn_fast.bench import peers_features as F  # noqa: E402

G, N = F.GAMMA, F.N_STEP


def nstep_expected(per_env, cap_per_env, with_discount=True):
    """The issue's n-step window: t and the env's following transitions, up to
    N, ending inclusively at a termination or truncation or at the env's newest."""
    out = set()
    for stream in per_env:
        live = stream[-cap_per_env:]
        for j, t in enumerate(live):
            reward, m = 0.0, 0
            for i in range(j, min(j + N, len(live))):
                reward += G**m * float(live[i]["reward"])
                m += 1
                if live[i]["term"] or live[i]["trunc"]:
                    break
            last = live[j + m - 1]
            out.add(nkey(t["obs"], t["action"], reward, last["next_obs"], last["term"], G**m if with_discount else None))
    return out


def nkey(obs, action, reward, next_obs, done, discount):
    return (*key(obs, action, round(float(reward), 4), next_obs, done)[:2], round(float(reward), 4),
            np.ascontiguousarray(next_obs).tobytes(), bool(done), None if discount is None else round(float(discount), 5))


def nsampled(peer, draws, batch=8):
    got = set()
    for _ in range(draws // batch + 1):
        obs, action, reward, nxt, done, discount = peer.sample(batch)
        for i in range(batch):
            got.add(nkey(obs[i].numpy(), action[i], reward[i], nxt[i].numpy(), done[i],
                         None if discount is None else discount[i]))
    return got


def usable(cls):
    assert cls.missing() is None, f"{cls.name}: {cls.missing()}"
    assert cls.unavailable() is None, f"{cls.name}: {cls.unavailable()}"


PER_CASES = [(cls, n) for cls in (F.DqnFastPrioritized, F.CpprbPrioritized, F.TianshouPrioritized) for n in (1, 3)
             if cls.supports(n) is None]


@pytest.mark.parametrize("cls,num_envs", PER_CASES, ids=[f"{c.name}-{n}env" for c, n in PER_CASES])
@pytest.mark.parametrize("steps", [40, 200], ids=["partial", "wrapped"])
def test_prioritized_adapter_returns_the_reference_transitions(cls, num_envs, steps):
    """Same transitions as the uniform reference (Tianshou: its documented stacking),
    weights in (0, 1], and update() reaches the sampled transition: one given a large
    priority is then drawn far above its uniform share."""
    usable(cls)
    capacity = 90
    envs = AtariEnvs(num_envs, seed=num_envs + steps, min_len=2, max_len=15, frame=(6, 7), pool_size=200)
    peer = cls(capacity, envs.obs_shape, K, num_envs, seed=1)
    try:
        per_env = feed(peer, envs, steps // num_envs)
        want = (expected(peers.Tianshou, per_env, capacity // num_envs, K) if cls is F.TianshouPrioritized
                else exact(t for s in per_env for t in s[-(capacity // num_envs):]))
        got = set()
        for _ in range(40 * len(want) // 8 + 1):
            obs, action, reward, nxt, done, weights = peer.sample(8)
            got.update(key(obs[i].numpy(), action[i], reward[i], nxt[i].numpy(), done[i]) for i in range(8))
            w = weights.numpy()
            assert np.all(w > 0) and np.all(w <= 1 + 1e-6), w
        assert got == want, f"{len(got - want)} unexpected, {len(want - got)} never sampled"
        obs, action, reward, nxt, done, _ = peer.sample(16)
        keys = [key(obs[i].numpy(), action[i], reward[i], nxt[i].numpy(), done[i]) for i in range(16)]
        peer.update(np.array([1e3 if k == keys[0] else 1e-3 for k in keys], np.float32))
        hits = 0
        for _ in range(50):
            obs, action, reward, nxt, done, _ = peer.sample(8)
            hits += sum(key(obs[i].numpy(), action[i], reward[i], nxt[i].numpy(), done[i]) == keys[0] for i in range(8))
        assert hits > 0.2 * 400, f"{hits} of 400 draws (uniform share {400 / len(want):.0f})"
    finally:
        peer.close()


NSTEP_CASES = [(cls, n) for cls in (F.DqnFastNStep, F.SB3NStep) for n in (1, 3)]


@pytest.mark.parametrize("cls,num_envs", NSTEP_CASES, ids=[f"{c.name}-{n}env" for c, n in NSTEP_CASES])
@pytest.mark.parametrize("steps", [40, 200], ids=["partial", "wrapped"])
def test_nstep_adapter_returns_the_reference_returns(cls, num_envs, steps):
    """n-step reward, next_obs, done and discount of every stored transition, as the
    issue defines them (SB3's NStepReplayBuffer is exact here too)."""
    usable(cls)
    capacity = 90
    envs = AtariEnvs(num_envs, seed=num_envs + steps, min_len=2, max_len=6, frame=(6, 7), pool_size=200)
    peer = cls(capacity, envs.obs_shape, K, num_envs, seed=1)
    try:
        per_env = feed(peer, envs, steps // num_envs)
        want = nstep_expected(per_env, capacity // num_envs)
        got = nsampled(peer, 40 * len(want))
        assert got == want, f"{len(got - want)} unexpected, {len(want - got)} never sampled"
    finally:
        peer.close()


def test_cpprb_nstep_is_reported_unavailable_with_frame_stacks_for_what_it_returns():
    """Its compressed set-up returns no next_obs; the plain one returns next_obs
    frames that were never added: both checked here, beside the reported reason."""
    reason = F.CpprbNstep.unavailable()
    assert reason is not None and "no next_obs" in reason and "never added" in reason
    envs = AtariEnvs(1, seed=0, min_len=2, max_len=12, frame=(6, 7), pool_size=200)
    peer = F.CpprbNstep(40, envs.obs_shape, K, 1, compressed=True)
    for _ in range(60):
        peer.add(*peers.unbatched(envs.step()))
    assert "next_obs" not in peer.rb.sample(8)


def test_torchrl_prioritized_is_measured_or_reported_with_its_own_exception():
    reason = F.TorchRLPrioritized.unavailable()
    if reason is None:  # it runs beside this torch: then it must be exact
        envs = AtariEnvs(1, seed=3, min_len=2, max_len=15, frame=(6, 7), pool_size=200)
        peer = F.TorchRLPrioritized(90, envs.obs_shape, K, 1, seed=1)
        per_env = feed(peer, envs, 200)
        got = set()
        for _ in range(400):
            obs, action, reward, nxt, done, _ = peer.sample(8)
            got.update(key(obs[i].numpy(), action[i], reward[i], nxt[i].numpy(), done[i]) for i in range(8))
        assert got == exact(per_env[0][-90:])
        return
    with pytest.raises(Exception) as exc:
        F.TorchRLPrioritized(8, (2,), 1, 1)
    assert reason.startswith(f"unavailable: {type(exc.value).__name__}: {exc.value}")


def test_feature_peers_have_names_kinds_and_packages():
    names = [c.name for c in F.PER + F.NSTEP] + [c.name for c in peers.PEERS]
    assert len(set(names)) == len(names)
    assert {c.kind for c in F.PER} == {"per"} and {c.kind for c in F.NSTEP} == {"nstep"}
    for cls in F.PER + F.NSTEP:
        assert cls.name.startswith("dqn_fast") or cls.package, cls.name
