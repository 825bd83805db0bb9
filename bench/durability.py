"""What durability costs: throughput and fsyncs per second for each sync policy.

Runs the real server (``python -m picchat``) on loopback with a state directory
on a real disk (not tmpfs, where fsync is free), once per policy and run:

- burst: SENDERS structured senders at once, each sending MESSAGES messages
  with up to WINDOW unacknowledged (as picchat-send does), until every one is
  acknowledged: messages/s and fsyncs/s (group commit: many messages per fsync);
- one by one: a single sender waiting for each ack before the next (a
  sensor posting now and then): messages/s, i.e. the latency of one commit.

fsyncs are the server's own count (its "History saved" log line at exit).
Prints a table of medians (and ranges) over RUNS runs.

    python3 bench/durability.py [--runs 3] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENDERS = 10
MESSAGES = 500
WINDOW = 64
ONE_BY_ONE = 200
DEADLINE = 120.0  # seconds for any one scenario


class Server:
    def __init__(self, state: Path, policy: str) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 -- closed in stop()
        args = [sys.executable, "-m", "picchat", "--port", "0", "--socket", "off"]
        args += ["--console", "off", "--state-dir", str(state), "--sync", policy]
        args += ["--rate-limit", "0", "--no-log-chat", "--history", "5000"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(args, stderr=self.log, stdin=subprocess.DEVNULL, env=env)
        self.port = self._wait_port()

    def _text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def _wait_port(self) -> int:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            m = re.search(r"connections on 127\.0\.0\.1:(\d+)", self._text())
            if m:
                return int(m.group(1))
            time.sleep(0.02)
        raise RuntimeError("the server did not start:\n" + self._text())

    def stop(self) -> int:
        """Stop it; returns its fsync count."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        text = self._text()
        self.log.close()
        m = re.search(r"History saved: \d+ messages written, (\d+) fsyncs", text)
        if m is None:
            raise RuntimeError("no fsync count in the log:\n" + text)
        return int(m.group(1))


def sender(port: int, name: str, count: int, window: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f'PICCHAT/1 {{"name":"{name}","member":false}}\n'.encode())
    buf = b""
    acked = sent = 0
    welcomed = False
    while acked < count:
        while welcomed and sent < count and sent - acked < window:
            obj = {"type": "msg", "id": str(sent), "text": f"{name} message {sent}"}
            sock.sendall(json.dumps(obj).encode() + b"\n")
            sent += 1
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("the server closed the connection")
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.startswith(b"PICCHAT/"):
                welcomed = True
            elif b'"type":"ack"' in line:
                acked += 1
            elif b'"type":"error"' in line:
                raise RuntimeError(line.decode())
    sock.close()


def run(policy: str, directory: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=directory, prefix="picchat-bench-") as tmp:
        server = Server(Path(tmp), policy)
        try:
            start = time.monotonic()
            threads = [
                threading.Thread(target=sender, args=(server.port, f"s{i}", MESSAGES, WINDOW))
                for i in range(SENDERS)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(DEADLINE)
                if t.is_alive():
                    raise RuntimeError("a sender did not finish in time")
            burst = time.monotonic() - start
        finally:
            fsyncs_burst = server.stop()
        server = Server(Path(tmp), policy)
        try:
            start = time.monotonic()
            sender(server.port, "one", ONE_BY_ONE, 1)
            single = time.monotonic() - start
        finally:
            fsyncs_single = server.stop()
    total = SENDERS * MESSAGES
    # The counts include the fixed fsyncs of a run: a new segment's header
    # and the last one at exit.
    return {
        "burst: messages/s": total / burst,
        "burst: fsyncs": fsyncs_burst,
        "burst: messages per fsync": total / max(1, fsyncs_burst),
        "one by one: messages/s": ONE_BY_ONE / single,
        "one by one: fsyncs": fsyncs_single,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default="/var/tmp", help="where the state directories go (a disk)")
    args = p.parse_args()
    results: dict[str, list[dict[str, float]]] = {"commit": [], "interval": []}
    for i in range(args.runs):
        for policy in results:
            results[policy].append(run(policy, Path(args.dir)))
            print(f"run {i + 1} {policy}: {results[policy][-1]}", file=sys.stderr)
    keys = list(results["commit"][0])
    print(f"{SENDERS} senders x {MESSAGES} messages (window {WINDOW}), {ONE_BY_ONE} one by one")
    print(f"{'figure (median, range)':32} {'sync=commit':>26} {'sync=interval':>26}")
    for key in keys:
        cells = []
        for policy in results:
            values = [r[key] for r in results[policy]]
            cells.append(f"{statistics.median(values):9.0f} ({min(values):.0f}-{max(values):.0f})")
        print(f"{key:32} {cells[0]:>26} {cells[1]:>26}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
