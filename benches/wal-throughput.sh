#!/usr/bin/env bash
# WAL archiving and restore throughput on real pgbench WAL, against the floor and the peers, in one run.
#
# 1. WAL: a PostgreSQL 15 cluster (16 MiB segments, archive_mode = on with an empty archive_command,
#    so segments wait as .ready and none is recycled); pgbench -i; a plain base backup
#    (pg_basebackup -X stream, for step 4); then pgbench -c 4 -j 2 at a steady load until SEGMENTS
#    complete segments after the backup's start are marked .ready. Those segments are the workload.
# 2. Archiving: benches/archiver.py emulates PostgreSQL's archiver catching up on that backlog (one
#    call per segment, in order, .ready renamed to .done after exit 0), for: the floor
#    `test ! -f && cp && sync FILE`; wal-push serial (look_ahead = 0) and with look-ahead (the
#    defaults) to local disk, S3 (s3s-fs on 127.0.0.1) and SSH (an sshd on 127.0.0.1); pgbackrest
#    archive-push sync and async (posix repo, zst); barman-cloud-wal-archive to the same s3s-fs.
# 3. Restoring: archiver.py emulates the startup process of a recovery (postmaster.pid, recovery.signal,
#    %p = pg_wal/RECOVERYXLOG, each file checked and deleted after its call, no replay time) for
#    wal-fetch serial (prefetch = 0) and with prefetch (the defaults) from each backend, pgbackrest
#    archive-get sync and async, and barman-cloud-wal-restore.
# 4. Real recoveries: the base backup restored, PostgreSQL 15 replaying the whole archive with
#    restore_command = wal-fetch (serial, prefetch) and pgbackrest archive-get (sync, async), from
#    pg_ctl start until it has promoted and accepts connections (postmaster.pid says "ready").
# Every configuration starts with the segments (and its repository, for restores) read once into the
# page cache and a `sync`. Per call: wall time from fork to exit. Peak RSS: the largest of any call
# and of anything a call left running (async helpers, prefetch workers), measured by the small
# runner (wal-throughput-runner.rs), the subreaper of them all. Servers (s3s-fs, sshd) not counted.
# Prints the command line, then Markdown tables and the goal ratios.
#
# Usage: benches/wal-throughput.sh [SEGMENTS]      (default 72 = 1152 MiB; at least 64 for the 1 GiB
#                                                   recovery bar; fewer for a quick check)
# Environment: WALSHIP_BENCH_DIR  scratch parent directory (default /var/tmp: not tmpfs; needs about
#                                 SEGMENTS x 16 MiB x 4 free, 5 GB for the default)
#              WALSHIP_BENCH_SCALE  pgbench scale (default 30)
#              WALSHIP_BENCH_PGBR_LEVEL  pgbackrest zst level (default 1, walship's default level)
#              WALSHIP_BENCH_KEEP=1  keep the scratch directory (logs of every call) at the end
# Release build. Run as root (PostgreSQL and the emulators then run as the postgres user) or as a
# user who can run initdb and sshd. Installs what is missing: PostgreSQL 15, openssh-server, s3s-fs
# (scripts/install-deps.sh), pgbackrest, barman-cli-cloud.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/loopback-sshd.sh
segments=${1:-72}
scratch_parent=${WALSHIP_BENCH_DIR:-/var/tmp}
scale=${WALSHIP_BENCH_SCALE:-30}
pgbr_level=${WALSHIP_BENCH_PGBR_LEVEL:-1}
echo "Command: WALSHIP_BENCH_DIR=$scratch_parent WALSHIP_BENCH_SCALE=$scale WALSHIP_BENCH_PGBR_LEVEL=$pgbr_level benches/wal-throughput.sh $segments"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
case $segments in '' | *[!0-9]*) echo "SEGMENTS must be a number" >&2; exit 2 ;; esac
[ "$segments" -ge 2 ] || { echo "SEGMENTS must be at least 2" >&2; exit 2; }

# --- what the run needs ---------------------------------------------------------------------------
scripts/install-deps.sh
missing=()
command -v pgbackrest >/dev/null || missing+=(pgbackrest)
command -v barman-cloud-wal-archive >/dev/null || missing+=(barman-cli-cloud)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
# barman-cloud-wal-archive's fastest compression: snappy where python-snappy works (Debian 12's
# python3-snappy 0.5.3 fails on Python 3.11: "PY_SSIZE_T_CLEAN macro must be defined"), else gzip.
barman_compression=--gzip
if /usr/bin/python3 -c 'import io, snappy; snappy.stream_compress(io.BytesIO(b"x" * 99), io.BytesIO())' 2>/dev/null; then
  barman_compression=--snappy
fi
cargo build --release --quiet -p wal-push -p wal-fetch

PG_BIN=${WALSHIP_PG_BIN:-/usr/lib/postgresql/15/bin}
PYTHON=/usr/bin/python3 # the system's: the postgres user cannot reach root's pyenv or venv
pg_user=$(id -un)
as_pg=()
if [ "$(id -u)" = 0 ]; then as_pg=(runuser -u postgres --); pg_user=postgres; fi
pg() { "${as_pg[@]}" "$@"; }

# On the root file system, not tmpfs: the disk is part of what is measured.
work=$(mktemp -d "$scratch_parent/walship-bench-wal.XXXXXX")
chmod 755 "$work"
src=$work/src
s3s_pid= sshd_pid=
cleanup() {
  local dir
  for dir in "$work"/src "$work"/recovery-*; do
    if [ -f "$dir/postmaster.pid" ]; then pg "$PG_BIN/pg_ctl" -D "$dir" -m immediate stop >/dev/null 2>&1 || true; fi
  done
  # runuser passes SIGTERM on to sshd and reaps it; the pid file is the fallback.
  for pid in $s3s_pid $sshd_pid; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  if [ -n "$sshd_pid" ] && [ -f "$work/conf/sshd.pid" ]; then kill "$(cat "$work/conf/sshd.pid")" 2>/dev/null || true; fi
  if [ "${WALSHIP_BENCH_KEEP:-0}" = 1 ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$work"/{bin,conf,logs,out,home,sock,repo,s3/bench,rec/global}
for b in wal-push wal-fetch; do cp "target/release/$b" "$work/bin/"; done
cp benches/archiver.py "$work/bin/"
rustc -O --edition 2021 benches/wal-throughput-runner.rs -o "$work/bin/runner"
results=$work/results.jsonl
free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.3f", b - a}'; }
lsn_bytes() { local hi=${1%/*} lo=${1#*/}; echo $(((16#$hi << 32) + 16#$lo)); }

# --- 1. the WAL ------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] && chown -R "$pg_user" "$work"
pg "$PG_BIN/initdb" --no-sync -D "$src" -U postgres >/dev/null
cat >>"$src/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$work/sock'
port = 5432
archive_mode = on
archive_command = ''            # segments wait as .ready, none is recycled
max_wal_size = 8GB
# A checkpoint every 30 s, as on a busy server: the full-page images after each one are most of
# real WAL. Without them a small pgbench database soon writes a segment every half minute.
checkpoint_timeout = 30s
CONF
export PGHOST=$work/sock PGPORT=5432
pg "$PG_BIN/pg_ctl" -D "$src" -l "$work/logs/src.log" -w start >/dev/null
echo "generating WAL: pgbench -i -s $scale, base backup, then pgbench -c 4 -j 2 until $segments segments" >&2
pg "$PG_BIN/pgbench" -i -q -s "$scale" postgres >/dev/null 2>&1
pg "$PG_BIN/psql" -XAtq -d postgres -c "select pg_switch_wal()" >/dev/null # the workload starts on a fresh segment
pg "$PG_BIN/pg_basebackup" -D "$work/base" -Fp -X stream --checkpoint=fast
start_seg=$(sed -n 's/^START WAL LOCATION: .* (file \([0-9A-F]\{24\}\))$/\1/p' "$work/base/backup_label")
start_lsn=$(sed -n 's/^START WAL LOCATION: \([0-9A-F]*\/[0-9A-F]*\) .*/\1/p' "$work/base/backup_label")
[ -n "$start_seg" ] || { echo "no START WAL LOCATION in backup_label" >&2; exit 1; }
ready_after() {
  ls "$src/pg_wal/archive_status" | sed -n 's/^\([0-9A-F]\{24\}\)\.ready$/\1/p' | awk -v a="$1" '$0 "" > a ""' | LC_ALL=C sort
}
# The backup ends with a forced segment switch: its segments (complete now) are not part of the
# workload, but the real recoveries need them in the archive (pushed there after step 2).
ready_after 0 | awk -v s="$start_seg" '$0 "" >= s ""' >"$work/backup-segments.txt"
[ -s "$work/backup-segments.txt" ] || { echo "the backup's segments are not marked .ready" >&2; exit 1; }
last_backup_seg=$(tail -1 "$work/backup-segments.txt")
load_start=$(date +%s.%N)
transactions=0
while [ "$(ready_after "$last_backup_seg" | wc -l)" -lt "$segments" ]; do
  pg "$PG_BIN/pgbench" -n -c 4 -j 2 -T 5 postgres >"$work/logs/pgbench.out" 2>&1 || { cat "$work/logs/pgbench.out" >&2; exit 1; }
  n=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$work/logs/pgbench.out")
  transactions=$((transactions + ${n:-0}))
  echo "  $(ready_after "$last_backup_seg" | wc -l) segments ready" >&2
done
load_s=$(elapsed "$load_start")
pg "$PG_BIN/pg_ctl" -D "$src" -m fast -w stop >/dev/null
ready_after "$last_backup_seg" | head -n "$segments" >"$work/segments.txt"
# Everything else (before and during the backup, beyond the workload) counts as archived already.
for f in "$src"/pg_wal/archive_status/*.ready; do
  name=$(basename "$f" .ready)
  grep -qx "$name" "$work/segments.txt" || mv "$f" "$src/pg_wal/archive_status/$name.done"
done
seg_size=$(stat -c %s "$src/pg_wal/$(head -1 "$work/segments.txt")")
echo "WAL: $segments segments of $((seg_size / 1048576)) MiB ($(head -1 "$work/segments.txt") to $(tail -1 "$work/segments.txt")), written by pgbench in ${load_s} s ($transactions transactions)" >&2
cp "$src/global/pg_control" "$work/rec/global/"

# --- servers: s3s-fs and sshd on 127.0.0.1 ---------------------------------------------------------
s3s_fs=${WALSHIP_S3S_FS:-${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs}
s3_port=$(free_port)
"$s3s_fs" --host 127.0.0.1 --port "$s3_port" --access-key bench --secret-key benchsecret "$work/s3" >"$work/logs/s3s-fs.log" 2>&1 &
s3s_pid=$!
ssh_port=$(free_port)
sshd_files "$work/conf" "$ssh_port"

# walship configurations: push-BACKEND-{serial,ahead} write to their own repositories; the fetches
# read the look-ahead run's repository.
backend_repo() {
  case $1 in
    local) echo "$work/repo/local-$2" ;;
    s3) echo "s3://bench/walship-$2" ;;
    ssh) echo "ssh://$pg_user@127.0.0.1:$ssh_port$work/repo/ssh-$2" ;;
  esac
}
backend_tables() {
  case $1 in
    s3) printf '[s3]\nendpoint = "http://127.0.0.1:%s"\nregion = "us-east-1"\nforce_path_style = true\naccess_key_id = "bench"\nsecret_access_key = "benchsecret"\n' "$s3_port" ;;
    ssh) printf '[ssh]\nidentity_file = "%s"\nknown_hosts_file = "%s"\n' "$work/conf/clientkey" "$work/conf/known_hosts" ;;
  esac
}
for backend in local s3 ssh; do
  { echo "repo = \"$(backend_repo $backend serial)\""; printf '[push]\nlook_ahead = 0\n'; backend_tables $backend; } >"$work/conf/push-$backend-serial.toml"
  { echo "repo = \"$(backend_repo $backend ahead)\""; printf '[push]\nlook_ahead = 16\nparallel = 4\n'; backend_tables $backend; } >"$work/conf/push-$backend-ahead.toml"
  { echo "repo = \"$(backend_repo $backend ahead)\""; printf '[fetch]\nprefetch = 0\n'; backend_tables $backend; } >"$work/conf/fetch-$backend-serial.toml"
  { echo "repo = \"$(backend_repo $backend ahead)\""; printf '[fetch]\nprefetch = 16\nparallel = 4\n'; backend_tables $backend; } >"$work/conf/fetch-$backend-prefetch.toml"
done
mkdir -p "$work"/repo/{floor,local-serial,local-ahead,ssh-serial,ssh-ahead,pgbr-sync,pgbr-async}
for mode in sync async; do
  cat >"$work/conf/pgbr-$mode.conf" <<CONF
[global]
repo1-path=$work/repo/pgbr-$mode
compress-type=zst
compress-level=$pgbr_level
archive-async=$([ $mode = async ] && echo y || echo n)
process-max=2
spool-path=$work/pgbr-spool-$mode
lock-path=$work/pgbr-lock-$mode
log-level-console=warn
log-level-file=off

[bench]
pg1-path=$src
CONF
done
[ "$(id -u)" = 0 ] && chown -R "$pg_user" "$work"
chmod 600 "$work/conf/hostkey" "$work/conf/clientkey"
# Not through pg(): $! must be runuser's pid (it passes SIGTERM on to sshd), not a subshell's.
"${as_pg[@]}" /usr/sbin/sshd -D -e -f "$work/conf/sshd_config" 2>"$work/logs/sshd.log" &
sshd_pid=$!
for server in "s3s-fs $s3_port" "sshd $ssh_port"; do
  set -- $server
  for i in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$2") 2>/dev/null && break; sleep 0.05; done
  [ "$i" -lt 200 ] || { echo "$1 does not listen on 127.0.0.1:$2; its log:" >&2; cat "$work/logs/$1.log" >&2; exit 1; }
done
for mode in sync async; do pg pgbackrest --config="$work/conf/pgbr-$mode.conf" --stanza=bench --no-online stanza-create >/dev/null; done

# The emulators run as the server user, with a clean environment (as under PostgreSQL).
emulate() {
  pg env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$work/home" LANG=C.UTF-8 \
    AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true \
    "$PYTHON" "$work/bin/archiver.py" "$@" --runner "$work/bin/runner" --segments "$work/segments.txt" \
    --results "$results" --scratch "$work/out"
}
# archive LABEL GROUP COMMAND STORED_DIR [MARKER]
archive() {
  sync
  emulate archive --data "$src" --label "$1" --group "$2" --command "$3" --stored "$4" --log "$work/logs/$2.log" \
    ${5:+--local-marker "$5"}
}
# restore LABEL GROUP COMMAND REPO_DIR [MARKER]
restore() {
  sync
  emulate restore --data "$work/rec" --source "$src/pg_wal" --label "$1" --group "$2" --command "$3" --warm "$4" \
    --log "$work/logs/$2.log" ${5:+--local-marker "$5"}
}

s3_url=http://127.0.0.1:$s3_port
ahead_marker="was archived ahead by an earlier call"
label_of() { case $1 in local) echo "local disk" ;; s3) echo "S3 (s3s-fs, loopback)" ;; ssh) echo "SSH (sshd, loopback)" ;; esac; }
stored_of() { case $1 in s3) echo "$work/s3/bench/walship-$2" ;; *) echo "$work/repo/$1-$2" ;; esac; }

# --- 2. archiving ----------------------------------------------------------------------------------
echo "archiving $segments segments:" >&2
archive 'baseline: `true` (the cost of starting a command)' baseline true ''
archive 'floor: `test ! -f R/%f && cp %p R/%f && sync R/%f`' floor \
  "test ! -f $work/repo/floor/%f && cp %p $work/repo/floor/%f && sync $work/repo/floor/%f" "$work/repo/floor"
for backend in local s3 ssh; do
  archive "wal-push, $(label_of $backend), serial (look_ahead 0)" "push-$backend-serial" \
    "$work/bin/wal-push --config $work/conf/push-$backend-serial.toml %p %f" "$(stored_of $backend serial)" "$ahead_marker"
  archive "wal-push, $(label_of $backend), look-ahead (16, parallel 4)" "push-$backend-ahead" \
    "$work/bin/wal-push --config $work/conf/push-$backend-ahead.toml %p %f" "$(stored_of $backend ahead)" "$ahead_marker"
done
archive "pgbackrest archive-push, sync (posix, zst level $pgbr_level)" pgbr-push-sync \
  "pgbackrest --config=$work/conf/pgbr-sync.conf --stanza=bench archive-push %p" "$work/repo/pgbr-sync/archive"
archive "pgbackrest archive-push, async (posix, zst level $pgbr_level, process-max 2)" pgbr-push-async \
  "pgbackrest --config=$work/conf/pgbr-async.conf --stanza=bench archive-push %p" "$work/repo/pgbr-async/archive"
archive "barman-cloud-wal-archive $barman_compression, S3 (s3s-fs, loopback)" barman-push \
  "barman-cloud-wal-archive $barman_compression --endpoint-url $s3_url s3://bench/barman bench %p" "$work/s3/bench/barman"

# --- 3. restoring ----------------------------------------------------------------------------------
echo "restoring $segments segments:" >&2
prefetch_marker="prefetched,"
for backend in local s3 ssh; do
  restore "wal-fetch, $(label_of $backend), serial (prefetch 0)" "fetch-$backend-serial" \
    "$work/bin/wal-fetch --config $work/conf/fetch-$backend-serial.toml %f %p" "$(stored_of $backend ahead)" "$prefetch_marker"
  restore "wal-fetch, $(label_of $backend), prefetch (16, parallel 4)" "fetch-$backend-prefetch" \
    "$work/bin/wal-fetch --config $work/conf/fetch-$backend-prefetch.toml %f %p" "$(stored_of $backend ahead)" "$prefetch_marker"
done
for mode in sync async; do
  rm -rf "$work/pgbr-spool-$mode"
  restore "pgbackrest archive-get, $mode$([ $mode = async ] && echo ' (process-max 2, queue 128 MiB)')" "pgbr-get-$mode" \
    "pgbackrest --config=$work/conf/pgbr-$mode.conf --stanza=bench --pg1-path=$work/rec archive-get %f \"%p\"" \
    "$work/repo/pgbr-$mode/archive"
done
restore "barman-cloud-wal-restore, S3 (s3s-fs, loopback)" barman-get \
  "barman-cloud-wal-restore --endpoint-url $s3_url s3://bench/barman bench %f %p" "$work/s3/bench/barman"

# --- 4. real recoveries ----------------------------------------------------------------------------
# recover LABEL GROUP RESTORE_COMMAND (@DATA@ stands for the restored data directory)
recover() {
  local dir=$work/recovery-$2 log=$work/logs/recovery-$2.log start s redo_start redo_done restored postmaster
  pg cp -a "$work/base" "$dir"
  cat >>"$dir/postgresql.auto.conf" <<CONF
restore_command = '${3//@DATA@/$dir}'
archive_mode = off
hot_standby = off
CONF
  pg touch "$dir/recovery.signal"
  sync
  start=$(date +%s.%N)
  pg "$PG_BIN/pg_ctl" -D "$dir" -l "$log" -w start >/dev/null
  # pg_ctl -w returns once recovery has started; the postmaster marks itself "ready" (line 8 of
  # postmaster.pid) only once recovery has ended and the server has promoted.
  postmaster=$(head -1 "$dir/postmaster.pid")
  until [ "$(sed -n 8p "$dir/postmaster.pid" 2>/dev/null | tr -d ' ')" = ready ]; do
    kill -0 "$postmaster" 2>/dev/null || { echo "$1: the server stopped" >&2; tail -20 "$log" >&2; exit 1; }
    sleep 0.05
  done
  s=$(elapsed "$start")
  [ "$(pg "$PG_BIN/psql" -XAt -d postgres -c 'select pg_is_in_recovery()')" = f ] || { echo "$1: still in recovery" >&2; exit 1; }
  pg "$PG_BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
  redo_start=$(sed -n 's/.*redo starts at \([0-9A-F]*\/[0-9A-F]*\).*/\1/p' "$log" | head -1)
  redo_done=$(sed -n 's/.*redo done at \([0-9A-F]*\/[0-9A-F]*\).*/\1/p' "$log" | head -1)
  [ -n "$redo_start" ] && [ -n "$redo_done" ] || { echo "$1: no redo start/done in $log" >&2; tail -20 "$log" >&2; exit 1; }
  restored=$(grep -o 'restored log file "[0-9A-F]\{24\}"' "$log" | sort -u | wc -l)
  printf '{"kind": "recovery", "label": "%s", "group": "%s", "seconds": %s, "bytes": %s, "restored": %s}\n' \
    "$1" "$2" "$s" $(($(lsn_bytes "$redo_done") - $(lsn_bytes "$redo_start"))) "$restored" >>"$results"
  echo "  $1: $s s, redo $redo_start to $redo_done, $restored files restored" >&2
  rm -rf "$dir"
}
echo "recovering from the base backup (start $start_lsn):" >&2
# The backup's own segments, into the repositories the recoveries read (not timed; every workload
# segment is .done by now, so wal-push finds nothing to look ahead at).
while read -r seg; do
  (cd "$src" && pg "$work/bin/wal-push" --config "$work/conf/push-local-ahead.toml" "pg_wal/$seg" "$seg" 2>>"$work/logs/backup-segments.log")
  (cd "$src" && pg pgbackrest --config="$work/conf/pgbr-sync.conf" --stanza=bench archive-push "pg_wal/$seg")
  (cd "$src" && pg pgbackrest --config="$work/conf/pgbr-async.conf" --stanza=bench --no-archive-async archive-push "pg_wal/$seg")
done <"$work/backup-segments.txt"
recover "wal-fetch, local disk, serial (prefetch 0)" recovery-fetch-serial \
  "$work/bin/wal-fetch --config $work/conf/fetch-local-serial.toml %f %p"
recover "wal-fetch, local disk, prefetch (16, parallel 4)" recovery-fetch-prefetch \
  "$work/bin/wal-fetch --config $work/conf/fetch-local-prefetch.toml %f %p"
for mode in sync async; do
  rm -rf "$work/pgbr-spool-$mode"
  recover "pgbackrest archive-get, $mode" "recovery-pgbr-$mode" \
    "pgbackrest --config=$work/conf/pgbr-$mode.conf --stanza=bench --pg1-path=@DATA@ archive-get %f \"%p\""
done

# --- report ----------------------------------------------------------------------------------------
echo
echo "WAL: $segments segments of 16 MiB ($((segments * 16)) MiB) written in $load_s s by pgbench scale $scale, -c 4 -j 2 ($transactions transactions);"
echo "$(nproc) cores, load average at the start $load_before and at the end $(cut -d' ' -f1-3 /proc/loadavg);"
echo "$(uname -r); PostgreSQL $("$PG_BIN/postgres" -V | awk '{print $3}'), $(pgbackrest version), barman-cli-cloud $(barman-cloud-wal-archive --version 2>&1 | awk '{print $2}')."
echo "MB/s = 10^6 bytes of WAL per second; latency per call from fork to exit; peak RSS of the calls and what they left running."
"$PYTHON" "$work/bin/archiver.py" report --results "$results"
