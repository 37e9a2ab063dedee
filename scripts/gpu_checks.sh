#!/usr/bin/env bash
# Every GPU check in one run, on a machine with CUDA torch and no registry:
#   1. install the carried wheels (.whl/: gymnasium, ale-py, farama-notifications,
#      stable-baselines3 for the machine's Python) if there are any;
#   2. build and install dqn_fast without touching the network;
#   3. the test suite on that machine (training tests pick the GPU with --device auto);
#   4. scripts/gpu_check.py: CUDA prefetch == CPU prefetch, replay-to-GPU rates,
#      learner feed, Atari training vs the CleanRL-style loop (writes $OUT/gpu_results.json);
#   5. `dqn-fast bench --quick --peers dqn_fast`: sample_into pinned vs pageable tensors
#      (the pinned figure needs CUDA; writes $OUT/bench/).
# Usage: bash scripts/gpu_checks.sh [pytest args]   (default: the whole suite except
#        the 2-minute CartPole learning test, which a GPU only slows down)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
nvidia-smi -L
python3 -m pip install -q --no-build-isolation --no-deps . || exit 1
# -P: the source tree must not shadow the installed package (it has no _core).
[ $# -eq 0 ] && set -- tests/ -k "not cartpole_reaches"
python3 -P -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest.txt"
tests=$?
python3 -P scripts/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.txt"
checks=$?
python3 -P -m dqn_fast.cli bench --quick --peers dqn_fast --out "$OUT/bench" 2>&1 | tee "$OUT/bench.txt"
bench=$?
echo "pytest rc=$tests gpu_check rc=$checks bench rc=$bench"
exit $(( tests || checks || bench ))
