"""Prioritized replay and n-step returns, side by side (issue #10).

Same method as bench/suite.py: each peer in its own child process beside the
matching dqn_fast buffer, interleaved rounds, medians, per-round ratios, and
every child run in both allocator states (suite.ALLOCATOR_STATES). All
buffers are Atari-shaped (84x84 uint8, stack 4) and filled one step per add,
as a single-env trainer does.

  per     batches/s of sample(B) followed by the update of that batch's
          priorities (random positive priorities prepared beforehand);
  nstep   batches/s of sample(B) with n-step (n=3) returns;
  ours    dqn_fast's uniform one-step sample_into, prioritized and n-step in
          one window (the goals: PER >= 80% and n-step >= 85% of uniform),
          and batched update_priorities throughput (priorities/s);
  1M      dqn_fast uniform and prioritized at 1M transitions where memory
          allows (bench/suite.py measure_ours).
"""

from __future__ import annotations

import functools
import gc
import time
from typing import Callable, Dict

import numpy as np

from . import peers as P
from . import peers_features as F
from .streams import AtariEnvs
from .suite import OBS_SHAPE, K, sample_round
from .timing import block_rate, interleaved, median, rss_bytes

BATCHES = (32, 256)
POOL = 8  # distinct priority arrays, cycled


def fill_steps(peers_: list, n: int, seed: int) -> None:
    """Adds n transitions of one stream to every peer, one step per add."""
    envs = AtariEnvs(1, seed)
    for _ in range(n):
        step = envs.step()
        for p in peers_:
            p.add(*p.prepare(step))


def priority_pool(batch: int, seed: int, as_torch: bool) -> list:
    rng = np.random.default_rng(seed)
    pool = [rng.uniform(0.05, 2.0, size=batch).astype(np.float32) for _ in range(POOL)]
    if as_torch:  # what a learner hands back: |TD error| as a CPU tensor
        torch = P._torch()
        pool = [torch.from_numpy(p) for p in pool]
    return pool


def per_round(peer, batch: int, calls: int, seed: int, min_s: float = 0.0) -> Callable[[], float]:
    """sample(B) then update(priorities of that batch), in blocks of `calls`
    until at least `min_s` seconds have passed (see suite.sample_round)."""
    pool = priority_pool(batch, seed, as_torch=isinstance(peer, F.DqnFastPrioritized))

    def block() -> None:
        sample, update = peer.sample, peer.update
        for i in range(calls):
            sample(batch)
            update(pool[i % POOL])

    return lambda: block_rate(block, calls, min_s)


def _summary(rates: Dict[str, list], num: str, den: str) -> dict:
    return {"per_s": median(rates[num]), "repeats": rates[num], "dqn_fast_per_s": median(rates[den]),
            "dqn_fast_repeats": rates[den], "dqn_fast_speedup": median([o / p for o, p in zip(rates[den], rates[num])])}


def _state(result: dict) -> dict:
    import os

    result["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    return result


# --------------------------------------------------------------------------- children
def measure_ours_features(s: dict) -> dict:
    """dqn_fast uniform, prioritized and n-step from the same stream, interleaved."""
    reason = F.DqnFastPrioritized.unavailable()
    if reason:
        return _state({"unavailable": reason})
    cap = s["feature_capacity"]
    bufs = {"uniform": P.DqnFast(cap, OBS_SHAPE, K, 1, seed=1), "per": F.DqnFastPrioritized(cap, OBS_SHAPE, K, 1, seed=1),
            "nstep": F.DqnFastNStep(cap, OBS_SHAPE, K, 1, seed=1)}
    fill_steps(list(bufs.values()), cap, seed=7)
    out: dict = {"capacity": cap}
    for batch in BATCHES:
        calls = s["calls"][batch]
        fns = {"uniform": sample_round(bufs["uniform"].sample, batch, calls, s["round_s"]),
               "per": per_round(bufs["per"], batch, calls, seed=batch, min_s=s["round_s"]),
               "nstep": sample_round(bufs["nstep"].sample, batch, calls, s["round_s"])}
        rates = interleaved(fns, s["repeats"])
        out[f"sample_{batch}"] = {
            **{f"{k}_per_s": median(v) for k, v in rates.items()}, **{f"{k}_repeats": v for k, v in rates.items()},
            "per_over_uniform": median([p / u for p, u in zip(rates["per"], rates["uniform"])]),
            "nstep_over_uniform": median([n / u for n, u in zip(rates["nstep"], rates["uniform"])]),
        }
    out["update"] = update_throughput(bufs["per"].buf, s)
    return _state(out)


def update_throughput(buf, s: dict) -> dict:
    """Priorities per second through batched update_priorities of stored ids."""
    torch = P._torch()
    rng = np.random.default_rng(0)
    out = {}
    for size in (256, 4096):
        ids = [buf.sample(size).ids for _ in range(4)]
        pri = [torch.from_numpy(rng.uniform(0.05, 2.0, size).astype(np.float32)) for _ in range(4)]
        calls = max(1, s["calls"][256] * 4 * 256 // size)

        def block(ids=ids, pri=pri, calls=calls) -> None:
            for i in range(calls):
                buf.update_priorities(ids[i % 4], pri[i % 4])

        run = functools.partial(block_rate, block, calls * size, s["round_s"])
        rates = interleaved({"update": run}, s["repeats"])["update"]
        out[str(size)] = {"priorities_per_s": median(rates), "repeats": rates}
    return out


def measure_feature_peer(name: str, s: dict) -> dict:
    """One PER or n-step peer beside the matching dqn_fast buffer."""
    cls = F.BY_NAME[name]
    reason = cls.unavailable()
    if reason:
        return _state({"unavailable": reason})
    ours_cls = F.DqnFastPrioritized if cls.kind == "per" else F.DqnFastNStep
    ours_reason = ours_cls.unavailable()
    cap = s["feature_capacity"]
    result: dict = {"exactness": cls.exactness, "kind": cls.kind}
    gc.collect()
    before = rss_bytes()
    peer = cls(cap, OBS_SHAPE, K, 1, seed=1)
    fill_steps([peer], cap, seed=7)
    result["rss_bytes_per_transition"] = (rss_bytes() - before) / cap
    ours = None if ours_reason else ours_cls(cap, OBS_SHAPE, K, 1, seed=2)
    if ours is not None:
        fill_steps([ours], cap, seed=8)
    else:
        result["dqn_fast"] = ours_reason
    for batch in BATCHES:
        calls = s["calls"][batch]
        if cls.kind == "per":
            fns = {"peer": per_round(peer, batch, calls, seed=batch, min_s=s["round_s"])}
            if ours is not None:
                fns["ours"] = per_round(ours, batch, calls, seed=batch, min_s=s["round_s"])
        else:
            fns = {"peer": sample_round(peer.sample, batch, calls, s["round_s"])}
            if ours is not None:
                fns["ours"] = sample_round(ours.sample, batch, calls, s["round_s"])
        rates = interleaved(fns, s["repeats"])
        result[f"sample_{batch}"] = (_summary(rates, "peer", "ours") if ours is not None
                                     else {"per_s": median(rates["peer"]), "repeats": rates["peer"]})
    peer.close()
    return _state(result)


def measure_1m(s: dict, fill_uniform) -> dict:
    """Called by suite.measure_ours after its uniform fill: a prioritized buffer of
    the same size from the same stream, interleaved with the uniform one, when the
    free memory holds both; `fill_uniform` is the filled uniform peer."""
    reason = F.DqnFastPrioritized.unavailable()
    if reason:
        return {"unavailable": reason}
    n = s["ours_fill"]
    need = fill_uniform.buf.nbytes * 1.15
    free = _mem_available()
    if free is not None and free < need:
        return {"skipped": f"needs {need / 1e9:.1f} GB free for a second buffer, {free / 1e9:.1f} GB available"}
    gc.collect()
    before = rss_bytes()
    per = F.DqnFastPrioritized(n, OBS_SHAPE, K, 1, seed=1)
    fill_steps([per], n, seed=s.get("ours_fill_seed", 4))
    out: dict = {"filled": n, "rss_growth_gb": (rss_bytes() - before) / 1e9}
    for batch in BATCHES:
        calls = s["calls"][batch]
        rates = interleaved({"uniform": sample_round(fill_uniform.sample, batch, calls, s["round_s"]),
                             "per": per_round(per, batch, calls, seed=batch, min_s=s["round_s"])}, s["repeats"])
        out[f"sample_{batch}"] = {"uniform_per_s": median(rates["uniform"]), "per_per_s": median(rates["per"]),
                                  "uniform_repeats": rates["uniform"], "per_repeats": rates["per"],
                                  "per_over_uniform": median([p / u for p, u in zip(rates["per"], rates["uniform"])])}
    del per
    gc.collect()
    return out


def _mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- orchestration
def run_features(s: dict, in_child, states: dict, log=print, only=None) -> dict:
    """{"ours": {state: ...}, "per": {peer: {state: ...}}, "nstep": {peer: {state: ...}}}."""
    out: dict = {"ours": {}, "per": {}, "nstep": {}}
    want = lambda name: not only or name in only
    for state, env in states.items() if want("dqn_fast") else ():
        start = time.time()
        out["ours"][state] = r = in_child(measure_ours_features, s, env=env)
        log(f"  dqn_fast uniform/prioritized/n-step [{state}]: {_status(r)} ({time.time() - start:.0f} s)")
    for kind, rows in (("per", F.PER), ("nstep", F.NSTEP)):
        for cls in rows:
            if cls.name.startswith("dqn_fast") or not want(cls.name):
                continue  # our own rows: measured in `ours` and beside every peer
            missing = cls.missing()
            if missing:
                out[kind][cls.name] = {"missing": missing}
                log(f"  {cls.name}: {missing}")
                continue
            out[kind][cls.name] = per_state = {}
            for state, env in states.items():
                start = time.time()
                per_state[state] = r = in_child(measure_feature_peer, cls.name, s, env=env)
                log(f"  {cls.name} [{state}]: {_status(r)} ({time.time() - start:.0f} s)")
                if "unavailable" in r:  # the same reason in every state: not run again
                    break
    return out


def _status(r: dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"]
    return r.get("unavailable", "done")
