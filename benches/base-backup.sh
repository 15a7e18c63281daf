#!/usr/bin/env bash
# Base backup and restore throughput on a pgbench database, in one run, on one machine:
#   - plain `pg_basebackup -Ft -z -X fetch` to local disk (+ sync); restore = tar -xzf (+ sync)
#   - `pgbackrest backup --type=full` (posix repo, zst, process-max 2, archive-copy) and
#     `pgbackrest restore`
#   - walship `base-push` into a local repository; restore = `base-fetch LATEST` (which also runs
#     pg_verifybackup)
# Every backup is self-contained (carries the WAL it needs). Peak RSS from GNU time.
#
# Usage: benches/base-backup.sh [SCALE] [RUNS]   (default scale 70, about 1.05 GiB; 1 run each)
# Prints a Markdown table. Release build. Needs root or the postgres user; installs pgbackrest.
set -euo pipefail
cd "$(dirname "$0")/.."
scale=${1:-70}
runs=${2:-1}
scripts/install-deps.sh
if ! command -v pgbackrest >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbackrest >/dev/null
fi
cargo build --release --quiet -p base-push -p base-fetch -p base-list -p wal-push -p wal-fetch

PG_BIN=${WALSHIP_PG_BIN:-/usr/lib/postgresql/15/bin}
as_server() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# On the root file system, not tmpfs: the disk is part of what is measured.
work=$(mktemp -d /var/tmp/walship-bench-base.XXXXXX)
chmod 755 "$work"
data="$work/data"
cleanup() {
  for dir in "$data"; do
    [ -f "$dir/postmaster.pid" ] && as_server "$PG_BIN/pg_ctl" -D "$dir" -m immediate stop >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/bin" "$work/sock" "$work/logs" "$work/repo" "$work/pgbr" "$work/pgbr-spool" "$work/out"
for b in base-push base-fetch base-list wal-push wal-fetch; do cp "target/release/$b" "$work/bin/"; done
if [ "$(id -u)" = 0 ]; then chown -R postgres: "$work"; fi

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
pg1-path=$data
pg1-socket-path=$work/sock
pg1-port=5432
CONF
pgbr() { as_server pgbackrest --config="$work/pgbackrest.conf" --stanza=bench "$@"; }

as_server "$PG_BIN/initdb" --no-sync -D "$data" -U postgres >/dev/null
cat >>"$data/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$work/sock'
port = 5432
archive_mode = on
archive_command = 'pgbackrest --config=$work/pgbackrest.conf --stanza=bench archive-push %p'
max_wal_size = 4GB
CONF
as_server "$PG_BIN/pg_ctl" -D "$data" -l "$work/logs/server.log" -w start >/dev/null
echo "pgbench -i -s $scale ..." >&2
as_server "$PG_BIN/pgbench" -h "$work/sock" -p 5432 -i -q -s "$scale" postgres >/dev/null 2>&1
pgbr stanza-create >/dev/null
db_bytes=$(as_server "$PG_BIN/psql" -XAt -h "$work/sock" -p 5432 -d postgres -c "select sum(pg_database_size(oid)) from pg_database")
export PGHOST="$work/sock" PGPORT=5432

# Runs a command as the server user under GNU time; prints "seconds peak_kib".
timed() {
  as_server /usr/bin/time -f '%e %M' -o "$work/out/time" "$@" >"$work/out/stdout" 2>"$work/out/stderr" \
    || { cat "$work/out/stderr" >&2; return 1; }
  sync
  cat "$work/out/time"
}

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}'; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -A backup_s restore_s backup_rss restore_rss stored
for tool in pg_basebackup pgbackrest walship; do
  : >"$work/out/b.$tool"; : >"$work/out/r.$tool"
done
for run in $(seq 1 "$runs"); do
  echo "run $run/$runs" >&2
  # pg_basebackup -Ft -z
  dir="$work/pgbb-$run"; as_server mkdir "$dir"
  start=$(date +%s.%N)
  read -r s m < <(timed "$PG_BIN/pg_basebackup" -D "$dir" -Ft -z -X fetch --checkpoint=fast)
  echo "$(elapsed "$start") $m" >>"$work/out/b.pg_basebackup"
  stored[pg_basebackup]=$(du -sb "$dir" | cut -f1)
  restored="$work/restored-pgbb-$run"; as_server mkdir -m 700 "$restored"
  start=$(date +%s.%N)
  read -r s m < <(timed tar -xzf "$dir/base.tar.gz" -C "$restored")
  echo "$(elapsed "$start") $m" >>"$work/out/r.pg_basebackup"
  rm -rf "$dir" "$restored"

  # pgbackrest
  start=$(date +%s.%N)
  read -r s m < <(timed pgbackrest --config="$work/pgbackrest.conf" --stanza=bench backup --type=full)
  echo "$(elapsed "$start") $m" >>"$work/out/b.pgbackrest"
  stored[pgbackrest]=$(du -sb "$work/pgbr/backup" | cut -f1)
  restored="$work/restored-pgbr-$run"; as_server mkdir -m 700 "$restored"
  start=$(date +%s.%N)
  read -r s m < <(timed pgbackrest --config="$work/pgbackrest.conf" --stanza=bench restore --pg1-path="$restored")
  echo "$(elapsed "$start") $m" >>"$work/out/r.pgbackrest"
  rm -rf "$restored"

  # walship
  start=$(date +%s.%N)
  read -r s m < <(timed "$work/bin/base-push" --repo "$work/repo" -- --checkpoint=fast)
  echo "$(elapsed "$start") $m" >>"$work/out/b.walship"
  name=$(cat "$work/out/stdout")
  stored[walship]=$(du -sb "$work/repo/backups/$name" | cut -f1)
  restored="$work/restored-walship-$run"
  start=$(date +%s.%N)
  read -r s m < <(timed "$work/bin/base-fetch" --repo "$work/repo" LATEST "$restored")
  echo "$(elapsed "$start") $m" >>"$work/out/r.walship"
  grep -q "backup successfully verified" "$work/out/stderr" || { echo "pg_verifybackup did not pass" >&2; exit 1; }
  rm -rf "$restored"
done

mib() { awk -v b="$1" 'BEGIN {printf "%.0f", b / 1048576}'; }
rate() { awk -v b="$db_bytes" -v s="$1" 'BEGIN {printf "%.0f", b / 1e6 / s}'; }
echo
echo "Database: pgbench scale $scale, $(mib "$db_bytes") MiB (pg_database_size), $(nproc) cores, $runs run(s), medians."
echo
echo "| tool | backup s | backup MB/s | backup peak RSS MiB | stored MiB | restore s | restore MB/s | restore peak RSS MiB |"
echo "|---|---|---|---|---|---|---|---|"
for tool in pg_basebackup pgbackrest walship; do
  b=$(cut -d' ' -f1 "$work/out/b.$tool" | median); bm=$(cut -d' ' -f2 "$work/out/b.$tool" | median)
  r=$(cut -d' ' -f1 "$work/out/r.$tool" | median); rm_=$(cut -d' ' -f2 "$work/out/r.$tool" | median)
  label=$tool
  case $tool in
    pg_basebackup) label='`pg_basebackup -Ft -z` / `tar -xzf`' ;;
    pgbackrest) label='`pgbackrest backup` / `restore` (zst, process-max 2)' ;;
    walship) label='`base-push` / `base-fetch` (incl. pg_verifybackup)' ;;
  esac
  printf '| %s | %.1f | %s | %s | %s | %.1f | %s | %s |\n' "$label" "$b" "$(rate "$b")" "$((bm / 1024))" \
    "$(mib "${stored[$tool]}")" "$r" "$(rate "$r")" "$((rm_ / 1024))"
done
