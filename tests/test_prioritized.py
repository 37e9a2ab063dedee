"""Proportional prioritized replay against ``ReferencePriorities``.

Draw frequencies (chi-square), stratification, importance weights, the max
priority of new transitions, rejected and stale updates, duplicate ids, input
types, and add + sample + update_priorities on several threads at once.

DQN_FAST_STRESS_SECONDS sets the total time of the stress runs (default 2).
"""

from __future__ import annotations

import math
import os
import threading
import time

import importlib.util

import numpy as np
import pytest

from dqn_fast import ReplayBuffer
from reference import EpisodeStreams, ReferencePriorities, ReferenceReplay, StreamConfig, assert_nstep_batch_matches

STRESS_SECONDS = float(os.environ.get("DQN_FAST_STRESS_SECONDS", "2"))
HAVE_TORCH = importlib.util.find_spec("torch") is not None
Z_1E6 = 4.753424  # standard normal quantile of 1 - 1e-6


def chi2_upper(df: int, z: float = Z_1E6) -> float:
    """Wilson-Hilferty: the chi-square quantile with upper tail Phi(-z) (1e-6 by default)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def to_np(x):
    return x.numpy() if hasattr(x, "numpy") and not isinstance(x, np.ndarray) else np.asarray(x)


class Twin:
    """A prioritized vector-obs buffer and its reference, fed the same adds and updates.

    Transition `id` has obs [id, 0.5], so a row shows its id whatever the buffer did.
    """

    def __init__(self, capacity, seed=0, alpha=0.6, eps=1e-6, **kw):
        self.buf = ReplayBuffer(capacity, (2,), np.float32, seed=seed, prioritized=True, alpha=alpha,
                                priority_eps=eps, **kw)
        self.ref = ReferencePriorities(alpha, eps)

    def add(self, count=1):
        for _ in range(count):
            i = self.buf.total_adds
            obs = np.array([[i, 0.5]], np.float32)
            # next_obs is the next add's obs, so each add stores one frame and len == min(adds, capacity)
            nxt = obs + np.array([1, 0], np.float32)
            self.buf.add(obs, np.array([i % 5]), np.array([i], np.float32), nxt, np.array([False]), np.array([False]))
            self.ref.added([i])
        self.ref.keep(self.live_range())
        return self

    def update(self, ids, priorities):
        self.buf.update_priorities(ids, priorities)
        self.ref.update(to_np(ids), to_np(priorities))

    def live(self) -> np.ndarray:
        return np.arange(self.buf.total_adds - len(self.buf), self.buf.total_adds, dtype=np.int64)

    def live_range(self) -> range:
        return range(self.buf.total_adds - len(self.buf), self.buf.total_adds)

    def check_probabilities(self, rtol=1e-12):
        live = self.live()
        assert sorted(self.ref.p) == live.tolist()
        got = np.asarray(self.buf.probabilities(live))
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, self.ref.probabilities(live), rtol=rtol, atol=0)
        assert self.buf.max_priority == pytest.approx(self.ref.max_priority, rel=1e-15)
        return got

    def check_rows(self, batch):
        ids = to_np(batch.ids)
        assert set(ids.tolist()) <= set(self.live_range()), "sampled an id that is not stored"
        np.testing.assert_array_equal(to_np(batch.obs)[:, 0], ids.astype(np.float32))
        np.testing.assert_array_equal(to_np(batch.reward), ids.astype(np.float32))


def random_priorities(rng, n, zeros=0):
    p = 10 ** rng.uniform(-3, 1, n)
    p[rng.choice(n, zeros, replace=False)] = 0.0
    return p


def test_draw_frequencies_are_proportional_to_p_plus_eps_to_the_alpha():
    rng = np.random.default_rng(0)
    alpha, eps, n = 0.6, 0.05, 300  # a large eps: a wrong eps shows in the draws of the zero priorities
    t = Twin(n, seed=1, alpha=alpha, eps=eps).add(n + 77)  # a wrapped ring
    live = t.live()
    p = random_priorities(rng, n, zeros=30)
    t.update(live, p)
    probs = t.check_probabilities()
    batch, rounds = 250, 800
    out = t.buf.empty_batch(batch)
    counts = np.zeros(n, dtype=np.int64)
    for _ in range(rounds):
        ids = t.buf.sample_into(out, beta=0.4).ids
        assert ids.min() >= live[0] and ids.max() <= live[-1]
        counts += np.bincount(ids - live[0], minlength=n)
    draws = batch * rounds

    def chi2(masses):
        expected = draws * masses / masses.sum()
        return float(((counts - expected) ** 2 / expected).sum())

    limit = chi2_upper(n - 1)
    # Stratified draws vary less than independent ones: the statistic can only come out smaller.
    stat = chi2((p + eps) ** alpha)
    assert stat < limit, f"chi-square {stat:.0f} on {n - 1} dof exceeds the 1e-6 quantile {limit:.0f}"
    np.testing.assert_allclose(probs, (p + eps) ** alpha / ((p + eps) ** alpha).sum(), rtol=1e-12)
    # The same draws against the mistakes this test is meant to catch: each must fail it.
    wrong = {
        "alpha 0.5": (p + eps) ** 0.5,
        "alpha 1 (no exponent)": p + eps,
        "eps after the power": p**alpha + eps,
        "eps ignored": (p + 1e-12) ** alpha,
        "eps added twice": (p + 2 * eps) ** alpha,
    }
    for name, masses in wrong.items():
        assert chi2(masses) > limit, f"the test cannot tell {name} from the right formula"


def test_equal_priorities_with_batch_equal_to_size_draw_every_id_once():
    # B equal segments of the mass, one draw in each: with N equal masses and
    # B == N, segment b is exactly leaf b's mass, so a batch is a permutation.
    t = Twin(64, seed=2).add(64 + 23)
    for _ in range(30):
        ids = t.buf.sample(64).ids
        assert sorted(ids.tolist()) == t.live().tolist(), "B == N with equal priorities must draw each id once"
    # B == N / 3: each segment covers 3 whole leaves, so no id comes twice.
    t = Twin(192, seed=3).add(192 + 50)
    for _ in range(30):
        ids = t.buf.sample(64).ids
        assert len(set(ids.tolist())) == 64, "with N = 3B equal priorities no id can be drawn twice"


def test_stratified_draws_hold_for_the_largest_masses_allowed():
    # Masses up to 1e298 are accepted; with total * B past DBL_MAX the draw
    # for segment i must still land in segment i (total * ((i + u) / B)), not
    # overflow to inf and pile every later segment onto the last leaf.
    n, batch = 50_000, 1_000_000
    buf = ReplayBuffer(n, (1,), np.float32, num_envs=100, prioritized=True, alpha=1.0, priority_eps=0.0, seed=6)
    obs = np.zeros((100, 1), np.float32)
    zeros, no = np.zeros(100, np.int64), np.zeros(100, bool)
    for step in range(n // 100):
        buf.add(obs + step, zeros, np.zeros(100, np.float32), obs + step + 1, no, no)
    ids = np.arange(n, dtype=np.int64)
    buf.update_priorities(ids, np.full(n, 1e298))
    assert float(buf.probabilities(ids[:1])[0]) * n == pytest.approx(1.0)
    counts = np.bincount(buf.sample(batch).ids, minlength=n)
    assert counts.min() >= batch // n - 1 and counts.max() <= batch // n + 1, (counts.min(), counts.max())


def test_each_id_is_drawn_within_one_of_its_expected_count_per_batch():
    # Stratification bounds every id's draws in one batch: its mass spans
    # c = B * P(i) segments, so it gets between floor(c) - 1 and ceil(c) + 1.
    # An id holding half the mass gets 31-33 of 64 every time; independent
    # draws (sd 4) would leave that range in most batches.
    rng = np.random.default_rng(4)
    alpha, eps, n, batch = 0.6, 1e-6, 100, 64
    t = Twin(n, seed=5, alpha=alpha, eps=eps).add(n + 31)
    live = t.live()
    p = 10 ** rng.uniform(-0.5, 0.5, n)
    others = ((p[1:] + eps) ** alpha).sum()
    p[0] = others ** (1 / alpha) - eps  # live[0] holds half the mass
    t.update(live, p)
    probs = t.check_probabilities()
    assert probs[0] == pytest.approx(0.5, rel=1e-9)
    c = batch * probs
    low, high = np.floor(c) - 1, np.ceil(c) + 1
    for _ in range(200):
        counts = np.bincount(t.buf.sample(batch).ids - live[0], minlength=n)
        bad = np.flatnonzero((counts < low) | (counts > high))
        assert bad.size == 0, f"ids {live[bad]} drawn {counts[bad]} times, expected {c[bad]} +- 1 (stratified)"


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_weights_are_the_formula_to_float32_precision(beta):
    rng = np.random.default_rng(6)
    t = Twin(150, seed=7, alpha=0.7, eps=0.01).add(150 + 40)
    live = t.live()
    t.update(live, random_priorities(rng, len(live), zeros=5))
    probs = t.check_probabilities()
    n = len(t.buf)
    assert n == len(live)
    index = {i: j for j, i in enumerate(live.tolist())}
    for _ in range(5):
        batch = t.buf.sample(128, beta=beta)
        t.check_rows(batch)
        w = np.asarray(batch.weights)
        assert w.dtype == np.float32 and w.shape == (128,)
        p_ids = probs[[index[i] for i in batch.ids.tolist()]]
        want = (n * p_ids) ** -beta / (n * probs.min()) ** -beta
        np.testing.assert_allclose(w, want, rtol=1e-6, atol=0)
        np.testing.assert_allclose(w, t.ref.weights(batch.ids, beta), rtol=1e-6, atol=0)
        assert ((w > 0) & (w <= 1)).all()
        if beta == 0:
            assert (w == 1).all()


def test_weights_in_torch_outputs_and_the_batch_field_order():
    torch = pytest.importorskip("torch")
    t = Twin(50, seed=8).add(60)
    t.update(t.live(), np.linspace(0, 4, 50))
    out = t.buf.empty_batch(16, torch=True)
    assert out._fields[:11] == ("obs", "action", "reward", "next_obs", "terminated", "truncated", "ids", "frames",
                                "weights", "discount", "next_start")
    out.weights.fill_(-1)
    t.buf.sample_into(out, beta=0.5)
    np.testing.assert_allclose(out.weights.numpy(), t.ref.weights(out.ids.numpy(), 0.5), rtol=1e-6)


def test_new_transitions_get_the_largest_priority_set_so_far():
    t = Twin(40, seed=9, alpha=0.6, eps=1e-6).add(10)
    assert t.buf.max_priority == 1.0
    np.testing.assert_allclose(t.check_probabilities(), np.full(10, 0.1), rtol=1e-12)
    live = t.live()
    t.update(live[:2], np.array([3.7, 0.2]))
    t.add(5)  # they get 3.7
    assert t.buf.max_priority == 3.7
    probs = t.check_probabilities()
    assert probs[-1] == probs[0] and probs[-1] > probs[2]
    t.update(live[:1], np.array([0.1]))  # lowering the top priority keeps the max: "largest set so far"
    t.add(3)
    assert t.buf.max_priority == 3.7
    t.check_probabilities()
    t.update(t.live()[-3:], np.array([5.5, 0.0, 2.0]))
    t.add(50)  # wraps: everything left was added at max priority 5.5
    assert t.buf.max_priority == 5.5
    np.testing.assert_allclose(t.check_probabilities(), np.full(40, 1 / 40), rtol=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1e-30, -5.0])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_non_finite_or_negative_priorities_raise_and_change_nothing(bad, dtype):
    a, b = Twin(30, seed=10).add(45), Twin(30, seed=10).add(45)  # b never sees the bad call
    for twin in (a, b):
        twin.update(twin.live()[:10], np.arange(1, 11, dtype=np.float64))
    before, max_before = a.check_probabilities(), a.buf.max_priority
    values = np.array([7.0, 8.0, bad, 9.0], dtype=dtype)
    with pytest.raises(ValueError, match="priorit"):
        a.buf.update_priorities(a.live()[:4], values)
    np.testing.assert_array_equal(a.buf.probabilities(a.live()), before)  # not even the values before the bad one
    assert a.buf.max_priority == max_before
    a.add(5)
    b.add(5)
    for _ in range(5):  # the trees agree, node for node as far as the draws can tell
        np.testing.assert_array_equal(a.buf.sample(32).ids, b.buf.sample(32).ids)
    a.check_probabilities()


def test_stale_ids_are_ignored_never_applied_to_the_slots_new_occupant():
    a, b = Twin(20, seed=11).add(20), Twin(20, seed=11).add(20)
    stale = a.buf.sample(8).ids.copy()
    b.buf.sample(8)
    a.add(20)
    b.add(20)  # every id sampled above is evicted; their slots hold new ids
    before = a.check_probabilities()
    a.update(stale, np.full(8, 1000.0))
    np.testing.assert_array_equal(a.buf.probabilities(a.live()), before)
    assert a.buf.max_priority == 1.0, "a stale update must not raise the max priority either"
    # Mixed: the stored ids are applied, the stale ones ignored.
    mixed = np.concatenate([stale, a.live()[:3]])
    values = np.concatenate([np.full(8, 50.0), [2.0, 3.0, 4.0]])
    a.update(mixed, values)
    b.buf.update_priorities(b.live()[:3], np.array([2.0, 3.0, 4.0]))
    a.check_probabilities()
    assert a.buf.max_priority == 4.0
    a.add(3)
    b.add(3)  # new ones get 4.0, not 50
    a.check_probabilities()
    for _ in range(5):
        np.testing.assert_array_equal(a.buf.sample(16).ids, b.buf.sample(16).ids)


def test_duplicate_ids_last_one_wins():
    t = Twin(30, seed=12).add(30)
    i, j = t.live()[[3, 7]]
    t.update(np.array([i, j, i, i]), np.array([1.0, 2.0, 0.5, 3.0]))
    t.check_probabilities()
    assert t.ref.p[i] == 3.0
    t.buf.update_priorities(np.array([j, j]), np.array([0.2, 0.0]))  # last wins even when it is the smaller
    t.ref.p[j] = 0.0
    np.testing.assert_allclose(t.buf.probabilities(t.live()), t.ref.probabilities(t.live()), rtol=1e-12)


def test_numpy_and_cpu_torch_inputs_of_any_layout():
    torch = pytest.importorskip("torch")
    t = Twin(40, seed=13).add(50)
    out = t.buf.empty_batch(16, torch=True)
    t.buf.sample_into(out)
    td = torch.linspace(0.1, 3.0, 16)  # float32, as |TD error| from a network
    t.update(out.ids, td.abs())
    t.check_probabilities()
    wide = torch.linspace(0.0, 9.0, 32, dtype=torch.float64)
    t.update(torch.as_tensor(t.live()[:16]), wide[::2])  # non-contiguous
    t.check_probabilities()
    ids = np.repeat(t.live()[16:26], 2)[::2]  # non-contiguous ids
    t.update(ids, np.linspace(0.5, 1.5, 20, dtype=np.float32)[::2])
    t.check_probabilities()
    t.update(t.live()[:3], np.array([2, 0, 5]))  # integer priorities
    t.check_probabilities()


@pytest.mark.parametrize(
    "ids,priorities,error",
    [
        (np.array([1.0, 2.0]), np.array([1.0, 1.0]), TypeError),  # float ids
        (np.array(["1", "2"]), np.array([1.0, 1.0]), TypeError),
        (None, np.array([1.0]), TypeError),
        (np.array([1, 2]), np.array(["a", "b"]), TypeError),
        (np.array([1, 2]), np.array([1 + 1j, 2j]), TypeError),
        (np.array([1, 2]), None, TypeError),
        (np.array([[1, 2]]), np.array([1.0, 1.0]), ValueError),  # 2-D ids
        (np.array([1, 2]), np.array([[1.0, 1.0]]), ValueError),  # 2-D priorities
        (np.array([1, 2, 3]), np.array([1.0, 1.0]), ValueError),  # lengths differ
    ],
)
def test_update_priorities_rejects_bad_arguments_and_changes_nothing(ids, priorities, error):
    t = Twin(10, seed=14).add(10)
    t.update(t.live(), np.linspace(0, 2, 10))
    before = t.check_probabilities()
    with pytest.raises(error):
        t.buf.update_priorities(ids, priorities)
    np.testing.assert_array_equal(t.buf.probabilities(t.live()), before)


def test_probabilities_name_an_id_that_is_not_stored():
    t = Twin(10, seed=15).add(25)
    for bad in (t.live()[0] - 1, t.buf.total_adds, -1):
        with pytest.raises(ValueError, match=rf"(?<![\d-]){bad}(?!\d)"):
            t.buf.probabilities(np.array([t.live()[0], bad]))


def test_alpha_0_is_uniform_and_evicted_ids_leave_the_mass():
    t = Twin(25, seed=16, alpha=0.0).add(25)
    t.update(t.live(), np.linspace(0, 100, 25))
    np.testing.assert_allclose(t.check_probabilities(), np.full(25, 1 / 25), rtol=1e-12)
    t = Twin(25, seed=17, alpha=1.0).add(25)
    t.update(t.live(), np.linspace(0, 100, 25))
    for _ in range(4):
        t.add(7)  # the evicted ids' mass leaves the total
        assert math.fsum(t.check_probabilities()) == pytest.approx(1.0, abs=1e-12)


def test_uniform_buffers_have_weights_1_and_refuse_priority_updates():
    buf = ReplayBuffer(20, (2,), np.float32, seed=0)
    assert buf.prioritized is False
    obs = np.zeros((1, 2), np.float32)
    for i in range(30):
        buf.add(obs + i, np.array([0]), np.array([1.0], np.float32), obs + i + 1, np.array([False]), np.array([False]))
    batch = buf.sample(16, beta=0.4)
    assert batch.weights.dtype == np.float32 and (batch.weights == 1).all()
    ids = np.arange(10, 30)
    np.testing.assert_allclose(buf.probabilities(ids), np.full(20, 1 / 20), rtol=1e-15)
    with pytest.raises(ValueError, match="not prioritized"):
        buf.update_priorities(batch.ids, np.ones(16))


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(alpha=-0.1), ValueError, "alpha"),
        (dict(alpha=math.nan), ValueError, "alpha"),
        (dict(alpha=math.inf), ValueError, "alpha"),
        (dict(alpha="0.6"), TypeError, "alpha"),
        (dict(alpha=None), TypeError, "alpha"),
        (dict(priority_eps=-1e-9), ValueError, "priority_eps"),
        (dict(priority_eps=math.nan), ValueError, "priority_eps"),
        (dict(priority_eps=math.inf), ValueError, "priority_eps"),
        (dict(priority_eps="1e-6"), TypeError, "priority_eps"),
        (dict(prioritized="yes"), TypeError, "prioritized"),
    ],
)
def test_prioritized_constructor_arguments_are_checked(kwargs, error, name):
    kw = dict(prioritized=True, **kwargs) if "prioritized" not in kwargs else kwargs
    with pytest.raises(error, match=name):
        ReplayBuffer(10, (2,), np.float32, **kw)


@pytest.mark.parametrize("beta,error", [(math.nan, ValueError), (-0.1, ValueError), (math.inf, ValueError),
                                        ("0.4", TypeError), (None, TypeError)])
def test_beta_is_checked(beta, error):
    t = Twin(10, seed=18).add(10)
    with pytest.raises(error, match="beta"):
        t.buf.sample(4, beta=beta)
    with pytest.raises(error, match="beta"):
        t.buf.sample_into(t.buf.empty_batch(4), beta=beta)


def test_priorities_survive_save_and_load(tmp_path):
    t = Twin(30, seed=19, alpha=0.5, eps=0.01, n_step=3, gamma=0.9).add(40)
    t.update(t.live(), np.linspace(0, 6, 30))
    t.buf.save(tmp_path / "b.bin")
    loaded = ReplayBuffer.load(tmp_path / "b.bin")
    assert (loaded.prioritized, loaded.alpha, loaded.priority_eps, loaded.n_step, loaded.gamma) == (True, 0.5, 0.01, 3, 0.9)
    assert loaded.max_priority == t.buf.max_priority == 6.0
    np.testing.assert_array_equal(loaded.probabilities(t.live()), t.buf.probabilities(t.live()))
    for _ in range(3):
        x, y = loaded.sample(16, beta=0.3), t.buf.sample(16, beta=0.3)
        for name in ("ids", "weights", "discount", "reward"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)


# ------------------------------------------------------------------ concurrency
STRESS = {
    # small frames, n-step 3: every row is checked against the windows possible during the call
    "small_nstep": (StreamConfig(num_envs=2, frame_shape=(12, 12), min_len=2, max_len=30, palette=256, p_glitch=0.05),
                    dict(capacity=300, obs_shape=(4, 12, 12), frame_stack=4, num_envs=2, n_step=3, gamma=0.9), 32),
    # Atari frames and batches of 64: the gather pool runs
    "atari": (StreamConfig(num_envs=4, frame_shape=(84, 84), padding="zero", min_len=5, max_len=80, palette=256),
              dict(capacity=400, obs_shape=(4, 84, 84), frame_stack=4, num_envs=4), 64),
}


def priority_of(ids: np.ndarray) -> np.ndarray:
    """What the updater gives an id: below 1, so the max priority stays 1.0 and never-updated ids
    keep it; exact in float32, so torch float32 updates set the same values."""
    return (1 + ids % 7) / 8


@pytest.mark.parametrize("config", sorted(STRESS))
def test_add_sample_and_update_priorities_at_once(config):
    cfg, kwargs, batch = STRESS[config]
    n, gamma = kwargs.get("n_step", 1), kwargs.get("gamma", 0.99)
    buf = ReplayBuffer(seed=3, prioritized=True, alpha=0.6, priority_eps=1e-3, **kwargs)
    ref, streams = ReferenceReplay(kwargs["capacity"]), EpisodeStreams(cfg, 2)
    stop = threading.Event()
    deadline = time.monotonic() + STRESS_SECONDS / len(STRESS)
    errors, counts, marks = [], {}, {}
    updated: set = set()  # every id handed to a valid update (recorded before the call)
    ref_lock = threading.Lock()  # pruning the reference vs readers looking ids up
    pruned = [0]

    def add():
        args = streams.step()
        ref.add(*args)  # the reference learns first, so any id sampled is known
        buf.add(*args)
        low = min([buf.total_adds, *marks.values()]) - ref.capacity - n * cfg.num_envs
        with ref_lock:
            while pruned[0] < low:
                del ref.transitions[pruned[0]]
                pruned[0] += 1

    while buf.total_adds < ref.capacity // 2:
        add()

    def check(b, first, after):
        ids = to_np(b.ids)
        assert ((ids >= first - ref.capacity) & (ids < after)).all(), (first, after, ids)
        w = to_np(b.weights)
        assert np.isfinite(w).all() and ((w > 0) & (w <= 1)).all(), w
        fields = {f: to_np(getattr(b, f)) for f in ("obs", "action", "reward", "next_obs", "terminated", "truncated", "discount")}
        with ref_lock:
            for row, tid in enumerate(ids.tolist()):
                # The window ends at the env's newest add at some moment during the call:
                # any length between the window before the call and the one after it.
                full = ref.window(tid, n, head=after)
                shortest = len(ref.window(tid, n, head=first))
                wants = [ref.nstep(tid, n, gamma, head=full[m - 1] + 1) for m in range(shortest, len(full) + 1)]
                problems = [row_mismatch(fields, row, want) for want in wants]
                assert None in problems, f"id {tid}, window {full} (at least {shortest} long): {problems[-1]}"

    def thread(name, step):
        def run():
            try:
                while not stop.is_set() and time.monotonic() < deadline:
                    step()
                    counts[name] += 1
            except BaseException as exc:  # surfaced in the main thread
                errors.append((name, exc))
                stop.set()

        counts[name] = 0
        return threading.Thread(target=run, name=name, daemon=True)

    def sampler(name, torch_out=False):
        out = buf.empty_batch(batch, torch=True) if torch_out else None
        marks[name] = 0

        def step():
            first = marks[name] = buf.total_adds
            b = buf.sample_into(out, beta=0.5) if torch_out else buf.sample(batch, beta=0.5)
            check(b, first, buf.total_adds)
        return step

    rng = np.random.default_rng(0)

    def updater():
        marks["update"] = buf.total_adds
        ids = buf.sample(batch).ids
        if counts["update"] % 5 == 4:  # poisoned: must change nothing (these ids are not recorded)
            values = np.zeros(batch)
            values[rng.integers(batch)] = np.nan
            try:
                buf.update_priorities(ids, values)
            except ValueError:
                return
            raise AssertionError("update_priorities accepted a NaN")
        updated.update(ids.tolist())
        values = priority_of(ids)
        if HAVE_TORCH and counts["update"] % 2:
            import torch

            buf.update_priorities(torch.from_numpy(ids), torch.from_numpy(values).float())
        else:
            buf.update_priorities(ids, values)

    marks["update"] = 0
    threads = [thread("add", add), thread("sample", sampler("sample")), thread("update", updater)]
    if HAVE_TORCH:
        threads.append(thread("torch", sampler("torch", torch_out=True)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic()) + 60)
    stop.set()
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"threads still running 60 s after the deadline (a hang?): {hung}"
    assert not errors, errors[0]
    assert all(c > 0 for c in counts.values()), counts

    # Quiet now: an id handed to a valid update while stored has its priority; every other
    # stored id still has the max (1.0). A stale update applied to a slot's new occupant,
    # or a poisoned call applied in part, shows here.
    live = np.arange(buf.total_adds - len(buf), buf.total_adds, dtype=np.int64)
    assert buf.max_priority == 1.0
    want = ReferencePriorities(0.6, 1e-3)
    want.added(live.tolist())
    for i in live.tolist():
        if i in updated:
            want.p[i] = float(priority_of(np.array([i]))[0])
    np.testing.assert_allclose(buf.probabilities(live), want.probabilities(live), rtol=1e-9)
    assert_nstep_batch_matches(buf.get(live), ref, n, gamma, range(live[0], live[-1] + 1), weights_one=False)


def row_mismatch(fields: dict, row: int, want: tuple):
    """None when batch row `row` equals the reference's n-step tuple `want`, else what differs."""
    names = ("obs", "action", "reward", "next_obs", "terminated", "truncated", "discount")
    for name, value in zip(names, want):
        got = fields[name][row]
        if not np.array_equal(got, value):
            return f"{name}: expected {value!r}, got {got!r}"
    return None


@pytest.mark.parametrize("num_envs", [1, 3])
def test_transitions_evicted_early_by_the_frame_reserve_leave_the_tree(num_envs, tmp_path):
    # Episodes of 1-2 steps with frame_reserve=0 exhaust the frame store, so
    # adds evict transitions whose slots they do not overwrite: those leaves
    # must go to 0, or a draw could return an id that is not stored.
    cfg = StreamConfig(num_envs=num_envs, frame_stack=3, frame_shape=(2, 3), min_len=1, max_len=2)
    buf = ReplayBuffer(240, (3, 2, 3), np.uint8, frame_stack=3, num_envs=num_envs, seed=3, prioritized=True,
                       frame_reserve=0.0)
    streams, rng = EpisodeStreams(cfg, 9), np.random.default_rng(2)
    short = 0  # adds after which fewer than capacity were stored although more were added
    for _ in range(600 // num_envs):
        buf.add(*streams.step())
        live = np.arange(buf.total_adds - len(buf), buf.total_adds)
        assert math.fsum(buf.probabilities(live).tolist()) == pytest.approx(1.0, abs=1e-12)
        batch = buf.sample(16)
        assert set(batch.ids.tolist()) <= set(live.tolist())
        buf.update_priorities(batch.ids, rng.uniform(0, 3, 16))
        short += buf.capacity < buf.total_adds and len(buf) < buf.capacity
    assert short > 100, "the reserve was meant to run out"
    buf.save(tmp_path / "b.dqnf")  # the loader checks that only stored slots have mass
    loaded = ReplayBuffer.load(tmp_path / "b.dqnf")
    np.testing.assert_array_equal(loaded.probabilities(live), buf.probabilities(live))
