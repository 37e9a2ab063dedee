"""`dqn-fast bench` end to end on tiny sizes: child processes, results.json,
the table and the plots; missing and inapplicable peers are reported."""

import json

import pytest

from dqn_fast.bench import peers, report, run, suite

TINY = dict(capacity=400, vector_capacity=200, add_capacity=100, repeats=2, add_steps_1env=20, add_steps_8env=4,
            calls={32: 2, 256: 1}, round_s=0.0, ours_fill=500, load_window_s=0.02, feature_capacity=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    only = ["dqn_fast", "SB3", "cpprb next_of+stack_compress", "SB3 NStepReplayBuffer"]
    r = run(quick=True, out_dir=str(out), only=only, sizes_override=TINY)
    return r, out


def test_results_json_holds_every_figure_with_its_repeats(results):
    r, out = results
    saved = json.loads((out / "results.json").read_text())
    assert saved["suite"]["peers"].keys() == r["suite"]["peers"].keys()
    assert saved["versions"]["numpy"] != "missing" and saved["machine"]["cpu_count"] >= 1
    sb3 = saved["suite"]["peers"]["SB3"]["atari"]
    for col in ("add_1env", "add_8env", "sample_32", "sample_256"):
        fig = sb3[col]
        assert fig["per_s"] > 0 and len(fig["repeats"]) == TINY["repeats"]
        assert fig["dqn_fast_per_s"] > 0 and fig["dqn_fast_speedup"] > 0
    assert sb3["memory"]["filled"] == TINY["capacity"]
    stored = sb3["memory"]["storage_bytes_per_transition"]
    assert stored > 2 * 4 * 84 * 84  # obs and next_obs, stacked
    assert 0.7 * stored < sb3["memory"]["rss_bytes_per_transition"] < 1.5 * stored  # RSS sees the filled arrays
    assert saved["suite"]["peers"]["SB3"]["vector"]["sample_32"]["per_s"] > 0
    compressed = saved["suite"]["peers"]["cpprb next_of+stack_compress"]["atari"]
    assert compressed["add_8env"] == {"not_applicable": peers.CpprbCompressed.supports(8)}
    ours = saved["suite"]["peers"]["dqn_fast"]["atari"]["sample_32"]
    assert ours["window_per_s"] > 0 and ours["numpy_take_per_s"] > 0 and ours["one_thread_per_s"] > 0
    assert len(ours["numpy_take_repeats"]) == TINY["repeats"]
    alone = saved["suite"]["dqn_fast_alone"]
    assert alone["memcpy_gb_per_s"] > 0 and alone["memory"]["len"] == TINY["ours_fill"]
    load = saved["suite"]["under_load"]
    for condition in ("quiet", "one_core_busy"):
        for batch in ("32", "256"):
            row = load[condition][batch]
            assert len(row["one_thread_repeats"]) == len(row["default_repeats"]) == TINY["repeats"]
            assert row["one_thread_per_s"] > 0 and row["default_over_one_thread"] > 0


def test_every_peer_is_sampled_again_with_a_warm_allocator(results):
    r, _ = results
    warm, default = r["suite"]["peers_warm"], r["suite"]["peers"]
    assert warm.keys() == default.keys()
    for name in warm:
        assert warm[name]["malloc_env"] == suite.WARM_MALLOC and default[name]["malloc_env"] == {}
        for b in (32, 256):
            assert warm[name]["atari"][f"sample_{b}"]["per_s"] > 0
        assert "add_1env" not in warm[name]["atari"] and not warm[name]["vector"]


def test_the_child_environment_sets_and_removes_the_allocator_variables(monkeypatch):
    import os

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4096")  # even a parent in another state gets glibc's defaults
    assert suite.in_child(os.getenv, "MALLOC_MMAP_THRESHOLD_", env=suite.ALLOCATOR_STATES["default"]) is None
    assert suite.in_child(os.getenv, "MALLOC_TRIM_THRESHOLD_", env=suite.ALLOCATOR_STATES["warm"]) == "67108864"
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == "4096" and "MALLOC_TRIM_THRESHOLD_" not in os.environ


def test_prioritized_and_nstep_figures_in_both_states(results):
    r, out = results
    f = r["suite"]["features"]
    for state in ("default", "warm"):
        ours = f["ours"][state]
        assert ours["malloc_env"] == ({} if state == "default" else suite.WARM_MALLOC)
        for b in (32, 256):
            row = ours[f"sample_{b}"]
            assert len(row["per_repeats"]) == len(row["uniform_repeats"]) == TINY["repeats"]
            assert row["per_over_uniform"] > 0 and row["nstep_over_uniform"] > 0
        assert ours["update"]["4096"]["priorities_per_s"] > 0
        sb3 = f["nstep"]["SB3 NStepReplayBuffer"][state]
        assert sb3["sample_32"]["per_s"] > 0 and sb3["sample_256"]["dqn_fast_speedup"] > 0
    one_m = r["suite"]["dqn_fast_alone"]["prioritized"]
    assert one_m["filled"] == TINY["ours_fill"] and one_m["sample_32"]["per_over_uniform"] > 0
    md = (out / "report.md").read_text()
    assert "| SB3 NStepReplayBuffer |" in md and "goal >= 3x the SB3 NStepReplayBuffer at batch 256" in md
    assert "in both allocator states" in md and "prioritized >= 80%" in md


def test_the_busy_core_is_started_and_stopped_by_the_benchmark():
    from dqn_fast.bench.under_load import BusyCore

    with BusyCore() as busy:
        assert busy.proc.poll() is None  # spinning
    assert busy.proc.poll() is not None  # and gone, even though it never exits by itself


def test_table_and_plots(results):
    r, out = results
    table = report.format_table(r)
    for name in r["suite"]["peers"]:
        assert name in table
    assert "n/a" in table and "of memcpy" in table and "one core busy, default" in table
    md = (out / "report.md").read_text()
    assert "| **dqn_fast** |" in md and "| SB3 |" in md and md.count("\n|") >= 2 + 3 + 2 + 3 + 2 + 2
    assert "| 256 |" in md  # the one-core-busy table
    for png in ("throughput.png", "memory.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_missing_peer_is_reported_not_dropped(monkeypatch):
    monkeypatch.setattr(peers.Tianshou, "modules", ("no_such_module_dqn_fast",))
    r = suite.run_suite(quick=True, only=["Tianshou"], sizes_override=TINY, log=lambda s: None, alone=False)
    assert r["peers"] == {"Tianshou": {"missing": "not installed (pip install tianshou)"}}
    assert "not installed (pip install tianshou)" in report.format_table(
        {"machine": {"cpu_count": 2, "python": "3"}, "quick": True, "suite": r})


def test_command_line_rejects_unknown_peers(capsys):
    from dqn_fast.cli import main

    assert main(["bench", "--peers", "dqn_fast,nope"]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err


def test_ratios_are_per_round_and_say_how_many_times_faster_we_are():
    rates = {"ours": [100.0, 300.0, 200.0], "peer": [50.0, 100.0, 100.0]}
    r = suite.ratio_summary(rates, "peer")
    assert r["per_s"] == 100.0 and r["dqn_fast_per_s"] == 200.0
    assert r["dqn_fast_speedup"] == 2.0  # median of 2, 3, 2: per round, not a ratio of medians


def test_a_child_that_dies_is_an_error_row_not_a_crash():
    import os

    r = suite.in_child(os._exit, 3)
    assert "died" in r["error"]
