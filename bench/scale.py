"""picchat with thousands of idle members: what one pair of talkers sees.

Starts picchat-server (``--rate-limit 0``, no state directory) on a free
loopback port, connects a pair (A talks, B listens), then N idle plain
members, paced. A sends a line every 20 ms throughout, carrying its send time;
B measures each line's delivery time. Phases: before the crowd, while it
connects, with it connected, and while all N close at once (the loop's
longest stall shows as the longest delivery). Prints one JSON object.

    python3 bench/scale.py [--members 5000] [--seconds 3]

The figures are quoted in docs/robustness.md ("Beyond the suite").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers

PERIOD = 0.02  # seconds between the talker's lines


def raise_nofile(need: int) -> int:
    """Raise this process's fd limit towards need; returns the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


class Pair:
    """A talks, B listens; each of A's lines carries its send time."""

    def __init__(self, port: int) -> None:
        self.a = socket.create_connection(("127.0.0.1", port))
        self.b = socket.create_connection(("127.0.0.1", port))
        self.b.setblocking(False)
        self.buf = b""
        self.seq = 0
        self.next_send = 0.0
        self.lat: list[tuple[str, float]] = []  # (phase, seconds)
        self.phase = "warm-up"

    def tick(self, until: float) -> None:
        """Talk and listen until ``until`` (monotonic seconds)."""
        sel = selectors.DefaultSelector()
        sel.register(self.b, selectors.EVENT_READ)
        try:
            while (now := time.monotonic()) < until:
                if now >= self.next_send:
                    self.seq += 1
                    self.a.sendall(b"t %d %d\n" % (self.seq, time.monotonic_ns()))
                    self.next_send = now + PERIOD
                if sel.select(max(0.0, min(until, self.next_send) - time.monotonic())):
                    self.read()
        finally:
            sel.close()

    def read(self) -> None:
        try:
            data = self.b.recv(65536)
        except BlockingIOError:
            return
        now = time.monotonic_ns()
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            parts = line.split()
            if len(parts) >= 3 and parts[-3].endswith(b"t") and parts[-1].isdigit():
                self.lat.append((self.phase, (now - int(parts[-1])) / 1e9))


def summary(lat: list[float]) -> dict[str, float]:
    if not lat:
        return {"lines": 0}
    return {
        "lines": len(lat),
        "median_ms": round(statistics.median(lat) * 1e3, 2),
        "max_ms": round(max(lat) * 1e3, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=5000)
    ap.add_argument("--seconds", type=float, default=3.0, help="each steady phase")
    a = ap.parse_args(argv)
    limit = raise_nofile(a.members + 100)
    if limit < a.members + 100:
        a.members = limit - 100
        print(f"only {a.members} members: the fd limit is {limit} (ulimit -Hn)", file=sys.stderr)
    server = peers.SERVERS[0]  # picchat, as a user starts it
    port = peers.free_port()
    cmd = [*server.base_cmd(), "--port", str(port), "--socket", "off", "--rate-limit", "0"]
    cmd += ["--no-log-chat"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    crowd: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        pair = Pair(port)
        pair.tick(time.monotonic() + 0.5)
        pair.phase = "alone"
        pair.tick(time.monotonic() + a.seconds)
        pair.phase = "crowd connecting"
        t0 = time.monotonic()
        for i in range(a.members):
            crowd.append(socket.create_connection(("127.0.0.1", port)))
            if i % 50 == 49:
                pair.tick(time.monotonic() + 0.005)  # paced, and the pair keeps talking
        connect_s = time.monotonic() - t0
        pair.phase = "crowd connected"
        pair.tick(time.monotonic() + a.seconds)
        pair.phase = "crowd closing"
        t0 = time.monotonic()
        for s in crowd:
            s.close()
        crowd.clear()
        close_s = time.monotonic() - t0
        pair.tick(time.monotonic() + a.seconds)
        phases = ["alone", "crowd connecting", "crowd connected", "crowd closing"]
        out = {
            "members": a.members,
            "connect_seconds": round(connect_s, 2),
            "close_seconds": round(close_s, 3),
            **{p: summary([v for ph, v in pair.lat if ph == p]) for p in phases},
        }
        print(json.dumps(out, indent=1))
        return 0
    finally:
        for s in crowd:
            s.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, 9)
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
