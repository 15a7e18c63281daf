#!/usr/bin/env bash
# Peak memory (maximum resident set size, from GNU time) of wal-push and wal-fetch on one 16 MiB WAL
# segment, on local disk and on S3 (s3s-fs on 127.0.0.1), next to the floor `cp` + `sync`.
# Two segments: WAL-like (zero runs between random records, compresses about 2:1) and incompressible
# (random bytes: the largest object and the largest buffers).
#
# Usage: benches/memory.sh            prints a Markdown table (release build)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --quiet -p wal-push -p wal-fetch
bin=$PWD/target/release

work=$(mktemp -d /tmp/walship-bench.XXXXXX)
s3s_pid=
cleanup() {
  if [ -n "$s3s_pid" ]; then kill "$s3s_pid" 2>/dev/null || true; wait "$s3s_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# Segments with a valid PostgreSQL 15 long page header, so wal-push accepts them.
python3 - "$work" <<'PY'
import os, struct, sys
work = sys.argv[1]
size = 16 << 20
def segment(segno, body):
    header = struct.pack("<HHIQI4xQII", 0xD110, 0x0006, 1, segno * size, 0, 7310000000000000001, size, 8192)
    return header + body[len(header):]
rng = os.urandom
walike = bytearray()
while len(walike) < size:
    walike += bytes(4096) + rng(4096)
open(f"{work}/000000010000000000000001", "wb").write(segment(1, bytes(walike[:size])))
open(f"{work}/000000010000000000000002", "wb").write(segment(2, rng(size)))
PY

s3s_fs=${WALSHIP_S3S_FS:-${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/s3/bench" "$work/local"
"$s3s_fs" --host 127.0.0.1 --port "$port" --access-key bench --secret-key benchsecret "$work/s3" >"$work/s3s.log" 2>&1 &
s3s_pid=$!
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.05; done
cat >"$work/s3.toml" <<TOML
repo = "s3://bench/db"
[s3]
endpoint = "http://127.0.0.1:$port"
region = "us-east-1"
force_path_style = true
access_key_id = "bench"
secret_access_key = "benchsecret"
TOML
export AWS_EC2_METADATA_DISABLED=true

# Runs a command under GNU time; prints "max RSS MiB | wall ms".
measure() {
  /usr/bin/time -f '%M %e' -o "$work/time" "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
  read -r kb secs <"$work/time"
  awk -v kb="$kb" -v s="$secs" 'BEGIN { printf "%.1f | %d", kb / 1024, s * 1000 }'
}

echo "| command | segment | peak RSS (MiB) | wall (ms) |"
echo "|---|---|---|---|"
for seg in 000000010000000000000001 000000010000000000000002; do
  kind=$([ "$seg" = 000000010000000000000001 ] && echo "WAL-like" || echo "incompressible")
  echo "| \`cp\` + \`sync\` (floor) | $kind | $(measure sh -c "cp $work/$seg $work/copy && sync $work/copy") |"
  rm -f "$work/copy"
  echo "| wal-push, local disk | $kind | $(measure "$bin/wal-push" --repo "$work/local" "$work/$seg" "$seg") |"
  echo "| wal-fetch, local disk | $kind | $(measure "$bin/wal-fetch" --repo "$work/local" "$seg" "$work/fetched") |"
  echo "| wal-push, S3 (s3s-fs, loopback) | $kind | $(measure "$bin/wal-push" --config "$work/s3.toml" "$work/$seg" "$seg") |"
  echo "| wal-fetch, S3 (s3s-fs, loopback) | $kind | $(measure "$bin/wal-fetch" --config "$work/s3.toml" "$seg" "$work/fetched") |"
  cmp -s "$work/fetched" "$work/$seg" || { echo "fetched $seg differs" >&2; exit 1; }
done
