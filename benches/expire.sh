#!/usr/bin/env bash
# base-expire over a large repository: wall time and peak memory of expiring COUNT synthetic WAL
# objects on local disk and on S3 (s3s-fs on 127.0.0.1), for each COUNT; the memory must not grow
# with the count (the listing streams in pages of 1000, deletes go in batches).
#
# 1. One codec object, made once: wal-push of a synthetic 16 MiB segment (a valid PostgreSQL 15
#    long page header, zeros after it) into a scratch repository, which also yields a real
#    repository.json.
# 2. Per COUNT and backend, a repository written as plain files by benches/expire-fixture.py (never
#    COUNT wal-push calls): COUNT segments on timeline 1, each a copy of that object, two backups
#    (catalog record, three parts, manifest, owner record, a .backup file) with the newer one
#    starting 90% of the way in. On S3 the files go straight under s3s-fs's root (it serves every
#    file under ROOT/BUCKET/ as an object; its metadata files are optional); a wal-fetch of one
#    segment and a base-list through each backend check that the fixture reads as a repository.
# 3. Timed, each in the small runner of benches/wal-throughput.sh (wall time from fork to exit, peak
#    RSS of the process): `base-expire --keep 1 --dry-run` (its listing to a file), then
#    `base-expire --keep 1 --json`. Checked: the dry run deleted nothing and listed exactly the
#    expected keys; the real run deleted exactly those (every file before minus every file after)
#    and its JSON counts agree; base-list then shows the newer backup only.
# Every timed run starts after a `sync`, with the repository in the page cache (just written).
# Servers (s3s-fs) are not counted in the memory. Prints the command line, then a Markdown table.
#
# Usage: benches/expire.sh [COUNT...]          (default: 10000 100000)
# Environment: WALSHIP_BENCH_DIR  scratch parent directory (default /var/tmp: not tmpfs; needs about
#                                 COUNT x 4 KiB x 2 free, 0.8 GB for 100000, one COUNT at a time)
#              WALSHIP_BENCH_BACKENDS  which to run (default "local s3")
#              WALSHIP_BENCH_KEEP=1  keep the scratch directory (logs, listings) at the end
# Release build; any user (no PostgreSQL server is started). Installs s3s-fs when missing
# (scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(10000 100000)
for count in "${counts[@]}"; do
  case $count in '' | *[!0-9]*) echo "COUNT must be a number: $count" >&2; exit 2 ;; esac
  [ "$count" -ge 10 ] || { echo "COUNT must be at least 10" >&2; exit 2; }
done
scratch_parent=${WALSHIP_BENCH_DIR:-/var/tmp}
echo "Command: WALSHIP_BENCH_DIR=$scratch_parent WALSHIP_BENCH_BACKENDS=\"${WALSHIP_BENCH_BACKENDS:-local s3}\" benches/expire.sh ${counts[*]}"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

scripts/install-deps.sh
cargo build --release --quiet -p base-expire -p base-list -p wal-push -p wal-fetch
PYTHON=/usr/bin/python3

work=$(mktemp -d "$scratch_parent/walship-bench-expire.XXXXXX")
s3s_pid=
cleanup() {
  if [ -n "$s3s_pid" ]; then kill "$s3s_pid" 2>/dev/null || true; wait "$s3s_pid" 2>/dev/null || true; fi
  if [ "${WALSHIP_BENCH_KEEP:-0}" = 1 ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$work"/{bin,logs,out,seed/repo,s3}
for b in base-expire base-list wal-push wal-fetch; do cp "target/release/$b" "$work/bin/"; done
cp benches/expire-fixture.py "$work/bin/"
rustc -O --edition 2021 benches/wal-throughput-runner.rs -o "$work/bin/runner"
bin=$work/bin

# --- 1. the seed object and repository.json --------------------------------------------------------
seed_segment=000000010000000000000001
"$PYTHON" - "$work/seed/$seed_segment" <<'PY'
import struct, sys
size = 16 << 20
# PostgreSQL 15's long page header (magic 0xD110, XLP_LONG_HEADER | XLP_BKP_REMOVABLE) of segment 1.
header = struct.pack("<HHIQI4xQII", 0xD110, 0x0006, 1, 1 * size, 0, 7310000000000000001, size, 8192)
with open(sys.argv[1], "wb") as f:
    f.write(header + bytes(size - len(header)))
PY
"$bin/wal-push" --repo "$work/seed/repo" "$work/seed/$seed_segment" "$seed_segment" 2>"$work/logs/seed.log" ||
  { cat "$work/logs/seed.log" >&2; exit 1; }
seed_object=$work/seed/repo/wal/${seed_segment:0:16}/$seed_segment
[ -f "$seed_object" ] && [ -f "$work/seed/repo/repository.json" ] || { echo "wal-push made no seed object" >&2; exit 1; }

# --- s3s-fs on 127.0.0.1 ---------------------------------------------------------------------------
s3s_fs=${WALSHIP_S3S_FS:-${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs}
s3_port=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$s3s_fs" --host 127.0.0.1 --port "$s3_port" --access-key bench --secret-key benchsecret "$work/s3" >"$work/logs/s3s-fs.log" 2>&1 &
s3s_pid=$!
for i in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$s3_port") 2>/dev/null && break; sleep 0.05; done
[ "$i" -lt 200 ] || { echo "s3s-fs does not listen on 127.0.0.1:$s3_port; its log:" >&2; cat "$work/logs/s3s-fs.log" >&2; exit 1; }
export AWS_EC2_METADATA_DISABLED=true

# The repository of BACKEND for COUNT: base-expire's arguments, and the directory of its files.
repo_args() {
  case $1 in
    local) echo "--repo $work/local-$2" ;;
    s3) echo "--config $work/s3-$2.toml" ;;
  esac
}
repo_dir() {
  case $1 in
    local) echo "$work/local-$2" ;;
    s3) echo "$work/s3/bench$2/expire" ;;
  esac
}
label_of() { case $1 in local) echo "local disk" ;; s3) echo "S3 (s3s-fs, loopback)" ;; esac; }

# Every file of the repository, as keys, sorted.
keys_of() { (cd "$1" && find . -type f -printf '%P\n' | LC_ALL=C sort); }
json_field() { "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
backups_listed() { "$PYTHON" -c 'import json, sys; print(" ".join(b["name"] for b in json.load(sys.stdin)))'; }
fail() { echo "$*" >&2; exit 1; }

# measure NAME COMMAND: runs COMMAND (a shell command line) in the runner after a sync; sets
# $code, $seconds and $peak_mib.
measure() {
  local answer peak
  sync
  answer=$(printf '%s\t%s\t%s\n' "$PWD" "$work/logs/$1.runner" "$2" | "$bin/runner" 10)
  code=$(echo "$answer" | sed -n 1p | cut -d' ' -f1)
  seconds=$(echo "$answer" | sed -n 1p | awk '{printf "%.2f", $2 / 1e9}')
  peak=$(echo "$answer" | sed -n 's/^peak \([0-9]*\) .*/\1/p')
  peak_mib=$(awk -v k="$peak" 'BEGIN {printf "%.1f", k / 1024}')
}

rows=() notes=()
# --- 2 and 3, per COUNT and backend ----------------------------------------------------------------
run_case() {
  local backend=$1 count=$2 dir state name args dry_s dry_mib expected_wal expected_backup wal_files backup_objects
  dir=$(repo_dir "$backend" "$count")
  state=$work/state-$backend-$count
  name=$backend-$count
  args=$(repo_args "$backend" "$count")
  if [ "$backend" = s3 ]; then
    mkdir -p "$work/s3/bench$count" # a bucket of s3s-fs is a directory under its root
    printf 'repo = "s3://bench%s/expire"\n[s3]\nendpoint = "http://127.0.0.1:%s"\nregion = "us-east-1"\nforce_path_style = true\naccess_key_id = "bench"\nsecret_access_key = "benchsecret"\n' \
      "$count" "$s3_port" >"$work/s3-$count.toml"
  fi
  local made=$SECONDS
  "$PYTHON" "$bin/expire-fixture.py" --dir "$dir" --state "$state" --count "$count" --object "$seed_object" \
    --identity "$work/seed/repo/repository.json"
  echo "  $(label_of "$backend"), $count WAL objects: fixture written in $((SECONDS - made)) s" >&2
  # The fixture reads as a repository through the backend: the catalog, and one segment verified.
  [ "$("$bin/base-list" $args --json | backups_listed)" = "$(json_field "$state/expected.json" old) $(json_field "$state/expected.json" new)" ] ||
    fail "$name: base-list does not show the fixture's two backups"
  local probe
  probe=$(json_field "$state/expected.json" new_start_wal_file)
  "$bin/wal-fetch" $args "$probe" "$work/out/probe" 2>>"$work/logs/$name.probe.log" || fail "$name: wal-fetch $probe failed"
  cmp -s "$work/out/probe" "$work/seed/$seed_segment" || fail "$name: wal-fetch $probe returned other bytes"
  rm -f "$work/out/probe"
  keys_of "$dir" >"$state/before.txt"

  measure "$name.dry" "$bin/base-expire $args --keep 1 --dry-run >$state/dry.txt 2>$work/logs/$name.dry.log"
  [ "$code" = 0 ] || { cat "$work/logs/$name.dry.log" >&2; fail "$name: base-expire --dry-run exited $code"; }
  dry_s=$seconds dry_mib=$peak_mib
  keys_of "$dir" | cmp -s - "$state/before.txt" || fail "$name: the dry run changed the repository"
  cut -f2- "$state/dry.txt" | LC_ALL=C sort | cmp -s - "$state/deleted.txt" ||
    fail "$name: the dry run's listing is not the expected deletions ($(wc -l <"$state/dry.txt") lines)"

  measure "$name.run" "$bin/base-expire $args --keep 1 --json >$state/run.json 2>$work/logs/$name.run.log"
  [ "$code" = 0 ] || { cat "$work/logs/$name.run.log" >&2; fail "$name: base-expire exited $code"; }
  keys_of "$dir" >"$state/after.txt"
  LC_ALL=C comm -23 "$state/before.txt" "$state/after.txt" | cmp -s - "$state/deleted.txt" ||
    fail "$name: the run did not delete exactly the expected keys"
  cmp -s "$state/after.txt" "$state/kept.txt" || fail "$name: what is left is not exactly the expected keys"
  expected_wal=$(json_field "$state/expected.json" wal_files)
  expected_backup=$(json_field "$state/expected.json" backup_objects)
  wal_files=$(json_field "$state/run.json" wal_files)
  backup_objects=$(json_field "$state/run.json" backup_objects)
  [ "$wal_files" = "$expected_wal" ] && [ "$backup_objects" = "$expected_backup" ] ||
    fail "$name: the report says $wal_files WAL files and $backup_objects backup objects, not $expected_wal and $expected_backup"
  [ "$("$bin/base-list" $args --json | backups_listed)" = "$(json_field "$state/expected.json" new)" ] ||
    fail "$name: base-list does not show the newer backup alone"
  local deleted=$((wal_files + backup_objects)) empty_dirs=""
  if [ "$backend" = local ]; then
    empty_dirs=$(find "$dir/wal" -mindepth 1 -type d -empty | wc -l)
    notes+=("local disk, $count WAL objects: $empty_dirs of the $(find "$dir/wal" -mindepth 1 -type d | wc -l) WAL directories are left empty")
  fi
  echo "  dry run $dry_s s ($dry_mib MiB), run $seconds s ($peak_mib MiB): $deleted objects deleted, $(wc -l <"$state/after.txt") files left${empty_dirs:+, $empty_dirs empty WAL directories left}" >&2
  rows+=("| $(label_of "$backend") | $count | $deleted | $dry_s | $seconds | $(awk -v n="$deleted" -v s="$seconds" 'BEGIN {printf "%.0f", n / s}') | $dry_mib / $peak_mib |")
  rm -rf "$dir"
  if [ "$backend" = s3 ]; then rm -rf "$work/s3/bench$count" "$work"/s3/.bucket-*; fi
}

for count in "${counts[@]}"; do
  for backend in ${WALSHIP_BENCH_BACKENDS:-local s3}; do
    echo "base-expire --keep 1, $(label_of "$backend"), $count WAL objects:" >&2
    run_case "$backend" "$count"
  done
done

# --- report ----------------------------------------------------------------------------------------
echo
echo "$(nproc) cores, load average at the start $load_before and at the end $(cut -d' ' -f1-3 /proc/loadavg); $(uname -r)."
echo "Each repository: COUNT segments (16 MiB, timeline 1; each object $(stat -c %s "$seed_object") bytes) and two backups;"
echo "\`base-expire --keep 1\` deletes the older backup (6 objects) and the 90% of the WAL before the newer one's start (plus one .backup file)."
echo "Wall time from fork to exit; objects/s = objects deleted / run s; peak RSS of base-expire (maximum resident set size)."
echo "s3s-fs answers each ListObjectsV2 page by walking, statting and sorting every file under the prefix: a page costs"
echo "time in proportion to the objects left, so a sweep of pages of 1000 grows with the square of the count (the dry run"
echo "lists everything; the real run lists what is left as it deletes). A real S3 store pages in constant time."
echo
echo "| backend | WAL objects | objects deleted | dry-run s | run s | objects/s | peak RSS MiB (dry run / run) |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
printf -- '- %s\n' "${notes[@]}"
