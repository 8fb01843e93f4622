#!/usr/bin/env bash
# Benchmark: `vouch serve` serving its binary cache vs Debian's nginx serving the same directory
# as static files (docs/benchmarks.md, "Binary cache over HTTP"). One command, ratios printed:
#
#   scripts/bench-serve.sh            # release build of vouch, then the runs
#
# - narinfo requests/s: wrk, 64 connections, 2 threads, VOUCH_BENCH_SECS (10) seconds, on one
#   narinfo of a cache of 2 000, and on all 2 000 in random order, VOUCH_BENCH_NARINFO_RUNS (3)
#   times each, interleaved, best kept; and the servers' own CPU time per request over all
#   runs (user + system of every thread, from /proc), which other work on the machine moves
#   far less than it moves requests/s;
# - NAR MiB/s: a 256 MiB NAR fetched whole with curl, VOUCH_BENCH_NAR_RUNS (5) times each,
#   interleaved, best kept;
# - memory: vouch's RSS before, after the narinfo load and after the NAR runs (VmRSS, VmHWM).
#
# Needs wrk, nginx and curl (scripts/setup-host.sh installs them). Everything listens on
# 127.0.0.1 only, runs a bounded time and stops by itself; the data lives in a temporary
# directory that is removed at the end.
set -euo pipefail

cd "$(dirname "$0")/.."
SECS=${VOUCH_BENCH_SECS:-10}
RUNS=${VOUCH_BENCH_NAR_RUNS:-5}
NARINFO_RUNS=${VOUCH_BENCH_NARINFO_RUNS:-3}
for t in wrk nginx curl; do
  command -v "$t" >/dev/null || [ -x "/usr/sbin/$t" ] || { echo "bench-serve: $t missing (scripts/setup-host.sh)" >&2; exit 1; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

CARGO_INCREMENTAL=0 cargo build --release -q -p host-launcher --bin vouch
VOUCH=$PWD/target/release/vouch

WORK=$(mktemp -d)
chmod 755 "$WORK" # nginx workers (user nobody) read the cache
VOUCH_PID=""
NGINX_PID=""
cleanup() {
  [ -n "$VOUCH_PID" ] && kill "$VOUCH_PID" 2>/dev/null && wait "$VOUCH_PID" 2>/dev/null || true
  [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# The cache: nix-cache-info, 2 000 narinfos, one 256 MiB NAR (random bytes).
CACHE=$WORK/state/cache
mkdir -p "$CACHE/nar"
printf 'StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n' > "$CACHE/nix-cache-info"
python3 - "$CACHE" <<'PY'
import hashlib, os, sys
cache = sys.argv[1]
alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
def h(i):
    d = hashlib.sha256(str(i).encode()).digest()
    return "".join(alphabet[b % 32] for b in d[:32])
for i in range(2000):
    p = h(i)
    refs = " ".join(f"{h(i + k)}-dep-{k}" for k in range(1, 6))
    text = (f"StorePath: /nix/store/{p}-bench-{i}\nURL: nar/{h(-i)}.nar\nCompression: none\n"
            f"FileHash: sha256:{h(-i)}\nFileSize: 123456\nNarHash: sha256:{h(-i)}\nNarSize: 123456\n"
            f"References: {refs}\nDeriver: {h(i * 7)}-bench-{i}.drv\n"
            f"Sig: bench-1:{'A' * 86}==\n")
    open(os.path.join(cache, p + ".narinfo"), "w").write(text)
print(h(0), file=open(os.path.join(cache, "..", "first"), "w"))
with open(os.path.join(cache, "..", "all.lua"), "w") as f:
    f.write("local paths = {" + ",".join(f'"/{h(i)}.narinfo"' for i in range(2000)) + "}\n")
    f.write("request = function() return wrk.format(nil, paths[math.random(#paths)]) end\n")
PY
head -c $((256 << 20)) /dev/urandom > "$CACHE/nar/big.nar"
NARINFO=$(cat "$WORK/state/first").narinfo

# vouch serve on the cache: no warm pool, so no VM is involved.
"$VOUCH" --state-dir "$WORK/state" serve --listen 127.0.0.1:0 --max-connections-per-peer 1024 --pool 0 \
  2> "$WORK/vouch.log" &
VOUCH_PID=$!
for _ in $(seq 100); do grep -q "listening on" "$WORK/vouch.log" && break; sleep 0.1; done
VOUCH_URL=$(grep -o 'http://[0-9.:]*' "$WORK/vouch.log" | head -1)

# nginx on the same directory: Debian's binary, a minimal static configuration.
NGINX_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$WORK/nginx"
cat > "$WORK/nginx/nginx.conf" <<EOF
worker_processes auto;
daemon off;
pid $WORK/nginx/pid;
error_log $WORK/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fastcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi;
  scgi_temp_path $WORK/nginx/scgi;
  server { listen 127.0.0.1:$NGINX_PORT; root $CACHE; }
}
EOF
"$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" &
NGINX_PID=$!
NGINX_URL=http://127.0.0.1:$NGINX_PORT
for _ in $(seq 100); do curl -sf "$NGINX_URL/nix-cache-info" >/dev/null && break; sleep 0.1; done
for u in "$VOUCH_URL" "$NGINX_URL"; do
  curl -sf "$u/$NARINFO" | cmp -s - "$CACHE/$NARINFO" || { echo "bench-serve: $u serves a wrong narinfo:" >&2; curl -si "$u/$NARINFO" | head -3 >&2; exit 1; }
done

rss() { awk '/VmRSS/ {r=$2} /VmHWM/ {h=$2} END {printf "%d/%d", r/1024, h/1024}' "/proc/$VOUCH_PID/status"; }
RSS0=$(rss)
NGINX_WORKERS=$(pgrep -P "$NGINX_PID" | tr '\n' ' ')
# CPU time (clock ticks, user + system) of every thread of the processes PIDS….
ticks() {
  local s=0 f
  for f in $(for p in "$@"; do echo "/proc/$p/task/"*/stat; done); do s=$((s + $(awk '{print $14 + $15}' "$f"))); done
  echo "$s"
}
# One wrk run (WRK-ARGS…) against the server whose processes are PIDS (one word), appended to
# the runs file as "WORKLOAD SERVER requests/s requests ticks"; errors or non-2xx answers stop it.
measure() {
  local workload=$1 server=$2 pids=$3 t0 out t1
  shift 3
  t0=$(ticks $pids); out=$(wrk -t2 -c64 -d"${SECS}s" "$@"); t1=$(ticks $pids)
  if grep -q "Non-2xx\|Socket errors" <<<"$out"; then echo "bench-serve: wrk $*: $out" >&2; exit 1; fi
  echo "$workload $server $(awk '/Requests\/sec/ {print $2}' <<<"$out") $(awk '/requests in/ {print $1}' <<<"$out") $((t1 - t0))" >> "$WORK/runs"
}
# Warm both, then measure, interleaved.
wrk -t2 -c64 -d2s "$VOUCH_URL/$NARINFO" >/dev/null; wrk -t2 -c64 -d2s "$NGINX_URL/$NARINFO" >/dev/null
for _ in $(seq "$NARINFO_RUNS"); do
  measure one vouch "$VOUCH_PID" "$VOUCH_URL/$NARINFO"; measure one nginx "$NGINX_WORKERS" "$NGINX_URL/$NARINFO"
  measure all vouch "$VOUCH_PID" -s "$WORK/state/all.lua" "$VOUCH_URL"
  measure all nginx "$NGINX_WORKERS" -s "$WORK/state/all.lua" "$NGINX_URL"
done
RSS1=$(rss)

nar_mibs() { curl -s -o /dev/null -w '%{speed_download}' "$1/nar/big.nar" | awk '{printf "%.0f", $1 / 1048576}'; }
V_NAR=0; N_NAR=0
for _ in $(seq "$RUNS"); do
  v=$(nar_mibs "$VOUCH_URL"); n=$(nar_mibs "$NGINX_URL")
  [ "$v" -gt "$V_NAR" ] && V_NAR=$v
  [ "$n" -gt "$N_NAR" ] && N_NAR=$n
done
RSS2=$(rss)

ratio() { python3 -c "print(f'{float(\"$1\") / float(\"$2\"):.2f}')"; }
echo
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); nginx $("$NGINX" -v 2>&1 | cut -d/ -f2); $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)"
printf '| measure | vouch serve | nginx | vouch / nginx |\n|---|---|---|---|\n'
python3 - "$WORK/runs" "$SECS" "$(getconf CLK_TCK)" <<'PY'
import sys
runs, secs, hz = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = {}
for line in open(runs):
    w, srv, rps, n, t = line.split()
    r = rows.setdefault((w, srv), [0.0, 0, 0, 0])
    r[0] = max(r[0], float(rps)); r[1] += int(n); r[2] += int(t); r[3] += 1
name = {"one": "one narinfo", "all": "all 2 000 narinfos in random order"}
for w in ("one", "all"):
    v, n = rows[(w, "vouch")], rows[(w, "nginx")]
    print(f"| narinfo requests/s, {name[w]} (64 connections, best of {v[3]} × {secs}s) "
          f"| {v[0]:.0f} | {n[0]:.0f} | **{v[0] / n[0]:.2f}×** |")
    us = lambda r: r[2] * 1e6 / hz / r[1]
    print(f"| server CPU µs per narinfo request, {name[w]} (all runs) "
          f"| {us(v):.1f} | {us(n):.1f} | **{us(n) / us(v):.2f}×** less |")
PY
printf '| 256 MiB NAR, MiB/s (one client, best of %s) | %s | %s | **%s×** |\n' "$RUNS" "$V_NAR" "$N_NAR" "$(ratio "$V_NAR" "$N_NAR")"
echo "vouch RSS/peak MiB: idle $RSS0, after the narinfo load $RSS1, after the NAR runs $RSS2"
