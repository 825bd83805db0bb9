"""Load generator for chat servers on loopback (standard library only).

One process, one thread, one ``selectors`` loop: it opens N receivers and S
senders to a chat server, sends messages carrying a unique id, a send
timestamp and a checksum, and counts what every receiver gets.

Wire formats (``--proto``):

- ``plain``: a line per message (picchat's plain format, ``ncat --chat``);
  the server may prefix anything (``name: ``, ``<user3> ``).
- ``irc``: NICK/USER, JOIN #bench, PRIVMSG #bench (miniircd).
- ``mqtt``: MQTT 3.1.1, QoS 0, topic ``bench`` (mosquitto).

The payload is the same for every server: ``~B~SENDER:SEQ:SEND_NS:PAD:CRC``
(CRC32 of what precedes it). A receiver finds ``~B~`` anywhere in a line.

Scenarios (each bounded in messages and seconds):

- ``latency``: 10 receivers, 1 sender, 2,000 messages at 500/s;
- ``fanout``: 100 receivers, 1 sender, flood with at most WINDOW messages in
  flight (sent but not yet received by every reading receiver);
- ``talkers``: 50 clients each sending (paced) and receiving;
- ``stall``: ``fanout`` with one receiver that never reads.

Reports deliveries/s, loss, duplicates, corrupted lines, order violations,
latency p50/p99/max, the generator's CPU and, given ``--pid``, the server's
CPU seconds, peak RSS and context switches from /proc.

    python3 bench/loadgen.py --proto plain --port 1234 --scenario latency [--pid PID]
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import resource
import selectors
import socket
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field

MARK = b"~B~"
PROBE = b"~P~"
PAD = b"x" * 24
CLK_TCK = os.sysconf("SC_CLK_TCK")
ID_SPAN = 100_000  # client indexes per run
STALL_RCVBUF = 4096  # SO_RCVBUF of a receiver that stops reading


@dataclass
class Scenario:
    name: str
    receivers: int
    senders: int
    messages: int  # per sender, at most
    rate: float  # per sender, messages/s; 0: flood (window-bounded)
    seconds: float  # send phase at most
    window: int = 0
    talkers: bool = False  # every client sends and receives
    stall: int = 0  # receivers that never read
    drain: float = 3.0  # seconds to wait for the last deliveries


SCENARIOS = {
    "latency": Scenario("latency", 10, 1, 2000, 500.0, 8.0),
    "fanout": Scenario("fanout", 100, 1, 20000, 0.0, 5.0, window=200),
    "talkers": Scenario("talkers", 50, 50, 100, 20.0, 8.0, talkers=True),
    # 12 s: the stalled receiver's loopback buffers (about 3 MB here) must fill first
    "stall": Scenario("stall", 100, 1, 60000, 0.0, 12.0, window=200, stall=1),
    # longer, so that the backlog outgrows the kernel's buffers (not in the default set)
    "stall-long": Scenario("stall-long", 100, 1, 150000, 0.0, 40.0, window=200, stall=1),
}


def make_payload(sid: int, seq: int) -> bytes:
    """sid: RUN_BASE + client index, so that leftovers of another run are told apart."""
    body = b"%d:%d:%d:%s" % (sid, seq, time.monotonic_ns(), PAD)
    return MARK + body + b":%08x" % zlib.crc32(body)


# --- wire formats ---------------------------------------------------------------


def mqtt_varlen(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


def mqtt_packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + mqtt_varlen(len(body)) + body


class Conn:
    """One client connection; frames out, payloads in."""

    def __init__(self, proto: str, index: int, sock: socket.socket, receiving: bool) -> None:
        self.proto = proto
        self.index = index
        self.sock = sock
        self.receiving = receiving
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closed = False
        self.ready = False
        self.stalled = False
        self.got = 0  # unique messages received
        self.seen: dict[int, bytearray] = {}  # sender -> bitmap by seq
        self.last: dict[int, int] = {}  # sender -> last seq
        self.dups = 0
        self.corrupt = 0
        self.order = 0

    def hello(self) -> bytes:
        n = b"c%d" % self.index
        if self.proto == "irc":
            return b"NICK %s\r\nUSER %s 0 * :%s\r\nJOIN #bench\r\n" % (n, n, n)
        if self.proto == "mqtt":
            out = mqtt_packet(0x10, mqtt_str(b"MQTT") + b"\x04\x02\x00\x00" + mqtt_str(n))
            if self.receiving:
                out += mqtt_packet(0x82, b"\x00\x01" + mqtt_str(b"bench") + b"\x00")
            return out
        return b""

    def frame(self, payload: bytes) -> bytes:
        if self.proto == "irc":
            return b"PRIVMSG #bench :" + payload + b"\r\n"
        if self.proto == "mqtt":
            return mqtt_packet(0x30, mqtt_str(b"bench") + payload)
        return payload + b"\n"

    def payloads(self) -> list[bytes]:
        """Split inbuf into received payloads (lines, or MQTT PUBLISH bodies)."""
        buf = self.inbuf
        out: list[bytes] = []
        if self.proto != "mqtt":
            end = buf.rfind(b"\n")
            if end < 0:
                return out
            lines = bytes(buf[:end]).split(b"\n")
            del buf[: end + 1]
            for line in lines:
                if self.proto == "irc" and line.startswith(b"PING"):
                    self.outbuf += b"PONG" + line[4:].rstrip(b"\r") + b"\r\n"
                out.append(line.rstrip(b"\r"))
            return out
        pos = 0
        n = len(buf)
        while pos + 2 <= n:
            kind = buf[pos]
            length, mult, i = 0, 1, pos + 1
            while i < n:
                b = buf[i]
                length += (b & 0x7F) * mult
                mult <<= 7
                i += 1
                if not b & 0x80:
                    break
            else:
                break
            if i + length > n:
                break
            if kind >> 4 == 3:
                tlen = (buf[i] << 8) | buf[i + 1]
                start = i + 2 + tlen + (2 if kind & 0x06 else 0)
                out.append(bytes(buf[start : i + length]))
            pos = i + length
        del buf[:pos]
        return out


# --- /proc ---------------------------------------------------------------------


def proc_stats(pid: int) -> dict[str, float]:
    """CPU seconds, peak RSS (KiB) and context switches (all threads) of pid."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    hwm = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = float(line.split()[1])
    ctx = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")):
                        ctx += int(line.split()[1])
        except FileNotFoundError:
            pass
    return {"cpu": cpu, "hwm_kib": hwm, "ctx": float(ctx)}


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


# --- the run -------------------------------------------------------------------


@dataclass
class Result:
    sent: int = 0
    expected: int = 0
    delivered: int = 0
    dups: int = 0
    corrupt: int = 0
    order: int = 0
    not_ready: int = 0
    disconnected: int = 0
    stalled_disconnected: int = 0
    stalled_got: int = 0
    foreign: int = 0
    corrupt_sample: str = ""
    seconds: float = 0.0
    lat: list[float] = field(default_factory=list)
    gen_cpu: float = 0.0
    server: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        lat = sorted(self.lat)
        s = self.server
        out = {
            "sent": self.sent,
            "expected": self.expected,
            "delivered": self.delivered,
            "deliveries_per_s": self.delivered / self.seconds if self.seconds else 0.0,
            "loss": self.expected - self.delivered,
            "loss_pct": 100.0 * (self.expected - self.delivered) / self.expected
            if self.expected
            else 0.0,
            "dups": self.dups,
            "corrupt": self.corrupt,
            "order": self.order,
            "not_ready": self.not_ready,
            "disconnected": self.disconnected,
            "stalled_disconnected": self.stalled_disconnected,
            "stalled_got": self.stalled_got,
            "foreign": self.foreign,
            "corrupt_sample": self.corrupt_sample,
            "seconds": self.seconds,
            "lat_p50_ms": percentile(lat, 0.50) * 1e3,
            "lat_p99_ms": percentile(lat, 0.99) * 1e3,
            "lat_max_ms": (lat[-1] if lat else float("nan")) * 1e3,
            "gen_cpu_s": self.gen_cpu,
            "gen_cpu_pct": 100.0 * self.gen_cpu / self.seconds if self.seconds else 0.0,
        }
        if s:
            out["srv_cpu_s"] = s["cpu"]
            out["srv_cpu_pct"] = 100.0 * s["cpu"] / self.seconds if self.seconds else 0.0
            out["srv_peak_rss_mib"] = s["hwm_kib"] / 1024
            out["srv_ctx"] = s["ctx"]
            out["srv_us_per_delivery"] = (
                1e6 * s["cpu"] / self.delivered if self.delivered else float("nan")
            )
        return out


def connect_all(
    proto: str, port: int, count: int, receiving, deadline: float, small=lambda i: False
) -> list[Conn]:
    """Connect one at a time (paced: never a burst beyond a listen backlog).

    small(i): give connection i a 4 KiB receive buffer (a receiver that stops
    reading then fills up in seconds rather than after megabytes of loopback buffers).
    """
    conns = []
    for i in range(count):
        s = socket.socket()
        if small(i):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALL_RCVBUF)
        s.settimeout(max(0.5, deadline - time.monotonic()))
        s.connect(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        c = Conn(proto, i, s, receiving(i))
        c.outbuf += c.hello()
        conns.append(c)
        if i % 10 == 9:
            time.sleep(0.005)
    return conns


def run(proto: str, port: int, sc: Scenario, pid: int | None = None, limit: float = 60.0) -> Result:
    t_end = time.monotonic() + limit
    total = sc.receivers if sc.talkers else sc.receivers + sc.senders
    if sc.talkers:
        conns = connect_all(proto, port, total, lambda i: True, t_end)
        senders = conns
    else:
        conns = connect_all(
            proto,
            port,
            total,
            lambda i: i >= sc.senders,
            t_end,
            lambda i: 0 <= i - sc.senders < sc.stall,
        )
        senders = conns[: sc.senders]
    receivers = [c for c in conns if c.receiving]
    for c in receivers[: sc.stall]:
        c.stalled = True
    sel = selectors.DefaultSelector()
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
    res = Result()
    base = random.randrange(1, 1 << 30) * ID_SPAN
    seqs = [0] * len(senders)
    lat = res.lat
    phase = "probe"
    probers = [senders[0]] + ([conns[1]] if senders[0].receiving else [])
    next_probe = 0.0
    probe_end = time.monotonic() + 10.0
    t0 = send_end = drain_end = 0.0
    cpu0 = 0.0
    srv0: dict[str, float] = {}
    reading = [c for c in receivers if not c.stalled]

    def flush(c: Conn) -> None:
        if c.closed or not c.outbuf:
            return
        try:
            n = c.sock.send(c.outbuf)
        except BlockingIOError:
            n = 0
        except OSError:
            close(c)
            return
        del c.outbuf[:n]

    def close(c: Conn) -> None:
        if not c.closed:
            c.closed = True
            try:
                sel.unregister(c.sock)
            except KeyError:
                pass
            c.sock.close()

    def receive(c: Conn, now: int) -> None:
        for p in c.payloads():
            i = p.find(MARK)
            if i < 0:
                j = p.find(PROBE)
                if j >= 0 and p[j + 3 :] != b"%d" % c.index:
                    c.ready = True
                continue
            parts = p[i + 3 :].split(b":")
            try:
                body = b":".join(parts[:-1])
                if len(parts) != 5 or int(parts[4], 16) != zlib.crc32(body):
                    raise ValueError
                sid, seq, ts = int(parts[0]) - base, int(parts[1]), int(parts[2])
            except ValueError:
                c.corrupt += 1
                if not res.corrupt_sample:
                    res.corrupt_sample = p[:200].decode("utf-8", "replace")
                continue
            if not 0 <= sid < ID_SPAN or seq > sc.messages:
                res.foreign += 1  # not from this run
                continue
            if sc.talkers and sid == c.index:
                continue  # an echo of its own message (MQTT)
            bm = c.seen.get(sid)
            if bm is None:
                bm = c.seen[sid] = bytearray(sc.messages + 1)
            if bm[seq]:
                c.dups += 1
                continue
            bm[seq] = 1
            c.got += 1
            if seq < c.last.get(sid, -1):
                c.order += 1
            c.last[sid] = seq
            if phase in ("send", "drain"):
                lat.append((now - ts) / 1e9)

    while True:
        now = time.monotonic()
        if now > t_end:
            break
        timeout = 0.02
        if phase == "probe":
            if all(c.ready or c.closed for c in receivers):
                phase = "send"
                res.not_ready = sum(1 for c in receivers if not c.ready)
                for c in receivers:
                    if c.stalled and not c.closed:
                        sel.unregister(c.sock)  # from now on it never reads
                cpu0 = self_cpu()
                srv0 = proc_stats(pid) if pid else {}
                t0 = time.monotonic()
                send_end = t0 + sc.seconds
                continue
            if now > probe_end:
                for c in receivers:
                    if not c.ready:
                        close(c)
                continue
            if now >= next_probe:
                for p in probers:
                    p.outbuf += p.frame(PROBE + b"%d" % p.index)
                next_probe = now + 0.2
        elif phase == "send":
            done = True
            for k, s in enumerate(senders):
                if s.closed or seqs[k] >= sc.messages:
                    continue
                done = False
                if sc.rate:
                    due = t0 + seqs[k] / sc.rate
                    while seqs[k] < sc.messages and due <= now and len(s.outbuf) < 65536:
                        s.outbuf += s.frame(make_payload(base + s.index, seqs[k]))
                        seqs[k] += 1
                        due = t0 + seqs[k] / sc.rate
                    timeout = min(timeout, max(0.0, due - now))
                else:
                    live = [c.got for c in reading if not c.closed]
                    low = min(live) if live else seqs[k]
                    room = sc.window - (seqs[k] - low)
                    while room > 0 and seqs[k] < sc.messages and not s.outbuf:
                        s.outbuf += s.frame(make_payload(base + s.index, seqs[k]))
                        seqs[k] += 1
                        room -= 1
                        flush(s)
            if done or now >= send_end:
                phase = "drain"
                res.sent = sum(seqs)
                drain_end = now + sc.drain
        elif phase == "drain":
            if now >= drain_end or all(
                c.closed or c.got >= res.sent - (seqs[c.index] if sc.talkers else 0)
                for c in reading
            ):
                break
        for c in conns:
            if c.outbuf and not c.closed:
                flush(c)
        for key, _ in sel.select(timeout):
            c = key.data
            try:
                data = c.sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno not in (errno.ECONNRESET, errno.EPIPE):
                    raise
                data = b""
            if not data:
                close(c)
                continue
            c.inbuf += data
            receive(c, time.monotonic_ns())

    t1 = time.monotonic()
    res.gen_cpu = self_cpu() - cpu0
    if pid and srv0:
        s1 = proc_stats(pid)
        res.server = {
            "cpu": s1["cpu"] - srv0["cpu"],
            "hwm_kib": s1["hwm_kib"],
            "ctx": s1["ctx"] - srv0["ctx"],
        }
    res.seconds = t1 - t0 if t0 else 0.0
    if phase == "send":
        res.sent = sum(seqs)
    for c in reading:
        others = res.sent - (seqs[c.index] if sc.talkers else 0)
        res.expected += others
        res.delivered += c.got
        res.dups += c.dups
        res.corrupt += c.corrupt
        res.order += c.order
        res.disconnected += c.closed
    # did the server drop the receivers that stopped reading?
    phase = "done"  # their late deliveries are not latencies
    for c in receivers:
        if not c.stalled:
            continue
        if c.closed:
            res.stalled_disconnected += 1
            continue
        c.sock.setblocking(True)
        c.sock.settimeout(0.5)
        try:
            while True:
                data = c.sock.recv(1 << 20)
                if not data:
                    res.stalled_disconnected += 1
                    break
                c.inbuf += data
                receive(c, time.monotonic_ns())
        except TimeoutError:
            pass
        except OSError:
            res.stalled_disconnected += 1
        res.stalled_got += c.got
    for c in conns:
        if not c.closed:
            c.sock.close()
    sel.close()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--proto", choices=["plain", "irc", "mqtt"], default="plain")
    ap.add_argument("--port", type=int, default=1234)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="latency")
    ap.add_argument("--pid", type=int, help="server pid, for /proc figures")
    ap.add_argument("--limit", type=float, default=60.0, help="seconds for the whole run, at most")
    a = ap.parse_args(argv)
    res = run(a.proto, a.port, SCENARIOS[a.scenario], a.pid, a.limit)
    json.dump(res.summary(), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
