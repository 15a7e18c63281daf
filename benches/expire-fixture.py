#!/usr/bin/env python3
"""A synthetic walship repository for benches/expire.sh, written as plain files in seconds.

Why: 100,000 wal-push calls would take hours, and base-expire never reads a WAL object's contents,
only its name and size. So one real codec object (made once by wal-push) is copied under every WAL
key, next to a real repository.json (also wal-push's) and two catalog records in the exact format of
crates/walship/src/base/mod.rs (BackupRecord).

The repository (16 MiB segments, timeline 1):
  wal/<log>/<segment>          COUNT segments, numbers 1..COUNT
  wal/<log>/<start>.00000028.backup   one per backup, at its start segment
  catalog/<OLD>.json, backups/<OLD>/{base.tar.000001..3,backup_manifest,owner.json}
  catalog/<NEW>.json, backups/<NEW>/... the same; NEW starts at segment 1 + COUNT*9//10
`base-expire --keep 1` must delete OLD (its record and five objects), the COUNT*9//10 segments
before NEW's start and OLD's .backup file, and nothing else.

Works for local disk (DIR is the repository directory) and for s3s-fs, which serves every file
under ROOT/BUCKET/ as an object (its metadata files are optional: an object without one is served
with defaults), so DIR = ROOT/BUCKET/PREFIX. Writes DIR and, in STATE: deleted.txt and kept.txt
(the keys, sorted) and expected.json (counts and names for the checks).

Usage: expire-fixture.py --dir DIR --state STATE --count COUNT --object OBJ --identity REPOSITORY_JSON
Python 3.9+ standard library only.
"""

import argparse
import json
import os
import sys

SEGMENT_SIZE = 16 << 20
PER_LOG = 0x1_0000_0000 // SEGMENT_SIZE
TIMELINE = 1
# Backup names are start times (YYYYMMDDTHHMMSSZ); both finished long before any run of the bench.
OLD = "20261101T000000Z"
NEW = "20261102T000000Z"
# The writer of both backups: a host that is not this one, long gone.
OWNER = {"host": "bench-origin", "boot_id": "00000000-0000-0000-0000-000000000000", "pid": 1, "pid_start": 0}


def segment_name(number):
    return f"{TIMELINE:08X}{number // PER_LOG:08X}{number % PER_LOG:08X}"


def wal_key(file_name):
    return f"wal/{file_name[:16]}/{file_name}"


def lsn(number, offset):
    position = number * SEGMENT_SIZE + offset
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


def trailer_facts(blob):
    """The original length and SHA-256 a codec object's trailer records (README "Object format")."""
    if len(blob) < 64 or blob[:8] != b"WALSHIP\0" or blob[-8:] != b"WSEND\0\0\x01":
        sys.exit("expire-fixture: the seed object is not a walship codec object")
    trailer = blob[-48:]
    return int.from_bytes(trailer[:8], "little"), trailer[8:40].hex()


def part(key, blob, facts):
    original, sha256 = facts
    return {"key": key, "original_bytes": original, "stored_bytes": len(blob), "sha256": sha256}


def record(name, start, identity, blob, facts, day):
    """A catalog record as base-push writes it, for a backup of three parts starting at `start`."""
    prefix = f"backups/{name}/"
    parts = [part(f"{prefix}base.tar.{i:06d}", blob, facts) for i in (1, 2, 3)]
    manifest = part(f"{prefix}backup_manifest", blob, facts)
    return {
        "format_version": 1,
        "name": name,
        "started_at": f"2026-11-{day:02d}T00:00:00.000000000Z",
        "finished_at": f"2026-11-{day:02d}T00:05:00.000000000Z",
        "start_lsn": lsn(start, 0x28),
        "stop_lsn": lsn(start, 0x100),
        "start_wal_file": segment_name(start),
        "timeline": TIMELINE,
        "stop_timeline": TIMELINE,
        "backup_from": "primary",
        "pg_version": identity["pg_version"],
        "system_identifier": identity["system_identifier"],
        "wal_segment_size": SEGMENT_SIZE,
        "original_bytes": 3 * facts[0],
        "stored_bytes": 4 * len(blob),
        "archives": [{"name": "base.tar", "parts": parts}],
        "manifest": manifest,
        "pg_basebackup": {
            "version": "pg_basebackup (PostgreSQL) 15",
            "arguments": ["-D", "-", "-F", "t", "-X", "fetch", "-l", f"walship {name}", "--checkpoint=fast"],
        },
        "created_by": "walship benches/expire-fixture.py",
    }


class Writer:
    """Writes files under the repository directory, making each directory once."""

    def __init__(self, root):
        self.root = root
        self.made = set()

    def write(self, key, data):
        directory = os.path.dirname(key)
        if directory not in self.made:
            os.makedirs(os.path.join(self.root, directory), exist_ok=True)
            self.made.add(directory)
        with open(os.path.join(self.root, key), "wb") as f:
            f.write(data)


def backup(writer, name, start, identity, blob, facts, day):
    """Writes one backup (objects, owner record, catalog record); returns its keys."""
    rec = record(name, start, identity, blob, facts, day)
    keys = [p["key"] for p in rec["archives"][0]["parts"]] + [rec["manifest"]["key"]]
    for key in keys:
        writer.write(key, blob)
    owner = f"backups/{name}/owner.json"
    writer.write(owner, json.dumps(OWNER | {"started_at": f"2026-11-{day:02d}T00:00:00.000000000Z"}).encode())
    catalog = f"catalog/{name}.json"
    writer.write(catalog, json.dumps(rec, indent=2).encode())
    backup_file = wal_key(f"{segment_name(start)}.00000028.backup")
    writer.write(backup_file, blob)
    return keys + [owner, catalog, backup_file]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--object", required=True)
    p.add_argument("--identity", required=True)
    args = p.parse_args()
    if args.count < 10:
        sys.exit("expire-fixture: COUNT must be at least 10")
    blob = open(args.object, "rb").read()
    facts = trailer_facts(blob)
    identity_bytes = open(args.identity, "rb").read()
    identity = json.loads(identity_bytes)
    if identity.get("wal_segment_size") != SEGMENT_SIZE:
        sys.exit("expire-fixture: the seed repository does not have 16 MiB segments")
    if os.path.exists(args.dir) and os.listdir(args.dir):
        sys.exit(f"expire-fixture: {args.dir} is not empty")
    writer = Writer(args.dir)
    writer.write("repository.json", identity_bytes)
    first, last = 1, args.count
    new_start = first + args.count * 9 // 10
    old_keys = backup(writer, OLD, first + 1, identity, blob, facts, 1)
    new_keys = backup(writer, NEW, new_start, identity, blob, facts, 2)
    deleted, kept = list(old_keys), ["repository.json"] + new_keys
    for number in range(first, last + 1):
        key = wal_key(segment_name(number))
        writer.write(key, blob)
        (deleted if number < new_start else kept).append(key)
    os.makedirs(args.state, exist_ok=True)
    for name, keys in (("deleted.txt", deleted), ("kept.txt", kept)):
        with open(os.path.join(args.state, name), "w") as f:
            f.writelines(k + "\n" for k in sorted(keys))
    expected = {
        "count": args.count,
        "old": OLD,
        "new": NEW,
        "new_start_wal_file": segment_name(new_start),
        # Segments before NEW's start, and OLD's .backup file.
        "wal_files": new_start - first + 1,
        # OLD's record, three parts, manifest and owner record.
        "backup_objects": len(old_keys) - 1,
        "wal_files_kept": last - new_start + 2,
        "object_bytes": len(blob),
    }
    with open(os.path.join(args.state, "expected.json"), "w") as f:
        json.dump(expected, f)


if __name__ == "__main__":
    main()
