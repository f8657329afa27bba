#!/usr/bin/env bash
# Same-run A/B of bench_ffn on a GPU machine: A = the tree in a tarball (e.g. `git archive <commit>`),
# B = this checkout. Builds both bench_ffn programs, runs their quick suites interleaved
# (A, B, A, B; each pair only while time is left) and compares them with bench/ab_compare.py.
#
#   bash bench/ab_gpu.sh A.tar OUT [SECONDS]     (SECONDS: time budget of the runs, default 300)
set -uo pipefail
cd "$(dirname "$0")/.."
TAR=$1 OUT=$2 BUDGET=${3:-300}
mkdir -p "$OUT" /tmp/ab_A
tar xf "$TAR" -C /tmp/ab_A
cfg=(-G Ninja -DCMAKE_CUDA_ARCHITECTURES="80;90a-real" -DTWELL_BUILD_BENCH=ON -DTWELL_BUILD_TESTS=OFF)
(cd /tmp/ab_A && cmake -S . -B build/ab "${cfg[@]}" > "$OUT/build_A.log" 2>&1 &&
   cmake --build build/ab -j"$(nproc)" --target bench_ffn >> "$OUT/build_A.log" 2>&1) &
cmake -S . -B build/ab "${cfg[@]}" > "$OUT/build_B.log" 2>&1 && cmake --build build/ab -j"$(nproc)" --target bench_ffn >> "$OUT/build_B.log" 2>&1
wait
A=/tmp/ab_A/build/ab/bench_ffn B=$PWD/build/ab/bench_ffn
[ -x "$A" ] && [ -x "$B" ] || { echo "build failed"; tail -20 "$OUT"/build_*.log; exit 1; }
start=$(date +%s) files=()
for i in 1 2; do
  t0=$(date +%s)
  timeout $BUDGET "$A" --suite quick > "$OUT/A$i.jsonl" 2> "$OUT/A$i.err" || break
  timeout $BUDGET "$B" --suite quick > "$OUT/B$i.jsonl" 2> "$OUT/B$i.err" || break
  files+=("$OUT/A$i.jsonl" "$OUT/B$i.jsonl")
  pair=$(( $(date +%s) - t0 ))
  echo "pair $i: $pair s"
  [ $(( $(date +%s) - start + pair )) -lt "$BUDGET" ] || break
done
python3 bench/ab_compare.py "${files[@]}" | tee "$OUT/ab_compare.txt"
