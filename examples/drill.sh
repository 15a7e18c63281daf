#!/usr/bin/env bash
# The disaster drill, end to end, on local disk:
#   1. start a throwaway PostgreSQL 15 whose archive_command is wal-push,
#   2. write data and take a base backup with base-push (into the same repository),
#   3. write rows before and after a target time,
#   4. lose the cluster (stop it and delete its data directory),
#   5. base-fetch LATEST --target-time: the backup, verified, with restore_command and the target
#      written into postgresql.auto.conf,
#   6. pg_ctl start, and show which rows came back.
#
# Usage: examples/drill.sh          (KEEP=1 keeps the work directory for a look afterwards)
# Runs as root (PostgreSQL then runs as the 'postgres' user) or as any user who can run initdb.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh drill

PG_BIN=${WALSHIP_PG_BIN:-/usr/lib/postgresql/15/bin}
say() { printf '\n== %s\n' "$*"; }

as_server() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

binaries="wal-push wal-fetch base-push base-fetch base-list"
say "building $binaries"
# shellcheck disable=SC2046
cargo build --quiet $(printf -- '-p %s ' $binaries)

work=$(mktemp -d /tmp/walship-drill.XXXXXX)
chmod 755 "$work"
mkdir -p "$work/bin" "$work/repo" "$work/sock" "$work/logs"
# The server user must be able to run the binaries wherever this checkout lives.
for binary in $binaries; do cp "target/debug/$binary" "$work/bin/"; done
if [ "$(id -u)" = 0 ]; then chown postgres: "$work" "$work/repo" "$work/sock" "$work/logs"; fi

data="$work/data"
restored="$work/restored"
cleanup() {
  for dir in "$data" "$restored"; do
    [ -f "$dir/postmaster.pid" ] && as_server "$PG_BIN/pg_ctl" -D "$dir" -m immediate stop >/dev/null 2>&1 || true
  done
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

psql_() { as_server "$PG_BIN/psql" -XAtq -v ON_ERROR_STOP=1 -h "$work/sock" -p 5432 -d postgres "$@"; }

say "initdb and start with archive_command = wal-push"
if [ "$(id -u)" = 0 ]; then install -d -o postgres -m 700 "$data"; else install -d -m 700 "$data"; fi
as_server "$PG_BIN/initdb" --no-sync -D "$data" -U postgres >/dev/null
cat >>"$data/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$work/sock'
port = 5432
wal_level = replica
archive_mode = on
archive_command = '$work/bin/wal-push --repo $work/repo %p %f'
CONF
grep "^archive_command" "$data/postgresql.conf"
as_server "$PG_BIN/pg_ctl" -D "$data" -l "$work/logs/primary.log" -w start >/dev/null

say "write data and take a base backup with base-push"
psql_ -c "create table orders(id int primary key, placed_at timestamptz default clock_timestamp())"
psql_ -c "insert into orders(id) select g from generate_series(1, 1000) g"
as_server env PGHOST="$work/sock" PGPORT=5432 "$work/bin/base-push" --repo "$work/repo" -- --checkpoint=fast
as_server "$work/bin/base-list" --repo "$work/repo"

say "1000 more rows, then the target time, then 500 rows we will not want back"
psql_ -c "insert into orders(id) select g from generate_series(1001, 2000) g"
sleep 1.2
target=$(psql_ -c "select to_char(now() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'")
sleep 1.2
psql_ -c "insert into orders(id) select g from generate_series(2001, 2500) g"
last=$(psql_ -c "select pg_walfile_name(pg_switch_wal())")
for _ in $(seq 1 300); do
  archived=$(psql_ -c "select coalesce(last_archived_wal, '') from pg_stat_archiver")
  [[ "$archived" > "$last" || "$archived" == "$last" ]] && break
  sleep 0.1
done
echo "rows before losing the cluster: $(psql_ -c "select count(*) from orders")"
echo "target time: $target"
echo "archived up to $archived; repository:"
(cd "$work/repo" && find . -type f | sort | sed 's/^/  /')

say "lose the cluster"
as_server "$PG_BIN/pg_ctl" -D "$data" -m immediate stop >/dev/null
rm -rf "$data"

say "base-fetch LATEST --target-time, then pg_ctl start"
as_server "$work/bin/base-fetch" --repo "$work/repo" LATEST "$restored" --target-time "$target"
grep -E '^(restore_command|recovery_target)' "$restored/postgresql.auto.conf"
as_server "$PG_BIN/pg_ctl" -D "$restored" -l "$work/logs/restored.log" -w -t 300 start >/dev/null
for _ in $(seq 1 300); do
  [ "$(psql_ -c "select pg_is_in_recovery()")" = f ] && break
  sleep 0.1
done
grep -c 'restored log file' "$work/logs/restored.log" | sed 's/^/segments restored through wal-fetch: /'

say "rows after the point-in-time restore"
count=$(psql_ -c "select count(*) from orders")
after=$(psql_ -c "select count(*) from orders where id > 2000")
echo "orders: $count rows (expected 2000); rows written after the target: $after (expected 0)"
if [ "$count" = 2000 ] && [ "$after" = 0 ]; then
  echo "drill passed"
else
  echo "drill FAILED; server log: $work/logs/restored.log" >&2
  KEEP=1
  exit 1
fi
