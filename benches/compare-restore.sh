#!/usr/bin/env bash
# wal-fetch of two revisions against each other, interleaved, on local disk and real pgbench WAL.
#
# Why a second script beside wal-throughput.sh: on this 2-core machine the same build measured an
# hour apart differs by 10% and more, which is larger than most changes worth looking at. Here
# both revisions run in turns (A, B, A, B, …) within minutes, so drift falls on both alike.
#
# 1. Each revision is checked out into a worktree at a fixed place (target/compare/a and .../b, so
#    that cargo, which keys artifacts by path, rebuilds only what changed since the last run) and
#    built (release) into target/compare/target: not the repository's own target/, where cargo, which
#    names a workspace member's artifacts the same whatever its path, would hand another revision's
#    library to the next build of the checkout.
# 2. WAL: a PostgreSQL 15 cluster, pgbench -i -s 30, then pgbench -c 4 -j 2 until SEGMENTS
#    segments wait as .ready (archive_command = '', checkpoint_timeout = 30s, as wal-throughput.sh).
# 3. For each of ROUNDS rounds, for each revision: a fresh local repository filled by that
#    revision's wal-push (look_ahead 16, parallel 4), then REPEATS restores of every segment by
#    benches/archiver.py's recovery emulation, with prefetch (16, parallel 4) and serial (prefetch 0).
# Prints each run, then per configuration: mean wall seconds, segments/s, median p50, peak RSS.
#
# Usage: benches/compare-restore.sh REV_A REV_B [ROUNDS] [REPEATS] [SEGMENTS]   (defaults 2 5 64)
# Run as root (PostgreSQL then runs as postgres) or as a user who can run initdb.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n '18p' "$0" >&2; exit 2; }
rev_a=$1 rev_b=$2 rounds=${3:-2} repeats=${4:-5} segments=${5:-64}
echo "Command: benches/compare-restore.sh $rev_a $rev_b $rounds $repeats $segments"
PG_BIN=${WALSHIP_PG_BIN:-/usr/lib/postgresql/15/bin}
as_pg=()
[ "$(id -u)" = 0 ] && as_pg=(runuser -u postgres --)
pg() { "${as_pg[@]}" "$@"; }

work=$(mktemp -d /var/tmp/walship-compare.XXXXXX)
chmod 755 "$work"
cleanup() {
  [ -f "$work/src/postmaster.pid" ] && pg "$PG_BIN/pg_ctl" -D "$work/src" -m immediate stop >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work"/{bin,sock,conf,out}
rustc -O --edition 2021 benches/wal-throughput-runner.rs -o "$work/bin/runner"
cp benches/archiver.py "$work/bin/"

# --- 1. the builds ---------------------------------------------------------------------------------
for label in a b; do
  rev=$([ $label = a ] && echo "$rev_a" || echo "$rev_b")
  tree=$PWD/target/compare/$label
  if [ -d "$tree" ]; then
    git -C "$tree" checkout --quiet --detach "$rev"
  else
    git worktree add --quiet --detach "$tree" "$rev"
  fi
  echo "building $label = $rev ($(git rev-parse --short "$rev"))" >&2
  cargo build --release --quiet --manifest-path "$tree/Cargo.toml" --target-dir target/compare/target -p wal-push -p wal-fetch
  mkdir -p "$work/bin/$label"
  cp target/compare/target/release/wal-push target/compare/target/release/wal-fetch "$work/bin/$label/"
done

# --- 2. the WAL ------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] && chown -R postgres "$work"
pg "$PG_BIN/initdb" --no-sync -D "$work/src" -U postgres >/dev/null
printf "listen_addresses = ''\nunix_socket_directories = '%s'\narchive_mode = on\narchive_command = ''\nmax_wal_size = 8GB\ncheckpoint_timeout = 30s\n" \
  "$work/sock" >>"$work/src/postgresql.conf"
pg "$PG_BIN/pg_ctl" -D "$work/src" -l "$work/src.log" -w start >/dev/null
pg "$PG_BIN/pgbench" -h "$work/sock" -i -q -s 30 postgres >/dev/null 2>&1
ready() { ls "$work/src/pg_wal/archive_status" | sed -n 's/\.ready$//p' | LC_ALL=C sort; }
while [ "$(ready | wc -l)" -lt "$segments" ]; do
  pg "$PG_BIN/pgbench" -h "$work/sock" -n -c 4 -j 2 -T 5 postgres >/dev/null 2>&1
done
pg "$PG_BIN/pg_ctl" -D "$work/src" -m fast -w stop >/dev/null
ready | head -n "$segments" >"$work/segments.txt"

# --- 3. the runs -----------------------------------------------------------------------------------
run_revision() {
  local label=$1 bin=$work/bin/$1 repo=$work/repo-$1 f i mode
  rm -rf "$repo" "$work/rec" "$work/src/walship"
  mkdir -p "$repo" "$work/rec/global"
  cp "$work/src/global/pg_control" "$work/rec/global/"
  printf 'repo = "%s"\n[push]\nlook_ahead = 16\nparallel = 4\n' "$repo" >"$work/conf/push-$label.toml"
  printf 'repo = "%s"\n[fetch]\nprefetch = 16\nparallel = 4\n' "$repo" >"$work/conf/prefetch-$label.toml"
  printf 'repo = "%s"\n[fetch]\nprefetch = 0\n' "$repo" >"$work/conf/serial-$label.toml"
  while read -r f; do
    (cd "$work/src" && "$bin/wal-push" --config "$work/conf/push-$label.toml" "pg_wal/$f" "$f" 2>>"$work/push.log")
  done <"$work/segments.txt"
  [ "$(id -u)" = 0 ] && chown -R postgres "$work"
  for i in $(seq 1 "$repeats"); do
    for mode in prefetch serial; do
      sync
      pg env -i PATH=/usr/bin:/bin /usr/bin/python3 "$work/bin/archiver.py" restore --runner "$work/bin/runner" \
        --data "$work/rec" --source "$work/src/pg_wal" --segments "$work/segments.txt" \
        --label "$label: wal-fetch, $mode" --group "$label-$mode" --warm "$repo" --results "$work/results.jsonl" \
        --command "$bin/wal-fetch --config $work/conf/$mode-$label.toml %f %p" --local-marker prefetched, \
        --scratch "$work/out" --log "$work/fetch-$label.log" >&2
    done
  done
}
for round in $(seq 1 "$rounds"); do
  echo "round $round of $rounds" >&2
  run_revision a
  run_revision b
done
/usr/bin/python3 - "$work/results.jsonl" "$segments" "$rev_a" "$rev_b" <<'EOF'
import json, statistics, sys
path, segments, rev_a, rev_b = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
runs = {}
for line in open(path):
    row = json.loads(line)
    runs.setdefault(row["label"], []).append(row)
print(f"\na = {rev_a}, b = {rev_b}; {segments} segments of 16 MiB, local disk\n")
print("| configuration | runs | mean s | seg/s | median p50 ms | peak RSS MiB |")
print("|---|---|---|---|---|---|")
for label in sorted(runs):
    rows = runs[label]
    secs = [r["seconds"] for r in rows]
    print(f"| {label} | {len(rows)} | {statistics.mean(secs):.3f} | {segments / statistics.mean(secs):.1f} "
          f"| {statistics.median(r['p50_ms'] for r in rows):.1f} | {max(r['peak_kib'] for r in rows) / 1024:.1f} |")
EOF
