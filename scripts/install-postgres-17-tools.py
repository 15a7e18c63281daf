#!/usr/bin/env python3
"""PostgreSQL 17's client programs for the version matrix, from Debian 13 (trixie) packages.

The npm build of PostgreSQL 17 carries only the server. The programs that must be of a backup's own
major version (pg_verifybackup, pg_combinebackup and the pg_waldump that pg_verifybackup runs) exist
for 17 in no registry these machines reach but Debian's trixie packages, which need trixie's glibc.
This unpacks them with trixie's glibc and patches each program (patchelf) to load that glibc and the
npm build's own libpq 17 (trixie's libpq wants trixie's LDAP and TLS libraries too), so that they run
here like any other program; they go into the 17 build's bin directory, beside its server.

Pinned: the package versions and SHA-256s below. Debian's archive keeps only the newest point
release, so when a pinned file is gone the newest trixie package of the same name is taken instead,
its SHA-256 read from the Packages index, the index checked against InRelease, and InRelease's
signature checked by gpgv against the machine's Debian archive keyring. A pinned file that is present
must match its pin.

Usage: scripts/install-postgres-17-tools.py BIN_DIR DOWNLOADS   (prints nothing when already in place)
"""

import hashlib
import io
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request

MIRRORS = {
    "trixie": "http://deb.debian.org/debian",
    "trixie-security": "http://deb.debian.org/debian-security",
}
# package: (pinned version, pinned SHA-256 of the .deb, pool path)
PINNED = {
    "postgresql-client-17": (
        "17.12-0+deb13u1",
        "53466b127f3f6e95c7a30352db7fcdd7b83d2143a03efbdcd005032b5047aa83",
        "pool/main/p/postgresql-17/postgresql-client-17_17.12-0+deb13u1_amd64.deb",
    ),
    "postgresql-17": (
        "17.12-0+deb13u1",
        "72443dcedfa0bdfa79dafdf414c18498b89929eeee1555e987c87154f3082fea",
        "pool/main/p/postgresql-17/postgresql-17_17.12-0+deb13u1_amd64.deb",
    ),
    "libc6": (
        "2.41-12+deb13u5",
        "b59b0625cd1a791375d40dab23a4d5d3d0641e3d0a773501becdc3725b7f99cf",
        "pool/main/g/glibc/libc6_2.41-12+deb13u5_amd64.deb",
    ),
}
PROGRAMS = {
    "postgresql-client-17": ["pg_basebackup", "pg_combinebackup", "pg_verifybackup", "psql"],
    "postgresql-17": ["pg_waldump", "pgbench", "pg_controldata"],
}
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def fail(message):
    sys.exit(f"install-postgres-17-tools: {message}")


def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def newest_from_index(package):
    """(version, sha256, pool path) of the newest trixie `package`, through the signed indexes."""
    best = None
    for suite, mirror in MIRRORS.items():
        signed = fetch(f"{mirror}/dists/{suite}/InRelease")
        if signed is None:
            fail(f"{mirror}/dists/{suite}/InRelease: not found")
        with tempfile.NamedTemporaryFile() as f:
            f.write(signed)
            f.flush()
            check = subprocess.run(["gpgv", "--keyring", KEYRING, f.name], capture_output=True)
            if check.returncode != 0:
                fail(f"{suite} InRelease: bad signature: {check.stderr.decode(errors='replace').strip()}")
        index_path = "main/binary-amd64/Packages.xz"
        lines = [line.split() for line in signed.decode().splitlines()]
        sha = next((w[0] for w in lines if len(w) == 3 and w[2] == index_path and len(w[0]) == 64), None)
        packages = fetch(f"{mirror}/dists/{suite}/{index_path}")
        if sha is None or packages is None or hashlib.sha256(packages).hexdigest() != sha:
            fail(f"{suite} {index_path}: missing or not the one InRelease signs")
        for stanza in lzma.decompress(packages).decode().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
            if fields.get("Package") != package:
                continue
            candidate = (fields["Version"], fields["SHA256"], fields["Filename"], mirror)
            newer = best is None or subprocess.run(
                ["dpkg", "--compare-versions", candidate[0], "gt", best[0]]).returncode == 0
            if newer:
                best = candidate
    if best is None:
        fail(f"no {package} in trixie")
    return best


def download(package, downloads):
    version, sha, pool = PINNED[package]
    path = os.path.join(downloads, os.path.basename(pool))
    if not os.path.exists(path):
        data = fetch(f"{MIRRORS['trixie']}/{pool}")
        if data is None:
            version, sha, pool, mirror = newest_from_index(package)
            print(f"install-postgres-17-tools: {package} {PINNED[package][0]} is gone from Debian's archive; "
                  f"taking {version}, checked against the signed index", file=sys.stderr)
            path = os.path.join(downloads, os.path.basename(pool))
            data = fetch(f"{mirror}/{pool}")
        if data is None or hashlib.sha256(data).hexdigest() != sha:
            fail(f"{pool}: not the SHA-256 {sha}")
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    else:
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != sha:
                os.remove(path)
                fail(f"{path}: not the pinned SHA-256 {sha}; removed it")
    return path


def unpack(deb, root):
    subprocess.run(["dpkg-deb", "-x", deb, root], check=True)


def main():
    if len(sys.argv) != 3:
        fail("usage: install-postgres-17-tools.py BIN_DIR DOWNLOADS")
    bin_dir = os.path.realpath(sys.argv[1])
    downloads = sys.argv[2]
    stamp = os.path.join(bin_dir, ".debian-17-tools")
    wanted = " ".join(f"{p}={v[0]}" for p, v in sorted(PINNED.items()))
    if os.path.exists(stamp) and open(stamp).read().strip() == wanted:
        return
    if shutil.which("patchelf") is None:
        fail("patchelf is missing (apt-get install -y patchelf)")
    print("install-postgres-17-tools: installing PostgreSQL 17's client programs from Debian trixie", file=sys.stderr)
    os.makedirs(downloads, exist_ok=True)
    root = os.path.join(os.path.dirname(bin_dir), "debian-17")
    shutil.rmtree(root, ignore_errors=True)
    for package in PINNED:
        unpack(download(package, downloads), root)
    libs = os.path.join(root, "usr/lib/x86_64-linux-gnu")
    loader = os.path.join(libs, "ld-linux-x86-64.so.2")
    npm_libs = os.path.join(os.path.dirname(bin_dir), "lib")
    search = ":".join([libs, npm_libs, "/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu"])
    for package, programs in PROGRAMS.items():
        for program in programs:
            target = os.path.join(bin_dir, program)
            shutil.copy2(os.path.join(root, "usr/lib/postgresql/17/bin", program), target)
            subprocess.run(["patchelf", "--set-interpreter", loader, "--set-rpath", search, target], check=True)
            os.chmod(target, 0o755)
            version = subprocess.run([target, "--version"], capture_output=True, text=True).stdout
            if "(PostgreSQL) 17." not in version:
                fail(f"{target} does not run as PostgreSQL 17: {version!r}")
    subprocess.run(["chmod", "-R", "a+rX", root], check=True)
    with open(stamp, "w") as f:
        f.write(wanted + "\n")


main()
