#!/usr/bin/env python3
"""Emulators of PostgreSQL's archiver and startup (recovery) processes, for benches/wal-throughput.sh.

Python 3.9+ standard library only. Every call goes through the small runner process
(wal-throughput-runner.rs), which times it and measures the peak RSS of the calls and of anything
they left running (see there why Python cannot measure that itself). Run one process per
configuration, as the server user.

  archiver.py archive --runner R --data DATA --segments LIST --command CMD --label L --results FILE
      Like PostgreSQL 15's archiver catching up on a backlog: every segment of LIST is marked .ready
      in DATA/pg_wal/archive_status; for each, in order, runs CMD (%p = pg_wal/NAME, %f = NAME,
      %% = %) with the working directory DATA, and renames .ready to .done after exit 0 (any other
      exit fails the run: PostgreSQL would retry, a benchmark should not hide it).
  archiver.py restore --runner R --data RECOVERY_DIR --segments LIST --source SRC_PG_WAL --command CMD ...
      Like PostgreSQL's startup process during archive recovery: RECOVERY_DIR gets postmaster.pid
      (this process's pid, alive for the whole run), recovery.signal and pg_wal/archive_status; for
      each segment in order, runs CMD (%f = NAME, %p = pg_wal/RECOVERYXLOG, %r = the first segment)
      there, checks the restored file (size, and the page header names this segment) and deletes it,
      as replay would. Replay itself takes no time here: what is measured is the restore path alone.
  archiver.py report --results FILE [--segments N]
      Prints the Markdown tables and the goal ratios.

Each run appends one JSON line to --results: calls, bytes, wall seconds, per-call latency, the
calls answered locally (wal-push from a look-ahead record, wal-fetch from the prefetch spool: the
--local-marker text in the call's output), bytes stored (--stored DIR) and peak RSS.
"""

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time

SEGMENT_RE_LEN = 24


def fail(message):
    print(f"archiver.py: {message}", file=sys.stderr)
    sys.exit(1)


def expand(template, mapping):
    out, i = [], 0
    while i < len(template):
        c = template[i]
        if c == "%" and i + 1 < len(template):
            nxt = template[i + 1]
            if nxt == "%":
                out.append("%")
            elif nxt in mapping:
                out.append(mapping[nxt])
            else:
                out.append("%" + nxt)
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def read_all(path):
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


def tree_bytes(path):
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


class Runner:
    def __init__(self, path, reap_secs):
        self.proc = subprocess.Popen(
            [path, str(reap_secs)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def call(self, cwd, output, command):
        if "\t" in command or "\n" in command:
            fail(f"a command may not hold tabs or newlines: {command!r}")
        self.proc.stdin.write(f"{cwd}\t{output}\t{command}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            fail("the runner died")
        code, nanos = line.split()
        return int(code), int(nanos) / 1e9

    def finish(self):
        self.proc.stdin.close()
        rest = self.proc.stdout.read().split()
        self.proc.wait()
        if len(rest) != 3 or rest[0] != "peak":
            fail(f"unexpected runner summary: {rest}")
        return int(rest[1]), int(rest[2])


def segment_header_ok(path, name, size):
    """The long page header at the start of a segment names it (timeline and page address)."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24:
        return False
    magic, info, tli, pageaddr = struct.unpack("<HHIQ", head[:16])
    per_log = 0x100000000 // size
    segno = int(name[8:16], 16) * per_log + int(name[16:24], 16)
    return tli == int(name[0:8], 16) and pageaddr == segno * size


def percentile(sorted_values, p):
    if not sorted_values:
        return 0.0
    k = (len(sorted_values) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def run(args):
    segments = [s for s in open(args.segments).read().split() if s]
    if not segments:
        fail(f"no segments listed in {args.segments}")
    data = os.path.abspath(args.data)
    pg_wal = os.path.join(data, "pg_wal")
    status = os.path.join(pg_wal, "archive_status")
    source = args.source or pg_wal
    size = os.path.getsize(os.path.join(source, segments[0]))
    log = open(args.log, "a") if args.log else None
    output = os.path.join(args.scratch, f"call-{os.getpid()}.out")

    if args.mode == "archive":
        for name in segments:
            done, ready = os.path.join(status, name + ".done"), os.path.join(status, name + ".ready")
            if os.path.exists(done):
                os.rename(done, ready)
            if not os.path.exists(ready):
                fail(f"{ready} missing")
        shutil.rmtree(os.path.join(pg_wal, "walship"), ignore_errors=True)
    else:
        os.makedirs(os.path.join(pg_wal, "archive_status"), exist_ok=True)
        shutil.rmtree(os.path.join(pg_wal, "walship"), ignore_errors=True)
        for leftover in ("RECOVERYXLOG", "RECOVERYHISTORY"):
            if os.path.exists(os.path.join(pg_wal, leftover)):
                os.remove(os.path.join(pg_wal, leftover))
        # postmaster.pid: pid, data directory, start time (epoch), port, socket dir, ... The pid is this
        # emulator's, alive for the whole run, as the postmaster is during a real recovery.
        with open(os.path.join(data, "postmaster.pid"), "w") as f:
            f.write(f"{os.getpid()}\n{data}\n{int(time.time())}\n5432\n\n\n\n\n")
        open(os.path.join(data, "recovery.signal"), "w").close()

    # The same start for everyone: every segment and every warm-up tree read once (page cache).
    for name in segments:
        read_all(os.path.join(source, name))
    for tree in args.warm or []:
        for root, _dirs, files in os.walk(tree):
            for name in files:
                try:
                    read_all(os.path.join(root, name))
                except OSError:
                    pass

    runner = Runner(args.runner, args.reap_secs)
    latencies, local = [], []
    started = time.perf_counter()
    for name in segments:
        if args.mode == "archive":
            command = expand(args.command, {"p": f"pg_wal/{name}", "f": name})
        else:
            command = expand(args.command, {"p": "pg_wal/RECOVERYXLOG", "f": name, "r": segments[0]})
        code, seconds = runner.call(data, output, command)
        text = open(output, errors="replace").read()
        if log:
            log.write(f"$ {command}\n{text}")
        if code != 0:
            runner.finish()
            fail(f"[{args.label}] {name}: exit {code} from: {command}\n{text}")
        if args.mode == "archive":
            os.rename(os.path.join(status, name + ".ready"), os.path.join(status, name + ".done"))
        else:
            restored = os.path.join(pg_wal, "RECOVERYXLOG")
            if os.path.getsize(restored) != size or not segment_header_ok(restored, name, size):
                runner.finish()
                fail(f"[{args.label}] {name}: the restored file is not that segment")
            os.remove(restored)
        latencies.append(seconds)
        if args.local_marker and args.local_marker in text:
            local.append(seconds)
    elapsed = time.perf_counter() - started

    if args.mode == "restore":
        # Recovery ends: a prefetch worker sees it and exits; the runner waits for it.
        os.remove(os.path.join(data, "recovery.signal"))
    peak_kib, stragglers = runner.finish()
    if args.mode == "restore":
        os.remove(os.path.join(data, "postmaster.pid"))
    if log:
        log.close()
    ordered = sorted(latencies)
    result = {
        "kind": args.mode,
        "label": args.label,
        "group": args.group,
        "segments": len(segments),
        "bytes": len(segments) * size,
        "seconds": elapsed,
        "p50_ms": percentile(ordered, 0.5) * 1000,
        "p95_ms": percentile(ordered, 0.95) * 1000,
        "max_ms": ordered[-1] * 1000,
        "local_calls": len(local),
        "local_mean_ms": statistics.mean(local) * 1000 if local else None,
        "local_max_ms": max(local) * 1000 if local else None,
        "stored_bytes": tree_bytes(args.stored) if args.stored else None,
        "peak_kib": peak_kib,
        "stragglers": stragglers,
    }
    with open(args.results, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(
        f"  {args.label}: {len(segments)} segments in {elapsed:.2f} s, "
        f"p50 {result['p50_ms']:.1f} ms, peak RSS {peak_kib / 1024:.1f} MiB"
        + (f", {len(local)} answered locally" if args.local_marker else ""),
        file=sys.stderr,
    )


# ---------------------------------------------------------------------------------------------------
# Report


def fmt(value, digits=1):
    return "–" if value is None else f"{value:.{digits}f}"


def report(args):
    rows = [json.loads(line) for line in open(args.results) if line.strip()]
    by_group = {}
    for row in rows:
        if row.get("group"):
            by_group[row["group"]] = row

    def rate(row):
        return row["segments"] / row["seconds"]

    def mbps(row):
        return row["bytes"] / 1e6 / row["seconds"]

    for kind, title, local_head in (
        ("archive", "Archiving (archive_command)", "answered from a look-ahead record: calls, mean ms"),
        ("restore", "Restoring (restore_command, no replay)", "answered from the prefetch spool: calls, mean ms"),
    ):
        table = [r for r in rows if r["kind"] == kind]
        if not table:
            continue
        stored = kind == "archive"
        print(f"\n### {title}\n")
        print(
            f"| configuration | segments | s | seg/s | MB/s | p50 ms | p95 ms | max ms | {local_head} |"
            + (" stored MiB |" if stored else "")
            + " peak RSS MiB |"
        )
        print("|---|---|---|---|---|---|---|---|---|" + ("---|" if stored else "") + "---|")
        for r in table:
            local = f"{r['local_calls']}, {r['local_mean_ms']:.1f}" if r["local_calls"] else "–"
            peak = f"{r['peak_kib'] / 1024:.1f}" + (" (stragglers killed)" if r["stragglers"] else "")
            print(
                f"| {r['label']} | {r['segments']} | {r['seconds']:.2f} | {rate(r):.1f} | {mbps(r):.0f} | "
                f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['max_ms']:.1f} | {local} |"
                + (f" {r['stored_bytes'] / 1048576:.1f} |" if stored and r["stored_bytes"] is not None else " – |" if stored else "")
                + f" {peak} |"
            )

    recoveries = [r for r in rows if r["kind"] == "recovery"]
    if recoveries:
        print("\n### Real recovery (PostgreSQL 15 replaying the archive from the base backup to its end, then promoting)\n")
        print("| restore_command | WAL replayed MiB | segments restored | wall s | MB/s of WAL |")
        print("|---|---|---|---|---|")
        for r in recoveries:
            print(
                f"| {r['label']} | {r['bytes'] / 1048576:.0f} | {r['restored']} | {r['seconds']:.1f} | "
                f"{r['bytes'] / 1e6 / r['seconds']:.0f} |"
            )

    print("\n### Goals\n")
    print("| goal | measured | bar | |")
    print("|---|---|---|---|")

    def ratio_line(goal, num, den, bar):
        a, b = by_group.get(num), by_group.get(den)
        if not a or not b:
            print(f"| {goal} | not measured | ≥ {bar}x | – |")
            return
        value = rate(a) / rate(b)
        print(f"| {goal} | {value:.2f}x ({rate(a):.1f} vs {rate(b):.1f} seg/s) | ≥ {bar}x | {'pass' if value >= bar else 'MISS'} |")

    ratio_line("archive, local disk: wal-push look-ahead vs pgbackrest archive-push sync", "push-local-ahead", "pgbr-push-sync", 3)
    ratio_line("archive, local disk: wal-push look-ahead vs pgbackrest archive-push async", "push-local-ahead", "pgbr-push-async", 1)
    ratio_line("restore, local disk: wal-fetch prefetch vs pgbackrest archive-get sync", "fetch-local-prefetch", "pgbr-get-sync", 3)
    ahead = by_group.get("push-local-ahead")
    if ahead and ahead["local_calls"]:
        ok = ahead["local_mean_ms"] < 5
        print(
            f"| an already-pushed segment (look-ahead record), local disk: mean latency per call | "
            f"{ahead['local_mean_ms']:.1f} ms (max {ahead['local_max_ms']:.1f}, {ahead['local_calls']} calls) | < 5 ms | {'pass' if ok else 'MISS'} |"
        )
    else:
        print("| an already-pushed segment (look-ahead record): latency | not measured | < 5 ms | – |")
    walship = [r for r in rows if r.get("group", "").startswith(("push-", "fetch-")) and r["kind"] != "recovery"]
    if walship:
        top = max(walship, key=lambda r: r["peak_kib"])
        ok = top["peak_kib"] < 64 * 1024
        print(
            f"| peak memory of wal-push and wal-fetch (largest over every walship configuration above, prefetch worker included) | "
            f"{top['peak_kib'] / 1024:.1f} MiB ({top['label']}) | < 64 MiB | {'pass' if ok else 'MISS'} |"
        )
    fast, slow = by_group.get("recovery-fetch-prefetch"), by_group.get("recovery-pgbr-sync")
    if fast and slow:
        print(
            f"| (no bar) real recovery, local disk: wal-fetch prefetch vs pgbackrest archive-get sync, by wall time | "
            f"{slow['seconds'] / fast['seconds']:.2f}x ({fast['seconds']:.1f} vs {slow['seconds']:.1f} s) | – | – |"
        )
    if recoveries:
        smallest = min(r["bytes"] for r in recoveries)
        ok = smallest >= 1 << 30
        print(f"| WAL replayed by the real recoveries | {smallest / 1048576:.0f} MiB | ≥ 1024 MiB | {'pass' if ok else 'MISS (small run)'} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("archive", "restore"):
        p = sub.add_parser(mode)
        p.add_argument("--runner", required=True)
        p.add_argument("--data", required=True, help="the data directory (archive) or the recovery directory (restore)")
        p.add_argument("--segments", required=True, help="file listing the segment names, in order")
        p.add_argument("--source", help="directory holding the original segments (restore: for sizes and warming)")
        p.add_argument("--command", required=True)
        p.add_argument("--label", required=True)
        p.add_argument("--group", default="", help="a stable key for the goal ratios")
        p.add_argument("--results", required=True)
        p.add_argument("--log")
        p.add_argument("--scratch", required=True, help="a directory for the calls' output")
        p.add_argument("--local-marker", help="text in a call's output that says it was answered locally")
        p.add_argument("--stored", help="directory whose total size is the bytes stored")
        p.add_argument("--warm", action="append", help="a tree to read once before starting (page cache)")
        p.add_argument("--reap-secs", type=int, default=120)
    p = sub.add_parser("report")
    p.add_argument("--results", required=True)
    args = parser.parse_args()
    if args.mode == "report":
        report(args)
    else:
        if args.mode == "restore" and not args.source:
            fail("restore needs --source")
        run(args)


if __name__ == "__main__":
    main()
