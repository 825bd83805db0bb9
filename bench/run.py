"""Run the chat benchmark: picchat and its peers, every scenario, several runs.

Each (server, scenario, run) gets a freshly started server on a free loopback
port (bench/peers.py: installs the peers if missing) and one run of the load
generator (bench/loadgen.py) in this process. Prints a table per scenario and,
with --write, rewrites docs/benchmarks.md with medians, ranges and ratios.

    python3 bench/run.py [--runs 3] [--servers picchat,ncat,...] [--scenarios latency,fanout]
                         [--write docs/benchmarks.md] [--json /var/tmp/picchat-bench.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import peers

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["latency", "fanout", "fanout-wide", "talkers", "stall", "stall-long"]
DEFAULT = ORDER[:5]  # stall-long (40 s per server) only when asked for
TITLES = {
    "latency": "(a) latency: 10 receivers, 1 sender, 2,000 messages at 500/s",
    "fanout": "(b) fan-out: 100 receivers, 1 sender, flood, at most 200 messages in flight, 5 s",
    "fanout-wide": "(b, wide) the same with at most 2,000 messages in flight, 5 s",
    "talkers": "(c) many talkers: 50 clients each sending 100 messages at 20/s and receiving",
    "stall": "(f) one of the 100 receivers of (b) stops reading: what the 99 others get",
    "stall-long": "(f, 40 s) the same, sending for up to 40 s (150,000 messages at most)",
}
COLUMNS = [
    # key, header, format
    ("deliveries_per_s", "deliveries/s", "{:.0f}"),
    ("loss_pct", "undelivered %", "{:.1f}"),
    ("dups", "dups", "{:.0f}"),
    ("corrupt", "corrupt", "{:.0f}"),
    ("order", "order", "{:.0f}"),
    ("lat_p50_ms", "p50 ms", "{:.1f}"),
    ("lat_p99_ms", "p99 ms", "{:.1f}"),
    ("lat_max_ms", "max ms", "{:.0f}"),
    ("srv_cpu_pct", "server CPU %", "{:.0f}"),
    ("gen_cpu_pct", "gen CPU %", "{:.0f}"),
    ("srv_us_per_delivery", "server µs/delivery", "{:.1f}"),
    ("srv_peak_rss_mib", "peak RSS MiB", "{:.1f}"),
    ("srv_ctx", "ctx switches", "{:.0f}"),
]
STALL_COLUMNS = [
    ("stalled_disconnected", "stalled one dropped", "{:.0f}"),
    ("stalled_got", "stalled one got", "{:.0f}"),
]
RATIOS = [
    ("deliveries_per_s", "deliveries/s"),
    ("lat_p50_ms", "p50"),
    ("lat_p99_ms", "p99"),
    ("srv_us_per_delivery", "µs/delivery"),
    ("srv_peak_rss_mib", "peak RSS"),
]


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        mem = f"{int(mem) / 1024 / 1024:.1f} GiB RAM"
    except OSError:
        mem = "?"
    system = f"Linux {platform.release()}; Python {platform.python_version()}"
    return f"{model}, {os.cpu_count()} CPUs, {mem}; {system}"


def fmt(values: list[float], f: str) -> str:
    vals = [v for v in values if v == v]  # drop NaN
    if not vals:
        return "–"
    med = statistics.median(vals)
    if len(vals) > 1 and min(vals) != max(vals):
        return f"{f.format(med)} ({f.format(min(vals))}–{f.format(max(vals))})"
    return f.format(med)


def median(results: list[dict], key: str) -> float:
    vals = [r[key] for r in results if key in r and r[key] == r[key]]
    return statistics.median(vals) if vals else float("nan")


def table(scenario: str, data: dict[str, list[dict]]) -> list[str]:
    cols = COLUMNS + (STALL_COLUMNS if scenario.startswith("stall") else [])
    out = ["| server | " + " | ".join(h for _, h, _ in cols) + " |"]
    out.append("|---" * (len(cols) + 1) + "|")
    for name, results in data.items():
        if not results:
            continue
        cells = [fmt([r.get(k, float("nan")) for r in results], f) for k, _, f in cols]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def ratio_table(data: dict[str, list[dict]]) -> list[str]:
    mine = [n for n in data if n.startswith("picchat") and data[n]]
    others = [n for n in data if not n.startswith("picchat") and data[n]]
    if not mine or not others:
        return []
    out = [
        "| picchat / peer | " + " | ".join(h for _, h in RATIOS) + " |",
        "|---" * (len(RATIOS) + 1) + "|",
    ]
    for m in mine:
        for o in others:
            cells = []
            for k, _ in RATIOS:
                a, b = median(data[m], k), median(data[o], k)
                cells.append(f"{a / b:.2f}" if b and a == a and b == b else "–")
            out.append(f"| {m} / {o} | " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--servers", default=",".join(s.name.replace(" ", "-") for s in peers.SERVERS))
    ap.add_argument("--scenarios", default=",".join(DEFAULT))
    ap.add_argument(
        "--write", help="write the results as markdown to this file (docs/benchmarks.md)"
    )
    ap.add_argument("--json", help="write every run's figures to this JSON file")
    ap.add_argument("--from-json", help="only render --write from a JSON file of an earlier run")
    a = ap.parse_args(argv)
    # Stopped with SIGTERM: unwind, so that each running server is stopped (finally).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if a.from_json:
        return render_only(a)
    wanted = a.servers.split(",")
    servers = [s for s in peers.SERVERS if s.name.replace(" ", "-") in wanted]
    scenarios = [s for s in a.scenarios.split(",") if s]
    for s in scenarios:
        if s not in loadgen.SCENARIOS:
            ap.error(f"unknown scenario {s}")
    skipped: dict[str, str] = {}
    ready = []
    for s in servers:
        why = s.install()
        if why:
            print(f"SKIPPED {s.name}: {why}", flush=True)
            skipped[s.name] = why
        else:
            ready.append(s)
    versions = {s.name: s.version() for s in ready}
    started = datetime.datetime.now(datetime.UTC)
    results: dict[str, dict[str, list[dict]]] = {
        sc: {s.name: [] for s in ready} for sc in scenarios
    }
    failures: list[str] = []
    for run in range(a.runs):
        for sc in scenarios:
            for s in ready:
                try:
                    srv = peers.Running(s)
                except (RuntimeError, OSError) as e:
                    failures.append(f"{s.name} {sc} run {run + 1}: {e}")
                    print("FAILED", failures[-1], flush=True)
                    continue
                try:
                    r = loadgen.run(
                        s.proto, srv.port, loadgen.SCENARIOS[sc], srv.pid, limit=60
                    ).summary()
                except OSError as e:
                    failures.append(f"{s.name} {sc} run {run + 1}: {e!r}")
                    print("FAILED", failures[-1], flush=True)
                    continue
                finally:
                    srv.stop()
                results[sc][s.name].append(r)
                print(
                    f"run {run + 1} {sc:8} {s.name:12} {r['deliveries_per_s']:8.0f}/s "
                    f"undelivered {r['loss_pct']:5.1f}% p50 {r['lat_p50_ms']:8.1f} ms "
                    f"p99 {r['lat_p99_ms']:8.1f} ms server {r.get('srv_cpu_pct', 0):4.0f}% "
                    f"gen {r['gen_cpu_pct']:4.0f}% dups {r['dups']} corrupt {r['corrupt']} "
                    f"order {r['order']} not-ready {r['not_ready']} dropped {r['disconnected']}",
                    flush=True,
                )
                time.sleep(0.3)
    for sc in scenarios:
        print(f"\n{TITLES[sc]}")
        print("\n".join(table(sc, results[sc])))
        print("\n".join(ratio_table(results[sc])))
    if a.json:
        saved = {
            "results": results,
            "versions": versions,
            "skipped": skipped,
            "failures": failures,
            "started": started.isoformat(),
            "runs": a.runs,
        }
        Path(a.json).write_text(json.dumps(saved, indent=1))
    if a.write:
        write_keeping_findings(
            a.write,
            markdown(results, ready, versions, skipped, failures, started, a.runs, scenarios),
        )
        print(f"\nwrote {a.write}")
    return 0


INTRO = """\
# Benchmarks: picchat and its peers

Written by `bench/run.py` (except the hand-written "Findings" at the end, which it keeps).
`make bench` runs `bench/durability.py` (what durability costs), then these commands (the
latency scenario five times, as its target is a median of five), then `bench/idle.py`
((d) idle connections, (e) an idle server, (g) start-up; results in bench/idle-results.md),
`bench/scale.py` (5,000 idle members; docs/robustness.md) and `bench/journald.py` ((a) under
systemd, chat logged to journald or not, on 2 CPUs and on one; in "Findings"; it needs root
and systemd-nspawn, and says so and skips where they are missing):

    python3 bench/run.py --runs 5 --scenarios latency --json /var/tmp/picchat-bench-lat.json
    python3 bench/run.py --runs 3 --scenarios fanout,fanout-wide,talkers,stall \\
        --json /var/tmp/picchat-bench.json
    python3 bench/run.py --runs 1 --scenarios stall-long --json /var/tmp/picchat-bench-long.json
    python3 bench/run.py --write docs/benchmarks.md --from-json \\
        /var/tmp/picchat-bench-lat.json,/var/tmp/picchat-bench.json,/var/tmp/picchat-bench-long.json

## How it is measured

- **One generator process** (`bench/loadgen.py`, standard library, one thread, one
  `selectors` loop) opens the receivers and senders on loopback, one connection at a time
  (paced: no burst beyond a listen backlog), waits until every receiver has seen a probe
  message (so every one is in the room), then sends. Each message is the same for every
  server: `~B~SENDER:SEQ:SEND_NS:PAD:CRC32` (about 70 bytes), framed as a line (picchat,
  ncat), an IRC `PRIVMSG #bench` (miniircd) or an MQTT 3.1.1 QoS 0 `PUBLISH` to topic
  `bench` (mosquitto).
- **Counted per receiver**: unique deliveries (deliveries/s = all receivers' deliveries over
  the time from the first send to the last delivery or the end of the drain), duplicates,
  corrupted lines (bad checksum), order violations (a sender's sequence number going
  back), latency (receive time − send timestamp, both from one monotonic clock; in the
  flood scenarios (b) and (f), of every 10th message, a uniform sample).
- **The generator checks at C speed**, so that it can keep up with the fastest server: a
  receiver's chunk of lines is compared byte for byte with the lines its sender sent (each
  with the prefix the server adds); where that fails (another sender, a probe, a lost,
  repeated or damaged line) one regex pass and checksums check it, and where that fails too,
  it goes line by line. `tests/unit/test_bench_loadgen.py` holds the three to the same
  counts.
  **undelivered %** = messages sent (handed to the kernel) but not received by the end of
  the run (the send phase plus a drain of up to 3 s): it is loss *or* back-pressure that did
  not finish in time (picchat's rate limit never drops a line; it reads the sender more
  slowly).
- **Server** figures from `/proc/PID` over the same interval: CPU seconds (user + system,
  as % of one core), peak RSS (VmHWM, since the server started), context switches (all
  threads). **gen CPU %** is the generator's own CPU over that interval. The machine has
  {cpus} CPUs: generator and server share them, so a column near 100 % says which one was
  saturated (each is single-threaded).
- Every scenario is bounded in messages and seconds; each (server, scenario, run) starts a
  fresh server. Figures are medians of {runs} runs, with the range (min–max) in brackets.

## Reading the tables

- **picchat** rows (defaults) in (a), (b) and (f) show picchat's default rate limit at work:
  one connection is read at 50 lines/s after a burst of 200. The sender's lines wait in the
  kernel's socket buffers (back-pressure, nothing is dropped), so within the bounded run most
  of them are still **undelivered** and latencies are seconds. The **picchat-rl0** rows are
  the same server with `--rate-limit 0`.
- **corrupt** lines from **ncat**: `ncat --chat` puts its `<userN> ` prefix in front of each
  chunk it reads, not each line, so a line that spans two reads gets the prefix in its middle
  (`~B~…:148:16<user4> 124068236533:…`). The other servers frame by line or packet.
- **(b) and (b, wide)**: the sender keeps at most 200 (or 2,000) messages in flight, i.e.
  sent but not yet received by every reading receiver. With 200 a server that takes long
  from reading a line to writing it out is held to that pace (its CPU % stays low); with
  2,000 each server runs until it or the generator saturates a core. Where the generator
  (Python, one core) is near 100 %, the server's deliveries/s are a lower bound of what it
  could do; server µs/delivery and the server's CPU % stay comparable. Latency in floods is
  mostly queueing.
- (c) sends 50 × 100 messages at 20/s per client (1,000 messages/s in, about 49,000
  deliveries/s out): within picchat's default rate limit.
- (f): the receiver that stops reading has a 4 KiB `SO_RCVBUF`, but the server's side of a
  loopback connection still buffers about 3 MB (send-buffer autotuning), so a server notices
  the stall only after that; (f, 40 s) sends for longer, for servers slow enough that (f)
  ends before their buffers fill.
  **stalled one dropped** is 1 when the server had disconnected it by the end; **stalled one
  got** is how many messages it could still read afterwards. Latency and deliveries are the
  99 others'.

## Machine, versions, date

- Date: {date}
- Machine: {machine}
{versions}

## Configuration of each server

Every server listens on a free loopback port (`PORT`); `DIR` is a fresh directory under
`/var/tmp` (a real disk, not tmpfs) per run.

{configs}

Settings changed from picchat's defaults, all listed: the port; `--socket off` (no Unix
socket, so that concurrent servers do not collide; the benchmark does not use it);
`--state-dir DIR/state`, which turns on the durable history with the default `sync = commit`
policy (group commit: one fsync per loop turn), as the durability issue asks; and, in the
rows labelled **picchat-rl0…** only, `--rate-limit 0` (no per-connection rate limit);
**picchat-rl0-interval** also sets `--sync interval` (written at once, fsynced every 5 s:
survives a crash of picchat, not a power cut); **picchat-rl0-mem** runs without
`--state-dir` (history in memory only, picchat's default without a state directory). picchat's
default rate limit is 50 lines/s per connection with a burst of 200: a single sender in (a)
(500/s) and (b) (flood) is read at that pace, so those rows measure the rate limit, not the
server. Everything else is the default (`log-chat` on: every chat line is logged to stderr,
here a file).
"""


FINDINGS = "\n## Findings"


def write_keeping_findings(path: str, text: str) -> None:
    """Write text to path, keeping a hand-written "## Findings" section already there."""
    target = Path(path)
    if target.exists():
        old = target.read_text()
        if FINDINGS in old:
            text = text.rstrip("\n") + "\n" + old[old.index(FINDINGS) :]
    target.write_text(text)


def render_only(a: argparse.Namespace) -> int:
    """Render from one or more JSON files (comma-separated; later scenarios added)."""
    files = a.from_json.split(",")
    saved = json.loads(Path(files[0]).read_text())
    for extra in files[1:]:
        more = json.loads(Path(extra).read_text())
        for sc, data in more["results"].items():
            saved["results"][sc] = data
        saved["versions"].update(more["versions"])
        saved.setdefault("failures", []).extend(more.get("failures", []))
    results = saved["results"]
    scenarios = [s for s in ORDER if s in results]
    names = {n for sc in results.values() for n in sc}
    ready = [s for s in peers.SERVERS if s.name in names]
    runs = saved.get("runs") or max(len(v) for sc in results.values() for v in sc.values())
    started = datetime.datetime.fromisoformat(saved["started"]) if "started" in saved else None
    if started is None:
        mtime = Path(files[0]).stat().st_mtime
        started = datetime.datetime.fromtimestamp(mtime, datetime.UTC)
    text = markdown(
        results,
        ready,
        saved["versions"],
        saved.get("skipped", {}),
        saved.get("failures", []),
        started,
        runs,
        scenarios,
    )
    if a.write:
        write_keeping_findings(a.write, text)
        print(f"wrote {a.write}")
    else:
        print(text)
    return 0


def markdown(results, ready, versions, skipped, failures, started, runs, scenarios) -> str:
    lines = []
    vers = "\n".join(f"- {n}: {v}" for n, v in versions.items())
    configs = "\n".join(f"- **{s.name}**: `{s.describe()}`" for s in ready)
    if any(s.kind == "ncat" for s in ready):
        configs += (
            "\n\nncat's `--max-conns` is raised from its default of 100 (scenarios (b) and (f)"
            " open 101 connections). ncat prefixes each line with `<userN> `; miniircd runs"
            " as `nobody` (it refuses to run as root without `--setuid`); mosquitto drops to"
            " its own user when started as root."
        )
    lines.append(
        INTRO.format(
            cpus=os.cpu_count(),
            runs=runs,
            date=started.strftime("%Y-%m-%d %H:%M UTC"),
            machine=machine(),
            versions=vers,
            configs=configs,
        )
    )
    if skipped:
        lines.append("Skipped: " + "; ".join(f"{n}: {w}" for n, w in skipped.items()) + "\n")
    lines.append("## Results\n")
    for sc in scenarios:
        n = max((len(v) for v in results[sc].values()), default=0)
        note = "" if n == runs else f" ({n} run{'s' if n != 1 else ''})"
        lines.append(f"### {TITLES[sc]}{note}\n")
        lines += table(sc, results[sc])
        lines.append("")
        rt = ratio_table(results[sc])
        if rt:
            lines.append("Ratios of medians, picchat / peer (deliveries/s: above 1 is better for")
            lines.append("picchat; latency, µs/delivery, RSS: below 1 is better for picchat):\n")
            lines += rt
            lines.append("")
    if failures:
        lines.append("## Runs that failed\n")
        lines += [f"- {f}" for f in failures]
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
