#!/usr/bin/env bash
# First GPU look, one call: environment, the suite's CuPy cases, compute-sanitizer over
# benchmarks/gpu_driver.py, the quick bench (GPU record). Each phase has its own time limit and a
# failing phase does not stop the next. Logs go to $1 (default $OUT). Run from the repo root.
set -u
out=${1:-${OUT:?give an output directory}}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1 BNCUPY_BACKEND=auto
summary="$out/summary.txt"
phase() {  # phase NAME SECONDS LOG COMMAND...
    local name=$1 limit=$2 log=$3 t0 rc
    shift 3
    t0=$(date +%s)
    echo "=== $name ($limit s): $*" >>"$log"
    timeout -s INT -k 10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$summary"
}
S=${GPU_CHECK_SCALE:-1}  # scales every limit (the CPU rehearsal uses larger ones)
phase env $((30*S)) "$out/env.txt" sh -c 'nvidia-smi; python3 -c "import sys,numpy,cupy;print(sys.version);print(numpy.__version__,cupy.__version__,cupy.cuda.runtime.runtimeGetVersion())"; python3 -c "import torch;print(torch.__version__,torch.version.cuda)"; python3 -m bncupy info'
phase suite $((140*S)) "$out/suite.log" python3 -m pytest -p no:cacheprovider -m gpu -o addopts= \
    -rfEs -q --timeout=60 --junitxml="$out/suite.xml" tests
san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$san" ]; then
    for tool in memcheck:$((45*S)) racecheck:$((30*S)); do
        phase "sanitizer-${tool%%:*}" "${tool##*:}" "$out/sanitizer.log" "$san" --tool "${tool%%:*}" \
            --print-limit 20 --error-exitcode 9 python3 benchmarks/gpu_driver.py
    done
else
    echo "sanitizer not available" | tee -a "$summary"
fi
phase bench $((90*S)) "$out/bench.log" python3 -m bncupy bench --quick --no-suite --out "$out"
grep -E "passed|failed|error" "$out/suite.log" | tail -3 >>"$summary"
tail -40 "$out/bench.log" >>"$summary"
cat "$summary"
