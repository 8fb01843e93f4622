#!/usr/bin/env bash
# Runs vouch's cargo-fuzz targets (fuzz/, see docs/fuzzing.md) one at a time, each until it
# has used FUZZ_CPU_SECONDS of CPU (default 30; user + system time of the fuzzer process, read
# from /proc, so a busy shared machine does not shorten a run), at `nice -n 19`, and prints one
# table row per target: executions per CPU second, total executions, CPU seconds, crashes.
#
# Needs a nightly toolchain (installed with rustup if missing) and cargo-fuzz (installed into
# $VOUCH_CACHE/cargo-root if missing). Pass target names to run only those. Builds with
# optimisations, debug assertions and overflow checks, without a sanitizer (the targets are safe
# Rust; the heap bound is checked by the targets' own allocator). FUZZ_SECONDS is accepted as
# the old name of FUZZ_CPU_SECONDS. FUZZ_WALL_LIMIT (default 8 x the CPU budget + 120) stops a
# run that cannot get the CPU. Extra libFuzzer flags: FUZZ_FLAGS.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"
CPU=${FUZZ_CPU_SECONDS:-${FUZZ_SECONDS:-30}}
WALL=${FUZZ_WALL_LIMIT:-$((CPU * 8 + 120))}
VOUCH_CACHE=${VOUCH_CACHE:-$HOME/.cache/vouch}
export PATH="$VOUCH_CACHE/cargo-root/bin:$PATH"
export CARGO_INCREMENTAL=0

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "[fuzz] installing the nightly toolchain (cargo-fuzz needs it)" >&2
  rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "[fuzz] cargo install cargo-fuzz 0.13.2 (a few minutes)" >&2
  cargo install --quiet --locked cargo-fuzz --version 0.13.2 --root "$VOUCH_CACHE/cargo-root"
fi

targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
build=(cargo +nightly fuzz build -O -a -s none)
echo "[fuzz] ${build[*]} ${targets[*]}" >&2
for t in "${targets[@]}"; do nice -n 19 "${build[@]}" "$t"; done
bin_dir=$(ls -d target/*/release | head -1)
tck=$(getconf CLK_TCK)

# CPU seconds (user + system) of a live process, from /proc/<pid>/stat fields 14 and 15.
cpu_of() { awk -v t="$tck" '{ sub(/.*\) /, ""); printf "%.1f", ($12 + $13) / t }' "/proc/$1/stat" 2>/dev/null; }

results="target/fuzz-smoke-$(date -u +%Y%m%dT%H%M%SZ).md"
echo "| target | execs/CPU s | total execs | CPU s | crashes | new corpus units |" >"$results"
echo "|---|---|---|---|---|---|" >>"$results"
failed=()
pid=
trap '[ -z "$pid" ] || kill -INT "$pid" 2>/dev/null || true' EXIT
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  dirs=("corpus/$t")
  [ -d "seeds/$t" ] && dirs+=("seeds/$t")
  log="target/fuzz-$t.log"
  echo "[fuzz] $t until ${CPU} CPU seconds (log: fuzz/$log)" >&2
  before=$(find "artifacts/$t" -type f | wc -l)
  nice -n 19 "$bin_dir/$t" "${dirs[@]}" -artifact_prefix="artifacts/$t/" -print_final_stats=1 \
    -timeout=30 -rss_limit_mb=4096 -max_total_time="$WALL" ${FUZZ_FLAGS:-} >"$log" 2>&1 &
  pid=$!
  used=0
  while kill -0 "$pid" 2>/dev/null; do
    used=$(cpu_of "$pid" || echo "$used")
    if awk -v u="${used:-0}" -v c="$CPU" 'BEGIN { exit !(u >= c) }'; then
      kill -INT "$pid" 2>/dev/null || true
      break
    fi
    sleep 2
  done
  rc=0
  wait "$pid" || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  units=$(sed -n 's/^stat::new_units_added: *//p' "$log" | tail -1)
  crashes=$(($(find "artifacts/$t" -type f | wc -l) - before))
  # libFuzzer exits 72 when interrupted (our CPU budget), 0 at its own time limit.
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 72 ] || [ "$crashes" -gt 0 ]; then failed+=("$t"); fi
  rate=$(awk -v e="${execs:-0}" -v u="$used" 'BEGIN { printf "%d", (u > 0 ? e / u : 0) }')
  echo "| \`$t\` | $rate | ${execs:-?} | $used | $crashes (exit $rc) | ${units:-?} |" | tee -a "$results" >&2
done
echo "[fuzz] results: fuzz/$results" >&2
if [ ${#failed[@]} -gt 0 ]; then
  echo "[fuzz] FAILED: ${failed[*]} (crash inputs under fuzz/artifacts/)" >&2
  exit 1
fi
echo "[fuzz] all targets ran ${CPU} CPU seconds without a crash" >&2
