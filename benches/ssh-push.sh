#!/usr/bin/env bash
# The cost of one wal-push over SSH on loopback, connection set-up included, next to the cost of an
# SSH connection alone (`ssh host true`) and of wal-push to local disk. A throwaway sshd runs as the
# server user on 127.0.0.1; every call is a fresh process, as under archive_command.
#
# Usage: benches/ssh-push.sh [CALLS]      (default 20; prints a Markdown table; release build)
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/loopback-sshd.sh
calls=${1:-20}
scripts/install-deps.sh
cargo build --release --quiet -p wal-push -p wal-fetch

as_user=()
user=$(id -un)
if [ "$(id -u)" = 0 ]; then as_user=(runuser -u postgres --); user=postgres; fi

work=$(mktemp -d /tmp/walship-bench-ssh.XXXXXX)
chmod 755 "$work"
sshd_pid=
cleanup() {
  if [ -n "$sshd_pid" ]; then kill "$sshd_pid" 2>/dev/null || true; wait "$sshd_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

cp target/release/wal-push "$work/"
mkdir -p "$work/repo" "$work/local" "$work/home" "$work/wal"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sshd_files "$work" "$port"
cat >"$work/walship.toml" <<CONF
repo = "ssh://$user@127.0.0.1:$port$work/repo"
[ssh]
identity_file = "$work/clientkey"
known_hosts_file = "$work/known_hosts"
CONF

# 16 MiB WAL-like segments (zero runs between random records) with valid PostgreSQL 15 headers.
python3 - "$work/wal" "$calls" <<'PY'
import os, struct, sys
out, calls = sys.argv[1], int(sys.argv[2])
size = 16 << 20
for segno in range(1, calls + 1):
    header = struct.pack("<HHIQI4xQII", 0xD110, 0x0006, 1, segno * size, 0, 7310000000000000001, size, 8192)
    body = bytearray()
    while len(body) < size:
        body += bytes(4096) + os.urandom(4096)
    open(f"{out}/{1:08X}{0:08X}{segno:08X}", "wb").write(header + bytes(body[len(header):size]))
PY
[ "$(id -u)" = 0 ] && chown -R postgres "$work"
chmod 600 "$work/hostkey" "$work/clientkey"
"${as_user[@]}" /usr/sbin/sshd -D -e -f "$work/sshd_config" 2>"$work/sshd.log" &
sshd_pid=$!
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.05; done

ssh_opts=(-o BatchMode=yes -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$work/known_hosts" -o ControlPath=none
  -i "$work/clientkey" -o IdentitiesOnly=yes -p "$port")

# Runs "$@" once per segment (SEG in the arguments replaced by the segment's name); prints
# "median ms | mean ms".
time_calls() {
  local times=() seg start end
  for path in "$work"/wal/*; do
    seg=$(basename "$path")
    start=$(date +%s%N)
    "${as_user[@]}" env HOME="$work/home" "${@//SEG/$seg}" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
    end=$(date +%s%N)
    times+=($(( (end - start) / 1000 )))
  done
  printf '%s\n' "${times[@]}" | sort -n | awk '{ v[NR] = $1; s += $1 } END {
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "%.1f | %.1f", m / 1000, s / NR / 1000 }'
}

echo "| $calls calls, 16 MiB WAL-like segments | median (ms) | mean (ms) |"
echo "|---|---|---|"
echo "| \`ssh host true\` (connection set-up alone) | $(time_calls ssh "${ssh_opts[@]}" "$user@127.0.0.1" true) |"
echo "| wal-push, local disk | $(time_calls "$work/wal-push" --repo "$work/local" "$work/wal/SEG" SEG) |"
echo "| wal-push over SSH (connection included) | $(time_calls "$work/wal-push" --config "$work/walship.toml" "$work/wal/SEG" SEG) |"
