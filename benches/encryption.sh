#!/usr/bin/env bash
# What client-side encryption costs: archive and restore throughput and base backup time, with
# encryption off and on, in one run, on the same WAL and the same cluster (issue 16: the goal is
# under 15% for each of archive, restore, base push, base fetch).
#
# 1. WAL: a PostgreSQL 15 cluster (archive_command empty, so segments wait as .ready); pgbench -i -s
#    SCALE; then pgbench -c 4 -j 2 with a checkpoint every 30 s until SEGMENTS segments are ready
#    (as benches/wal-throughput.sh makes them). Those segments are the workload.
# 2. Archiving: benches/archiver.py emulates PostgreSQL's archiver over that backlog (one call per
#    segment, in order), each configuration into a fresh repository, for: the floor
#    `test ! -f && cp && sync`; wal-push to local disk, serial (look_ahead 0) and with look-ahead
#    (16, parallel 4), and to S3 (s3s-fs on 127.0.0.1), serial; each plain, encrypted for an X25519
#    recipient (the archive host holds the public key only) and with a passphrase (the default work
#    factor); pgbackrest archive-push (sync, zst) with repo1-cipher-type none and aes-256-cbc.
# 3. Restoring: archiver.py emulates the startup process (no replay time) for: the floor `cp`;
#    wal-fetch from local disk serial and with prefetch (16, parallel 4), and from S3 serial, in the
#    three modes, each reading the repository its push wrote in run 1; pgbackrest archive-get (sync)
#    with and without the cipher.
# 4. Base backups of the same cluster (SCALE 70 = about 1 GiB): base-push and base-fetch LATEST
#    (which runs pg_verifybackup) in the three modes; pgbackrest backup --type=full and restore with
#    and without the cipher (archive_command = archive-push into both pgbackrest repositories).
# Every configuration runs RUNS times, in rounds (every configuration once, then again), so that
# drift falls on all of them; the tables give medians. Keys: `walship-key generate` and
# `walship-key passphrase` of the release build. barman-cloud is not measured: it has no
# client-side encryption (only S3 server-side encryption, which costs the client nothing).
#
# Usage: benches/encryption.sh [SEGMENTS] [RUNS] [SCALE]   (defaults 32, 3, 70)
# Environment: WALSHIP_BENCH_DIR  scratch parent (default /var/tmp: not tmpfs; needs about
#                                 SEGMENTS x 16 MiB x 3 + 3 GB)
#              WALSHIP_BENCH_KEEP=1  keep the scratch directory (logs of every call)
# Release build. Run as root (PostgreSQL and the emulators then run as the postgres user).
set -euo pipefail
cd "$(dirname "$0")/.."
segments=${1:-32}
runs=${2:-3}
scale=${3:-70}
scratch_parent=${WALSHIP_BENCH_DIR:-/var/tmp}
for n in "$segments" "$runs" "$scale"; do
  case $n in '' | *[!0-9]*) echo "usage: benches/encryption.sh [SEGMENTS] [RUNS] [SCALE] (numbers)" >&2; exit 2 ;; esac
done
echo "Command: WALSHIP_BENCH_DIR=$scratch_parent benches/encryption.sh $segments $runs $scale"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

scripts/install-deps.sh
if ! command -v pgbackrest >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends pgbackrest >/dev/null
fi
cargo build --release --quiet -p wal-push -p wal-fetch -p base-push -p base-fetch -p walship-key

PG_BIN=${WALSHIP_PG_BIN:-/usr/lib/postgresql/15/bin}
PYTHON=/usr/bin/python3 # the system's: the postgres user cannot reach root's pyenv or venv
as_pg=()
if [ "$(id -u)" = 0 ]; then as_pg=(runuser -u postgres --); fi
pg() { "${as_pg[@]}" "$@"; }

work=$(mktemp -d "$scratch_parent/walship-bench-enc.XXXXXX")
chmod 755 "$work"
src=$work/src
s3s_pid=
cleanup() {
  if [ -f "$src/postmaster.pid" ]; then pg "$PG_BIN/pg_ctl" -D "$src" -m immediate stop >/dev/null 2>&1 || true; fi
  if [ -n "$s3s_pid" ]; then kill "$s3s_pid" 2>/dev/null || true; wait "$s3s_pid" 2>/dev/null || true; fi
  if [ "${WALSHIP_BENCH_KEEP:-0}" = 1 ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$work"/{bin,conf,keys,logs,out,home,sock,repo,s3/bench,rec/global}
for b in wal-push wal-fetch base-push base-fetch walship-key; do cp "target/release/$b" "$work/bin/"; done
cp benches/archiver.py "$work/bin/"
rustc -O --edition 2021 benches/wal-throughput-runner.rs -o "$work/bin/runner"
results=$work/results.jsonl
free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.3f", b - a}'; }
[ "$(id -u)" = 0 ] && chown -R postgres: "$work"

# --- keys, as an operator makes them ------------------------------------------------------------
recipient=$(pg "$work/bin/walship-key" generate --output "$work/keys/archive.key" 2>"$work/logs/walship-key.log")
pg "$work/bin/walship-key" passphrase --output "$work/keys/passphrase" 2>>"$work/logs/walship-key.log"
case $recipient in age1*) ;; *) echo "walship-key generate printed no public key" >&2; exit 1 ;; esac
cipher_pass=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')

# --- 1. the WAL ----------------------------------------------------------------------------------
pg "$PG_BIN/initdb" --no-sync -D "$src" -U postgres >/dev/null
cat >>"$src/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$work/sock'
port = 5432
archive_mode = on
archive_command = ''            # segments wait as .ready, none is recycled
max_wal_size = 8GB
checkpoint_timeout = 30s        # full-page images after each checkpoint, as on a busy server
CONF
export PGHOST=$work/sock PGPORT=5432
pg "$PG_BIN/pg_ctl" -D "$src" -l "$work/logs/src.log" -w start >/dev/null
echo "generating WAL: pgbench -i -s $scale, then pgbench -c 4 -j 2 until $segments segments" >&2
pg "$PG_BIN/pgbench" -i -q -s "$scale" postgres >/dev/null 2>&1
db_bytes=$(pg "$PG_BIN/psql" -XAt -d postgres -c "select sum(pg_database_size(oid)) from pg_database")
last_init=$(pg "$PG_BIN/psql" -XAt -d postgres -c "select pg_walfile_name(pg_switch_wal())")
ready_after() {
  ls "$src/pg_wal/archive_status" | sed -n 's/^\([0-9A-F]\{24\}\)\.ready$/\1/p' | awk -v a="$1" '$0 "" > a ""' | LC_ALL=C sort
}
load_start=$(date +%s.%N)
while [ "$(ready_after "$last_init" | wc -l)" -lt "$segments" ]; do
  pg "$PG_BIN/pgbench" -n -c 4 -j 2 -T 5 postgres >"$work/logs/pgbench.out" 2>&1 || { cat "$work/logs/pgbench.out" >&2; exit 1; }
done
load_s=$(elapsed "$load_start")
pg "$PG_BIN/pg_ctl" -D "$src" -m fast -w stop >/dev/null
ready_after "$last_init" | head -n "$segments" >"$work/segments.txt"
for f in "$src"/pg_wal/archive_status/*.ready; do
  name=$(basename "$f" .ready)
  grep -qx "$name" "$work/segments.txt" || mv "$f" "$src/pg_wal/archive_status/$name.done"
done
echo "WAL: $segments segments ($(head -1 "$work/segments.txt") to $(tail -1 "$work/segments.txt")) in $load_s s" >&2
cp "$src/global/pg_control" "$work/rec/global/"

# --- s3s-fs on 127.0.0.1 -------------------------------------------------------------------------
s3s_fs=${WALSHIP_S3S_FS:-${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs}
s3_port=$(free_port)
"$s3s_fs" --host 127.0.0.1 --port "$s3_port" --access-key bench --secret-key benchsecret "$work/s3" >"$work/logs/s3s-fs.log" 2>&1 &
s3s_pid=$!
for i in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$s3_port") 2>/dev/null && break; sleep 0.05; done
[ "$i" -lt 200 ] || { echo "s3s-fs does not listen on 127.0.0.1:$s3_port" >&2; cat "$work/logs/s3s-fs.log" >&2; exit 1; }

# --- configurations ------------------------------------------------------------------------------
modes="plain recipient passphrase"
# encryption_table MODE ROLE: push hosts hold the public key only, fetch hosts the private key.
encryption_table() {
  case $1.$2 in
    plain.*) ;;
    recipient.push) printf '[encryption]\nrecipients = ["%s"]\n' "$recipient" ;;
    recipient.*) printf '[encryption]\nrecipients = ["%s"]\nidentity_files = ["%s"]\n' "$recipient" "$work/keys/archive.key" ;;
    passphrase.*) printf '[encryption]\npassphrase_file = "%s"\n' "$work/keys/passphrase" ;;
  esac
}
s3_table() {
  printf '[s3]\nendpoint = "http://127.0.0.1:%s"\nregion = "us-east-1"\nforce_path_style = true\naccess_key_id = "bench"\nsecret_access_key = "benchsecret"\n' "$s3_port"
}
# walship_conf FILE REPO ROLE MODE TABLE...: one configuration file.
walship_conf() {
  local file=$1 repo=$2 role=$3 mode=$4
  shift 4
  { echo "repo = \"$repo\""; printf '%b' "$*"; encryption_table "$mode" "$role"; } >"$work/conf/$file.toml"
}
# pgbr_conf NAME REPO_DIR CIPHER(none|aes-256-cbc)
pgbr_conf() {
  cat >"$work/conf/$1.conf" <<CONF
[global]
repo1-path=$2
repo1-cipher-type=$3
$([ "$3" = none ] || echo "repo1-cipher-pass=$cipher_pass")
compress-type=zst
compress-level=1
process-max=2
start-fast=y
archive-copy=y
archive-async=n
spool-path=$work/pgbr-spool-$1
lock-path=$work/pgbr-lock-$1
log-level-console=warn
log-level-file=off

[bench]
pg1-path=$src
pg1-socket-path=$work/sock
pg1-port=5432
CONF
}
cipher_of() { case $1 in plain) echo none ;; *) echo aes-256-cbc ;; esac; }
for run in $(seq 1 "$runs"); do
  for mode in $modes; do
    walship_conf "push-local-serial-$mode-$run" "$work/repo/local-serial-$mode-$run" push "$mode" '[push]\nlook_ahead = 0\n'
    walship_conf "push-local-ahead-$mode-$run" "$work/repo/local-ahead-$mode-$run" push "$mode" '[push]\nlook_ahead = 16\nparallel = 4\n'
    walship_conf "push-s3-serial-$mode-$run" "s3://bench/s3-serial-$mode-$run" push "$mode" '[push]\nlook_ahead = 0\n' "$(s3_table)\n"
  done
  for mode in plain cipher; do pgbr_conf "pgbr-$mode-$run" "$work/repo/pgbr-$mode-$run" "$(cipher_of $mode)"; done
  mkdir -p "$work/repo/floor-$run" "$work"/repo/local-{serial,ahead}-{plain,recipient,passphrase}-"$run"
done
mkdir -p "$work"/repo/base-{plain,recipient,passphrase}
for mode in $modes; do
  walship_conf "fetch-local-serial-$mode" "$work/repo/local-ahead-$mode-1" fetch "$mode" '[fetch]\nprefetch = 0\n'
  walship_conf "fetch-local-prefetch-$mode" "$work/repo/local-ahead-$mode-1" fetch "$mode" '[fetch]\nprefetch = 16\nparallel = 4\n'
  walship_conf "fetch-s3-serial-$mode" "s3://bench/s3-serial-$mode-1" fetch "$mode" '[fetch]\nprefetch = 0\n' "$(s3_table)\n"
  walship_conf "base-$mode" "$work/repo/base-$mode" fetch "$mode" "pg_bin_dir = \"$PG_BIN\"\n"
done
for mode in plain cipher; do pgbr_conf "pgbr-base-$mode" "$work/repo/pgbr-base-$mode" "$(cipher_of $mode)"; done
[ "$(id -u)" = 0 ] && chown -R postgres: "$work"
for conf in "$work"/conf/pgbr-*.conf; do
  pg pgbackrest --config="$conf" --stanza=bench --no-online stanza-create >>"$work/logs/stanza-create.log"
done

emulate() {
  pg env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$work/home" LANG=C.UTF-8 \
    "$PYTHON" "$work/bin/archiver.py" "$@" --runner "$work/bin/runner" --segments "$work/segments.txt" \
    --results "$results" --scratch "$work/out"
}
# archive GROUP RUN LABEL COMMAND STORED_DIR
archive() {
  sync
  emulate archive --data "$src" --group "$1" --label "$3" --command "$4" --stored "$5" --log "$work/logs/$1-$2.log"
}
# restore GROUP RUN LABEL COMMAND REPO_DIR
restore() {
  sync
  emulate restore --data "$work/rec" --source "$src/pg_wal" --group "$1" --label "$3" --command "$4" --warm "$5" \
    --log "$work/logs/$1-$2.log"
}
mode_label() { case $1 in plain) echo "plain" ;; recipient) echo "encrypted, X25519 recipient" ;; passphrase) echo "encrypted, passphrase" ;; cipher) echo "aes-256-cbc" ;; esac; }

# --- 2. archiving, 3. restoring, in rounds -------------------------------------------------------
for run in $(seq 1 "$runs"); do
  echo "archiving, round $run/$runs:" >&2
  archive floor "$run" 'floor: `test ! -f R/%f && cp %p R/%f && sync R/%f`' \
    "test ! -f $work/repo/floor-$run/%f && cp %p $work/repo/floor-$run/%f && sync $work/repo/floor-$run/%f" "$work/repo/floor-$run"
  for mode in $modes; do
    archive "push-local-serial-$mode" "$run" "wal-push, local disk, serial, $(mode_label $mode)" \
      "$work/bin/wal-push --config $work/conf/push-local-serial-$mode-$run.toml %p %f" "$work/repo/local-serial-$mode-$run"
    archive "push-local-ahead-$mode" "$run" "wal-push, local disk, look-ahead (16, parallel 4), $(mode_label $mode)" \
      "$work/bin/wal-push --config $work/conf/push-local-ahead-$mode-$run.toml %p %f" "$work/repo/local-ahead-$mode-$run"
    archive "push-s3-serial-$mode" "$run" "wal-push, S3 (s3s-fs, loopback), serial, $(mode_label $mode)" \
      "$work/bin/wal-push --config $work/conf/push-s3-serial-$mode-$run.toml %p %f" "$work/s3/bench/s3-serial-$mode-$run"
  done
  for mode in plain cipher; do
    archive "pgbr-push-$mode" "$run" "pgbackrest archive-push, sync (zst 1), $(mode_label $mode)" \
      "pgbackrest --config=$work/conf/pgbr-$mode-$run.conf --stanza=bench archive-push %p" "$work/repo/pgbr-$mode-$run/archive"
  done
done
for run in $(seq 1 "$runs"); do
  echo "restoring, round $run/$runs:" >&2
  restore floor-get "$run" 'floor: `cp R/%f %p`' "cp $work/repo/floor-1/%f %p" "$work/repo/floor-1"
  for mode in $modes; do
    restore "fetch-local-serial-$mode" "$run" "wal-fetch, local disk, serial, $(mode_label $mode)" \
      "$work/bin/wal-fetch --config $work/conf/fetch-local-serial-$mode.toml %f %p" "$work/repo/local-ahead-$mode-1"
    restore "fetch-local-prefetch-$mode" "$run" "wal-fetch, local disk, prefetch (16, parallel 4), $(mode_label $mode)" \
      "$work/bin/wal-fetch --config $work/conf/fetch-local-prefetch-$mode.toml %f %p" "$work/repo/local-ahead-$mode-1"
    restore "fetch-s3-serial-$mode" "$run" "wal-fetch, S3 (s3s-fs, loopback), serial, $(mode_label $mode)" \
      "$work/bin/wal-fetch --config $work/conf/fetch-s3-serial-$mode.toml %f %p" "$work/s3/bench/s3-serial-$mode-1"
  done
  for mode in plain cipher; do
    restore "pgbr-get-$mode" "$run" "pgbackrest archive-get, sync, $(mode_label $mode)" \
      "pgbackrest --config=$work/conf/pgbr-$mode-1.conf --stanza=bench --pg1-path=$work/rec archive-get %f \"%p\"" \
      "$work/repo/pgbr-$mode-1/archive"
  done
done

# --- 4. base backups of the same cluster ---------------------------------------------------------
# The workload's segments are all .done now; new WAL goes to both pgbackrest base repositories.
cat >>"$src/postgresql.conf" <<CONF
archive_command = 'pgbackrest --config=$work/conf/pgbr-base-plain.conf --stanza=bench archive-push %p && pgbackrest --config=$work/conf/pgbr-base-cipher.conf --stanza=bench archive-push %p'
CONF
pg "$PG_BIN/pg_ctl" -D "$src" -l "$work/logs/src.log" -w start >/dev/null
# timed GROUP LABEL COMMAND...: one JSON line (wall seconds, a final sync included; GNU time's peak RSS).
timed() {
  local group=$1 label=$2 start s
  shift 2
  sync
  start=$(date +%s.%N)
  pg /usr/bin/time -f '%M' -o "$work/out/time" "$@" >"$work/out/stdout" 2>"$work/out/stderr" \
    || { echo "$label failed:" >&2; cat "$work/out/stderr" >&2; exit 1; }
  sync
  s=$(elapsed "$start")
  printf '{"kind": "base", "group": "%s", "label": "%s", "seconds": %s, "peak_kib": %s}\n' \
    "$group" "$label" "$s" "$(tail -1 "$work/out/time")" >>"$results"
  echo "  $label: $s s" >&2
}
for run in $(seq 1 "$runs"); do
  echo "base backups, round $run/$runs:" >&2
  for mode in $modes; do
    timed "base-push-$mode" "base-push, $(mode_label $mode)" "$work/bin/base-push" --config "$work/conf/base-$mode.toml" -- --checkpoint=fast
    dir=$work/restored-$mode-$run
    timed "base-fetch-$mode" "base-fetch LATEST (incl. pg_verifybackup), $(mode_label $mode)" \
      "$work/bin/base-fetch" --config "$work/conf/base-$mode.toml" LATEST "$dir"
    grep -q "backup successfully verified" "$work/out/stderr" || { echo "pg_verifybackup did not pass" >&2; exit 1; }
    rm -rf "$dir"
  done
  for mode in plain cipher; do
    timed "pgbr-backup-$mode" "pgbackrest backup --type=full (zst 1, process-max 2), $(mode_label $mode)" \
      pgbackrest --config="$work/conf/pgbr-base-$mode.conf" --stanza=bench backup --type=full
    dir=$work/restored-pgbr-$mode-$run
    pg mkdir -m 700 "$dir"
    timed "pgbr-restore-$mode" "pgbackrest restore, $(mode_label $mode)" \
      pgbackrest --config="$work/conf/pgbr-base-$mode.conf" --stanza=bench restore --pg1-path="$dir"
    rm -rf "$dir"
  done
done
pg "$PG_BIN/pg_ctl" -D "$src" -m fast -w stop >/dev/null
stored_mib() { du -sm "$1" | cut -f1; }
base_stored="base-push stored per backup (MiB): plain $(($(stored_mib "$work/repo/base-plain/backups") / runs)), recipient $(($(stored_mib "$work/repo/base-recipient/backups") / runs)), passphrase $(($(stored_mib "$work/repo/base-passphrase/backups") / runs))"

# --- report --------------------------------------------------------------------------------------
echo
echo "WAL: $segments segments of 16 MiB ($((segments * 16)) MiB) from pgbench scale $scale, -c 4 -j 2, in $load_s s;"
echo "database $((db_bytes / 1048576)) MiB (pg_database_size); $base_stored;"
echo "$(nproc) cores, load average at the start $load_before and at the end $(cut -d' ' -f1-3 /proc/loadavg);"
echo "$(uname -r); PostgreSQL $("$PG_BIN/postgres" -V | awk '{print $3}'), $(pgbackrest version); medians of $runs runs."
"$PYTHON" - "$results" "$db_bytes" <<'PY'
import json, statistics, sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
db_bytes = int(sys.argv[2])
groups = {}
for r in rows:
    groups.setdefault(r["group"], []).append(r)


def med(group, key="seconds"):
    return statistics.median(r[key] for r in groups[group])


def table(kind, title):
    wal = kind != "base"
    print(f"\n#### {title}\n")
    if wal:
        print("| configuration | runs | median s | seg/s | MB/s | median p50 ms | peak RSS MiB |")
        print("|---|---|---|---|---|---|---|")
    else:
        print("| configuration | runs | median s | MB/s of the database | peak RSS MiB |")
        print("|---|---|---|---|---|")
    for group, rs in groups.items():
        if rs[0]["kind"] != kind:
            continue
        s = med(group)
        peak = max(r["peak_kib"] for r in rs) / 1024
        if wal:
            print(f"| {rs[0]['label']} | {len(rs)} | {s:.2f} | {rs[0]['segments'] / s:.1f} | "
                  f"{rs[0]['bytes'] / 1e6 / s:.0f} | {med(group, 'p50_ms'):.1f} | {peak:.1f} |")
        else:
            print(f"| {rs[0]['label']} | {len(rs)} | {s:.2f} | {db_bytes / 1e6 / s:.0f} | {peak:.1f} |")


table("archive", "Archiving (archive_command)")
table("restore", "Restoring (restore_command, no replay)")
table("base", "Base backup and restore")

# Cost = extra wall time over the plain run of the same configuration (medians); a 15% cost is a
# throughput 13% lower (1 - 1/1.15).
print("\n#### What encryption costs (median wall time, encrypted over plain)\n")
print("| work | configuration | plain s | encrypted s | cost | goal < 15% |")
print("|---|---|---|---|---|---|")
pairs = []
for work, prefix in (("archive", "push-local-serial"), ("archive", "push-local-ahead"), ("archive", "push-s3-serial"),
                     ("restore", "fetch-local-serial"), ("restore", "fetch-local-prefetch"), ("restore", "fetch-s3-serial"),
                     ("base push", "base-push"), ("base fetch", "base-fetch")):
    for mode in ("recipient", "passphrase"):
        pairs.append((work, f"{prefix}-plain", f"{prefix}-{mode}", True))
for work, prefix in (("archive", "pgbr-push"), ("restore", "pgbr-get"), ("base push", "pgbr-backup"), ("base fetch", "pgbr-restore")):
    pairs.append((work, f"{prefix}-plain", f"{prefix}-cipher", False))
for work, plain, enc, ours in pairs:
    if plain not in groups or enc not in groups:
        continue
    a, b = med(plain), med(enc)
    cost = (b / a - 1) * 100
    verdict = ("pass" if cost < 15 else "MISS") if ours else "(peer)"
    label = groups[enc][0]["label"]
    print(f"| {work} | {label} | {a:.2f} | {b:.2f} | {cost:+.1f}% | {verdict} |")
PY
