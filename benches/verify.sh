#!/usr/bin/env bash
# What the verify commands cost, in one run, on one machine, against the floor and a peer:
#
# 1. `wal-verify --deep` over about 1 GiB of real WAL (pgbench -i of SCALE, archived by wal-push):
#    every stored object read, decoded and checked against its checksum. Beside it, the same run
#    without --deep (listing and continuity only), the raw read floor (`cat` of the same stored
#    objects to /dev/null), and the peer: `pgbackrest verify` over the same segments, which
#    pgBackRest archived (zst) from the same archive_command. Each with a warm page cache (the
#    objects were just written) and, as root, a cold one (caches dropped before the run).
# 2. `base-verify --restore-test LATEST` of the pgbench database's base backup (as in
#    benches/base-backup.sh): each step's time as base-verify reports it, against the plain drill it
#    automates: `base-fetch LATEST DIR --target-immediate` (verify included), `pg_ctl start -w`
#    until the server accepts connections, `psql -c 'select 1'`, `pg_ctl stop`.
#
# Usage: benches/verify.sh [SCALE] [RUNS]      (default scale 70, about 1.05 GiB; 3 runs, medians)
# Environment: WALSHIP_BENCH_DIR  scratch parent (default /var/tmp: not tmpfs; needs about 4 x the
#                                 database size free)
#              WALSHIP_PG_BIN     PostgreSQL's bin directory (default /usr/lib/postgresql/15/bin)
# Prints the command line, then Markdown tables. Release build. Needs root (or the postgres user,
# without the cold-cache rows); installs pgbackrest when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scale=${1:-70}
runs=${2:-3}
scratch_parent=${WALSHIP_BENCH_DIR:-/var/tmp}
echo "Command: WALSHIP_BENCH_DIR=$scratch_parent benches/verify.sh $scale $runs"
scripts/install-deps.sh
if ! command -v pgbackrest >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbackrest >/dev/null
fi
cargo build --release --quiet -p wal-push -p wal-fetch -p base-push -p base-fetch -p wal-verify -p base-verify

PG_BIN=${WALSHIP_PG_BIN:-/usr/lib/postgresql/15/bin}
as_server() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
root=0; [ "$(id -u)" = 0 ] && root=1

work=$(mktemp -d "$scratch_parent/walship-bench-verify.XXXXXX")
chmod 755 "$work"
data=$work/data
cleanup() {
  for dir in "$data" "$work/drill"; do
    [ -f "$dir/postmaster.pid" ] && as_server "$PG_BIN/pg_ctl" -D "$dir" -m immediate stop >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$work"/{bin,sock,logs,repo,pgbr,pgbr-spool,out,scratch}
for b in wal-push wal-fetch base-push base-fetch wal-verify base-verify; do cp "target/release/$b" "$work/bin/"; done
[ "$root" = 1 ] && chown -R postgres: "$work"
bin=$work/bin

cat >"$work/pgbackrest.conf" <<CONF
[global]
repo1-path=$work/pgbr
compress-type=zst
process-max=2
log-level-console=warn
log-level-file=off
lock-path=$work/pgbr-spool
spool-path=$work/pgbr-spool

[bench]
pg1-path=$data
pg1-socket-path=$work/sock
pg1-port=5432
CONF
pgbr() { as_server pgbackrest --config="$work/pgbackrest.conf" --stanza=bench "$@"; }

# --- the cluster: both archivers get every segment ------------------------------------------------
as_server "$PG_BIN/initdb" --no-sync -D "$data" -U postgres >/dev/null
cat >>"$data/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$work/sock'
port = 5432
archive_mode = on
archive_command = '$bin/wal-push --repo $work/repo %p %f && pgbackrest --config=$work/pgbackrest.conf --stanza=bench archive-push %p'
max_wal_size = 4GB
CONF
as_server "$PG_BIN/pg_ctl" -D "$data" -l "$work/logs/server.log" -w start >/dev/null
export PGHOST=$work/sock PGPORT=5432
psql_() { as_server "$PG_BIN/psql" -XAtq -d postgres "$@"; }
pgbr stanza-create >/dev/null
echo "pgbench -i -s $scale ..." >&2
as_server "$PG_BIN/pgbench" -i -q -s "$scale" postgres >/dev/null 2>&1
as_server "$bin/base-push" --repo "$work/repo" -- --checkpoint=fast >"$work/out/backup-name" 2>"$work/logs/base-push.log" ||
  { cat "$work/logs/base-push.log" >&2; exit 1; }
last=$(psql_ -c "select pg_walfile_name(pg_current_wal_lsn())")
psql_ -c "select pg_switch_wal()" >/dev/null
for _ in $(seq 1 600); do
  [ "$(psql_ -c "select coalesce(last_archived_wal, '') >= '$last' from pg_stat_archiver")" = t ] && break
  sleep 0.5
done
as_server "$PG_BIN/pg_ctl" -D "$data" -m fast stop >/dev/null
sync

mapfile -t objects < <(find "$work/repo/wal" -type f ! -name '.*' | sort)
segments=$(printf '%s\n' "${objects[@]}" | grep -c '/[0-9A-F]\{24\}$' || true)
seg_bytes=$((segments * 16 * 1024 * 1024))
stored_bytes=$(cat "${objects[@]}" | wc -c)
echo "${#objects[@]} WAL objects, $segments segments ($((seg_bytes >> 20)) MiB of WAL, $((stored_bytes >> 20)) MiB stored)" >&2

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}'; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# Runs "$@" RUNS times (caches dropped before each when $cache is cold); prints the median seconds.
measure() {
  local cache=$1 label=$2; shift 2
  : >"$work/out/times"
  for _ in $(seq 1 "$runs"); do
    [ "$cache" = cold ] && drop_caches
    local start; start=$(date +%s.%N)
    "$@" >"$work/out/stdout" 2>"$work/out/stderr" || { echo "$label failed:" >&2; cat "$work/out/stderr" >&2; exit 1; }
    elapsed "$start" >>"$work/out/times"; echo >>"$work/out/times"
  done
  median <"$work/out/times"
}
cat_objects() { cat "${objects[@]}" >/dev/null; }
deep() { as_server "$bin/wal-verify" --repo "$work/repo" --deep; }
shallow() { as_server "$bin/wal-verify" --repo "$work/repo"; }
pgbr_verify() { pgbr verify; }

caches=(warm); [ "$root" = 1 ] && caches+=(cold)
declare -A t
for cache in "${caches[@]}"; do
  echo "wal-verify, $cache cache ..." >&2
  t[cat.$cache]=$(measure "$cache" cat cat_objects)
  t[deep.$cache]=$(measure "$cache" "wal-verify --deep" deep)
  grep -q "healthy" "$work/out/stderr" || { echo "wal-verify --deep did not report healthy" >&2; exit 1; }
  t[shallow.$cache]=$(measure "$cache" wal-verify shallow)
  t[pgbr.$cache]=$(measure "$cache" "pgbackrest verify" pgbr_verify)
done

# --- restore test against the drill it automates ----------------------------------------------------
drill() {
  local start; start=$(date +%s.%N)
  as_server "$bin/base-fetch" --repo "$work/repo" LATEST "$work/drill" --target-immediate 2>"$work/logs/drill-fetch.log"
  grep -q "backup successfully verified" "$work/logs/drill-fetch.log" || { echo "pg_verifybackup did not pass" >&2; return 1; }
  elapsed "$start" >"$work/out/drill-fetch"
  start=$(date +%s.%N)
  as_server "$PG_BIN/pg_ctl" -D "$work/drill" -l "$work/logs/drill.log" -w -t 3600 \
    -o "-c listen_addresses='' -c unix_socket_directories='$work/sock' -c port=5433" start >/dev/null
  elapsed "$start" >"$work/out/drill-start"
  [ "$(as_server "$PG_BIN/psql" -XAtq -h "$work/sock" -p 5433 -d postgres -c 'select 1')" = 1 ]
  as_server "$PG_BIN/pg_ctl" -D "$work/drill" -m fast stop >/dev/null
  rm -rf "$work/drill"
}
restore_test() {
  as_server "$bin/base-verify" --repo "$work/repo" --restore-test --scratch "$work/scratch" --json LATEST >"$work/out/rt.json"
}
: >"$work/out/drill"; : >"$work/out/rt"
drop_caches_if_root() { if [ "$root" = 1 ]; then drop_caches; fi; }
for _ in $(seq 1 "$runs"); do
  drop_caches_if_root
  start=$(date +%s.%N)
  drill || exit 1
  echo "$(elapsed "$start") $(cat "$work/out/drill-fetch") $(cat "$work/out/drill-start")" >>"$work/out/drill"
  drop_caches_if_root
  restore_test || { echo "base-verify --restore-test failed" >&2; exit 1; }
  python3 - "$work/out/rt.json" >>"$work/out/rt" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
test = report["backups"][0]["restore_test"]
steps = test["steps"]
print(" ".join(str(round(steps[k], 2)) for k in ("download_and_extract", "verify", "replay", "check", "stop_and_cleanup")),
      round(test["rto_seconds"], 2), round(report["duration_seconds"], 2))
PY
done
col() { cut -d' ' -f"$2" "$1" | median; }

mbps() { awk -v b="$1" -v s="$2" 'BEGIN {printf "%.0f", b / 1e6 / s}'; }
echo
echo "WAL: $segments segments, $((seg_bytes >> 20)) MiB ($((stored_bytes >> 20)) MiB stored, ${#objects[@]} objects); $(nproc) cores; $runs runs, medians; MB/s of WAL (original bytes)."
echo
echo "| check | cache | s | MB/s |"
echo "|---|---|---|---|"
for cache in "${caches[@]}"; do
  printf '| `cat` of the stored objects (read floor) | %s | %s | %s |\n' "$cache" "${t[cat.$cache]}" "$(mbps "$seg_bytes" "${t[cat.$cache]}")"
  printf '| `wal-verify --deep` (decode + SHA-256 of every object) | %s | %s | %s |\n' "$cache" "${t[deep.$cache]}" "$(mbps "$seg_bytes" "${t[deep.$cache]}")"
  printf '| `wal-verify` (listing and continuity only) | %s | %s | - |\n' "$cache" "${t[shallow.$cache]}"
  printf '| `pgbackrest verify` (same segments, zst) | %s | %s | %s |\n' "$cache" "${t[pgbr.$cache]}" "$(mbps "$seg_bytes" "${t[pgbr.$cache]}")"
done
db_bytes=$(python3 -c "import json; print(json.load(open('$work/out/rt.json'))['backups'][0]['original_bytes'])")
echo
echo "Restore test of a $((db_bytes >> 20)) MiB backup (pgbench scale $scale); seconds, medians of $runs; caches dropped before each run: $([ "$root" = 1 ] && echo yes || echo no)."
echo
echo "| step | base-fetch + pg_ctl start (the drill by hand) | base-verify --restore-test |"
echo "|---|---|---|"
drill_total=$(col "$work/out/drill" 1); drill_fetch=$(col "$work/out/drill" 2); drill_start=$(col "$work/out/drill" 3)
printf '| download, extract, pg_verifybackup | %s | %s + %s |\n' "$drill_fetch" "$(col "$work/out/rt" 1)" "$(col "$work/out/rt" 2)"
printf '| start: replay to consistency, accept connections | %s | %s |\n' "$drill_start" "$(col "$work/out/rt" 3)"
printf '| check query, stop, clean up | (in the total) | %s + %s |\n' "$(col "$work/out/rt" 4)" "$(col "$work/out/rt" 5)"
printf '| RTO (download to accepting connections) | %s + %s | %s |\n' "$drill_fetch" "$drill_start" "$(col "$work/out/rt" 6)"
printf '| total | %s | %s |\n' "$drill_total" "$(col "$work/out/rt" 7)"
