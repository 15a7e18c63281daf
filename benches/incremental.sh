#!/usr/bin/env bash
# Incremental against full base backups, in one run, on one machine:
#
#   1. A pgbench database of SCALE (70: about 1 GiB) on PostgreSQL 18 (summarize_wal = on, archiving
#      through wal-push), a full base-push, then 5% of pgbench_accounts' rows updated (one contiguous
#      range of aid: the pages a day of changes touches, not a random 5% that would dirty every page).
#   2. After the update: `base-push --incremental` (on top of the full) and a second full base-push,
#      each timed, each with its stored size; the floor beside them: `pg_basebackup --incremental`
#      and a full `pg_basebackup -Ft` to local disk, no compression (what PostgreSQL itself sends).
#   3. Restores: `base-fetch` of the incremental (fetch both links, pg_combinebackup, pg_verifybackup)
#      against `base-fetch` of the second full; the floor: `pg_combinebackup` of the two plain
#      pg_basebackup directories already on local disk.
#   4. The peer: pgBackRest 2.45 (Debian's) refuses PostgreSQL 17 and 18 ("unexpected control
#      version"), and only 17+ has incremental pg_basebackup; so the same database and update run on
#      PostgreSQL 15 with `pgbackrest backup --type=full`, then `--type=incr`, and `pgbackrest restore`
#      of the incremental. Same data, same machine, same run; not the same server version.
#
# Usage: benches/incremental.sh [SCALE] [RUNS]      (default scale 70, 1 run)
# Environment: WALSHIP_BENCH_DIR scratch parent (default /var/tmp: not tmpfs; needs about 8 x the
#              database size free)
# Prints the command line, then Markdown tables. Release build. Needs root or the postgres user.
set -euo pipefail
cd "$(dirname "$0")/.."
scale=${1:-70}
runs=${2:-1}
scratch_parent=${WALSHIP_BENCH_DIR:-/var/tmp}
echo "Command: WALSHIP_BENCH_DIR=$scratch_parent benches/incremental.sh $scale $runs"
scripts/install-deps.sh
if ! command -v pgbackrest >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbackrest >/dev/null
fi
cargo build --release --quiet -p wal-push -p wal-fetch -p base-push -p base-fetch

cache=${WALSHIP_PG_CACHE:-/var/cache/walship-tests/postgresql}
[ "$(id -u)" = 0 ] || cache=${WALSHIP_PG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/walship-tests/postgresql}
PG18=$cache/18/bin
PG15=/usr/lib/postgresql/15/bin
as_server() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

work=$(mktemp -d "$scratch_parent/walship-bench-incr.XXXXXX")
chmod 755 "$work"
cleanup() {
  for pair in "$PG18:$work/data18" "$PG15:$work/data15"; do
    dir=${pair#*:}
    [ -f "$dir/postmaster.pid" ] && as_server "${pair%%:*}/pg_ctl" -D "$dir" -m immediate stop >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$work"/{bin,sock18,sock15,logs,repo,pgbr,pgbr-spool,out,plain}
for b in wal-push wal-fetch base-push base-fetch; do cp "target/release/$b" "$work/bin/"; done
[ "$(id -u)" = 0 ] && chown -R postgres: "$work"
bin=$work/bin

# Starts a cluster of bin directory $1 in $2 with socket directory $3, archiving with $4; pgbench -i.
start_cluster() {
  local pg=$1 data=$2 sock=$3 archive=$4
  as_server "$pg/initdb" --no-sync -D "$data" -U postgres >/dev/null 2>&1
  cat >>"$data/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$sock'
port = 5432
archive_mode = on
archive_command = '$archive'
max_wal_size = 4GB
CONF
  as_server "$pg/pg_ctl" -D "$data" -l "$work/logs/$(basename "$data").log" -w start >/dev/null
  echo "pgbench -i -s $scale on $(basename "$data") ..." >&2
  as_server "$pg/pgbench" -h "$sock" -p 5432 -i -q -s "$scale" postgres >/dev/null 2>&1
}

# 5% of the rows, one contiguous range of aid.
update_five_percent() {
  local pg=$1 sock=$2
  as_server "$pg/psql" -XAtq -h "$sock" -p 5432 -d postgres -c \
    "update pgbench_accounts set abalance = abalance + 1 where aid <= $scale * 100000 / 20" >/dev/null
  as_server "$pg/psql" -XAtq -h "$sock" -p 5432 -d postgres -c "checkpoint" >/dev/null
}

# Runs a command as the server user, timed; prints the seconds. Output in $work/out/{stdout,stderr}.
timed() {
  local start
  start=$(date +%s.%N)
  as_server "$@" >"$work/out/stdout" 2>"$work/out/stderr" || { cat "$work/out/stderr" >&2; return 1; }
  sync
  awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}'
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.0f", b / 1048576}'; }
record() { echo "$2" >>"$work/out/$1"; }

start_cluster "$PG18" "$work/data18" "$work/sock18" "$bin/wal-push --repo $work/repo %p %f"
as_server "$PG18/psql" -XAtq -h "$work/sock18" -p 5432 -d postgres -c "alter system set summarize_wal = on" >/dev/null
as_server "$PG18/psql" -XAtq -h "$work/sock18" -p 5432 -d postgres -c "select pg_reload_conf()" >/dev/null
db_bytes=$(as_server "$PG18/psql" -XAt -h "$work/sock18" -p 5432 -d postgres -c "select sum(pg_database_size(oid)) from pg_database")
export PGHOST=$work/sock18 PGPORT=5432

for run in $(seq 1 "$runs"); do
  echo "run $run/$runs (PostgreSQL 18, walship and the pg_basebackup floor)" >&2
  # The full backup the incrementals build on, by walship and plainly.
  timed env PATH="$PG18:$PATH" "$bin/base-push" --repo "$work/repo" -- --checkpoint=fast >/dev/null
  full=$(cat "$work/out/stdout")
  plain_full=$work/plain/full-$run; as_server mkdir "$plain_full"
  timed "$PG18/pg_basebackup" -D "$plain_full" -Fp -X fetch --checkpoint=fast >/dev/null
  update_five_percent "$PG18" "$work/sock18"

  record incr.s "$(timed env PATH="$PG18:$PATH" "$bin/base-push" --repo "$work/repo" --incremental -- --checkpoint=fast)"
  incr=$(cat "$work/out/stdout")
  record incr.bytes "$(du -sb "$work/repo/backups/$incr" | cut -f1)"
  record full.s "$(timed env PATH="$PG18:$PATH" "$bin/base-push" --repo "$work/repo" -- --checkpoint=fast)"
  full2=$(cat "$work/out/stdout")
  record full.bytes "$(du -sb "$work/repo/backups/$full2" | cut -f1)"

  plain_incr=$work/plain/incr-$run; as_server mkdir "$plain_incr"
  record floor-incr.s "$(timed "$PG18/pg_basebackup" -D "$plain_incr" -Fp -X fetch --checkpoint=fast \
    --incremental="$plain_full/backup_manifest")"
  record floor-incr.bytes "$(du -sb "$plain_incr" | cut -f1)"
  plain_full2=$work/plain/full2-$run; as_server mkdir "$plain_full2"
  record floor-full.s "$(timed "$PG18/pg_basebackup" -D "$plain_full2" -Ft -X fetch --checkpoint=fast)"
  record floor-full.bytes "$(du -sb "$plain_full2" | cut -f1)"

  record restore-incr.s "$(timed env PATH="$PG18:$PATH" "$bin/base-fetch" --repo "$work/repo" "$incr" "$work/restored-incr")"
  grep -q "backup successfully verified" "$work/out/stderr" || { echo "pg_verifybackup did not pass" >&2; exit 1; }
  record restore-full.s "$(timed env PATH="$PG18:$PATH" "$bin/base-fetch" --repo "$work/repo" "$full2" "$work/restored-full")"
  record floor-combine.s "$(timed "$PG18/pg_combinebackup" "$plain_full" "$plain_incr" -o "$work/combined")"
  rm -rf "$work/restored-incr" "$work/restored-full" "$work/combined" "$plain_full" "$plain_incr" "$plain_full2"
  [ "$full" != "$full2" ]
done
as_server "$PG18/pg_ctl" -D "$work/data18" -m fast -w stop >/dev/null
unset PGHOST PGPORT

cat >"$work/pgbackrest.conf" <<CONF
[global]
repo1-path=$work/pgbr
compress-type=zst
process-max=2
start-fast=y
archive-copy=y
log-level-console=warn
log-level-file=off
lock-path=$work/pgbr-spool
spool-path=$work/pgbr-spool

[bench]
pg1-path=$work/data15
pg1-socket-path=$work/sock15
pg1-port=5432
CONF
[ "$(id -u)" = 0 ] && chown postgres: "$work/pgbackrest.conf"
pgbr() { echo pgbackrest --config="$work/pgbackrest.conf" --stanza=bench "$@"; }
start_cluster "$PG15" "$work/data15" "$work/sock15" "$(pgbr archive-push %p)"
as_server $(pgbr stanza-create) >/dev/null
for run in $(seq 1 "$runs"); do
  echo "run $run/$runs (PostgreSQL 15, pgBackRest)" >&2
  timed $(pgbr backup --type=full) >/dev/null
  before=$(du -sb "$work/pgbr/backup" | cut -f1)
  update_five_percent "$PG15" "$work/sock15"
  record pgbr-incr.s "$(timed $(pgbr backup --type=incr))"
  record pgbr-incr.bytes "$(($(du -sb "$work/pgbr/backup" | cut -f1) - before))"
  as_server mkdir -m 700 "$work/restored-pgbr"
  record pgbr-restore.s "$(timed $(pgbr restore --pg1-path="$work/restored-pgbr"))"
  rm -rf "$work/restored-pgbr"
done

m() { median <"$work/out/$1"; }
echo
echo "Database: pgbench scale $scale, $(mib "$db_bytes") MiB (pg_database_size), 5% of pgbench_accounts updated" \
  "(aid <= $((scale * 100000 / 20))), $(nproc) cores, $runs run(s), medians."
echo
echo "| backup after the update | wall s | stored MiB |"
echo "|---|---|---|"
echo "| walship \`base-push --incremental\` (PG 18) | $(m incr.s) | $(mib "$(m incr.bytes)") |"
echo "| walship \`base-push\`, full (PG 18) | $(m full.s) | $(mib "$(m full.bytes)") |"
echo "| floor: \`pg_basebackup --incremental -Fp\` to local disk (PG 18) | $(m floor-incr.s) | $(mib "$(m floor-incr.bytes)") |"
echo "| floor: \`pg_basebackup -Ft\` full to local disk (PG 18) | $(m floor-full.s) | $(mib "$(m floor-full.bytes)") |"
echo "| pgBackRest 2.45 \`backup --type=incr\` (PG 15, zst) | $(m pgbr-incr.s) | $(mib "$(m pgbr-incr.bytes)") |"
echo
echo "| restore | wall s |"
echo "|---|---|"
echo "| walship \`base-fetch\` of the incremental (two links, pg_combinebackup, pg_verifybackup) | $(m restore-incr.s) |"
echo "| walship \`base-fetch\` of the full (pg_verifybackup) | $(m restore-full.s) |"
echo "| floor: \`pg_combinebackup\` of the two plain backups on local disk | $(m floor-combine.s) |"
echo "| pgBackRest 2.45 \`restore\` of the incremental (PG 15) | $(m pgbr-restore.s) |"
