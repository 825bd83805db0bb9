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
- ``fanout-wide``: ``fanout`` with a window wide enough (2,000) that each server
  runs at its own limit rather than at the pace of its round trips;
- ``stall``: ``fanout`` with one receiver that never reads.

Flood scenarios record the latency of every 10th message (a uniform sample),
so that the generator's memory stays bounded.

Reports deliveries/s, loss, duplicates, corrupted lines, order violations,
latency p50/p99/max, the generator's CPU and, given ``--pid``, the server's
CPU seconds, peak RSS and context switches from /proc.

    python3 bench/loadgen.py --proto plain --port 1234 --scenario latency [--pid PID]
"""

from __future__ import annotations

import argparse
import errno
import json
import operator
import os
import random
import re
import resource
import selectors
import socket
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field
from itertools import islice, repeat

MARK = b"~B~"
PROBE = b"~P~"
PAD = b"x" * 24
CLK_TCK = os.sysconf("SC_CLK_TCK")
ID_SPAN = 100_000  # client indexes per run
STALL_RCVBUF = 4096  # SO_RCVBUF of a receiver that stops reading
# Streams laid out at most: a server whose prefix changes from line to line (a
# time stamp) would otherwise get a new one per chunk; its lines take tier 2.
MAX_STREAMS = 200


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
    sample: int = 1  # latency of messages whose seq is a multiple of this (a uniform sample)


SCENARIOS = {
    "latency": Scenario("latency", 10, 1, 2000, 500.0, 8.0),
    "fanout": Scenario("fanout", 100, 1, 150000, 0.0, 5.0, window=200, sample=10),
    # the same with a window wide enough that each server runs at its own limit
    "fanout-wide": Scenario("fanout-wide", 100, 1, 150000, 0.0, 5.0, window=2000, sample=10),
    "talkers": Scenario("talkers", 50, 50, 100, 20.0, 8.0, talkers=True),
    # 12 s: the stalled receiver's loopback buffers (about 3 MB here) must fill first
    "stall": Scenario("stall", 100, 1, 60000, 0.0, 12.0, window=200, stall=1, sample=10),
    # longer, so that the backlog outgrows the kernel's buffers (not in the default set)
    "stall-long": Scenario("stall-long", 100, 1, 150000, 0.0, 40.0, window=200, stall=1, sample=10),
}


def make_payload(sid: int, seq: int, sent_ns: int | None = None) -> bytes:
    """sid: RUN_BASE + client index, so that leftovers of another run are told apart;
    sent_ns: the send time it carries (now if not given)."""
    if sent_ns is None:
        sent_ns = time.monotonic_ns()
    body = b"%d:%d:%d:%s" % (sid, seq, sent_ns, PAD)
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
        self.top: dict[int, int] = {}  # sender -> highest seq
        self.stream: Stream | None = None  # the sender's lines it expects next
        self.sid = -1  # whose
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

    def take(self) -> bytes:
        """What inbuf holds of whole messages, as lines (MQTT bodies are joined by newlines)."""
        buf = self.inbuf
        if self.proto != "mqtt":
            end = buf.rfind(b"\n")
            if end < 0:
                return b""
            if end == len(buf) - 1:
                text = bytes(buf)
                buf.clear()
            else:
                text = bytes(buf[: end + 1])
                del buf[: end + 1]
            return text
        out: list[bytes] = []
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
        return b"\n".join(out) + b"\n" if out else b""


# --- counting what a receiver gets -----------------------------------------------

# A whole payload at the end of a line (after any prefix the server adds).
PAYLOAD_RX = re.compile(rb"~B~((\d+):(\d+):(\d+):" + PAD + rb"):([0-9a-f]{8})\r?$", re.M)


class Stream:
    """One sender's messages as a receiver sees them: prefix + payload + end of line each.

    Built once, as far as receivers need it, and shared by every receiver that
    sees the same prefix (``c0: ``, ``<user1> ``, an IRC source, nothing for MQTT).
    """

    def __init__(self, sent: list[bytes], prefix: bytes, eol: bytes) -> None:
        self.sent = sent  # the sender's payloads by seq (grows as it sends)
        self.prefix = prefix
        self.eol = eol
        self.data = bytearray()
        self.offsets = [0]  # offsets[q]: where line q starts; offsets[q + 1]: where it ends

    def build(self, upto: int) -> int:
        """Lay out lines up to seq upto - 1 (as far as sent); how many lines there are."""
        q = len(self.offsets) - 1
        stop = min(upto, len(self.sent))
        data, offsets = self.data, self.offsets
        while q < stop:
            data += self.prefix
            data += self.sent[q]
            data += self.eol
            offsets.append(len(data))
            q += 1
        return q


class Tally:
    """Checks and counts the payloads of one run, per receiving Conn.

    The generator must cost less per delivery than the servers it measures, so
    it checks a chunk of lines at C speed where it can, in three tiers:

    1. A receiver that follows one sender's ``Stream``: the chunk must be, byte
       for byte, the next lines of that stream (exact: stronger than a checksum).
    2. Otherwise one regex pass and maps: every line well formed, one sender,
       checksums right, sequence numbers rising past what the receiver had; the
       receiver then follows that sender's stream.
    3. Anything else (a probe, a PING, a corrupted or foreign line, several
       senders, a duplicate or a step back) goes line by line through ``lines``,
       which counts exactly.
    """

    def __init__(self, base: int, messages: int, talkers: bool = False, sample: int = 1) -> None:
        self.base = base
        self.messages = messages
        self.talkers = talkers
        self.sample = sample  # latency of every sample-th seq only
        self.timing = False  # record latencies (send and drain phases only)
        self.lat_ns: list[int] = []
        self.foreign = 0
        self.corrupt_sample = ""
        self.sent: dict[int, list[bytes]] = {}  # sender index -> payloads by seq
        self.stamps: dict[int, list[int]] = {}  # sender index -> send times by seq
        self.streams: dict[tuple[int, bytes, bytes], Stream] = {}

    def payload(self, sender: int, seq: int) -> bytes:
        """A new payload of sender's, remembered with its send time."""
        sent_ns = time.monotonic_ns()
        body = make_payload(self.base + sender, seq, sent_ns)
        sent = self.sent.setdefault(sender, [])
        if seq == len(sent):  # the stream covers messages sent in order only
            sent.append(body)
            self.stamps.setdefault(sender, []).append(sent_ns)
        return body

    def follow(self, c: Conn, text: bytes, now_ns: int) -> bool:
        """Tier 1: text is the next lines of the stream c follows; counted if so."""
        st = c.stream
        q = c.top[c.sid] + 1
        n = text.count(b"\n")
        if st is None or st.build(q + n) < q + n:
            return False
        off = st.offsets[q]
        if st.offsets[q + n] - off != len(text) or not st.data.startswith(text, off):
            return False
        c.seen[c.sid][q : q + n] = b"\x01" * n
        c.got += n
        c.top[c.sid] = c.last[c.sid] = q + n - 1
        if self.timing:
            k = self.sample
            sent_ns = self.stamps[c.sid][q + (-q % k) : q + n : k]
            self.lat_ns.extend(map(operator.sub, repeat(now_ns, len(sent_ns)), sent_ns))
        return True

    def receive(self, c: Conn, text: bytes, now_ns: int) -> None:
        if not text or (c.stream is not None and self.follow(c, text, now_ns)):
            return
        found = PAYLOAD_RX.findall(text)
        if (
            not found
            or len(found) != text.count(MARK)
            or PROBE in text
            or (c.proto == "irc" and b"PING" in text)
        ):
            self.lines(c, text, now_ns)
            return
        bodies, sids, seqs_b, stamps, crcs = zip(*found, strict=True)
        n = len(found)
        sid = int(sids[0]) - self.base
        if sids.count(sids[0]) != n or not 0 <= sid < ID_SPAN:
            self.lines(c, text, now_ns)
            return
        seqs = list(map(int, seqs_b))
        if (
            seqs[0] <= c.top.get(sid, -1)
            or seqs[-1] > self.messages
            or not all(map(operator.lt, seqs, islice(seqs, 1, None)))
            or list(map(zlib.crc32, bodies)) != list(map(int, crcs, repeat(16, n)))
        ):
            self.lines(c, text, now_ns)
            return
        if self.talkers and sid == c.index:
            return  # echoes of its own messages (MQTT), whole and in range
        bm = c.seen.get(sid)
        if bm is None:
            bm = c.seen[sid] = bytearray(self.messages + 1)
        for q in seqs:  # where a receiver follows one sender, tier 1 takes the rest
            bm[q] = 1
        c.got += n
        c.top[sid] = c.last[sid] = seqs[-1]
        if self.timing:
            pairs = zip(seqs, stamps, strict=True)
            self.lat_ns += [now_ns - int(t) for q, t in pairs if not q % self.sample]
        if sid in self.sent:  # from now on, compare with what it sent
            eol = b"\r\n" if text.endswith(b"\r\n") else b"\n"
            i = text.find(MARK)
            key = (sid, text[text.rfind(b"\n", 0, i) + 1 : i], eol)
            st = self.streams.get(key)
            if st is None and len(self.streams) < MAX_STREAMS:
                st = self.streams[key] = Stream(self.sent[sid], key[1], eol)
            c.stream, c.sid = st, sid

    def lines(self, c: Conn, text: bytes, now_ns: int) -> None:
        """Line by line: probes, PINGs, and exact counts of whatever is wrong."""
        for line in text.split(b"\n"):
            line = line.rstrip(b"\r")
            if c.proto == "irc" and line.startswith(b"PING"):
                c.outbuf += b"PONG" + line[4:] + b"\r\n"
            i = line.find(MARK)
            if i < 0:
                j = line.find(PROBE)
                if j >= 0 and line[j + 3 :] != b"%d" % c.index:
                    c.ready = True
                continue
            parts = line[i + 3 :].split(b":")
            try:
                body = b":".join(parts[:-1])
                if len(parts) != 5 or int(parts[4], 16) != zlib.crc32(body):
                    raise ValueError
                sid, seq, ts = int(parts[0]) - self.base, int(parts[1]), int(parts[2])
            except ValueError:
                c.corrupt += 1
                if not self.corrupt_sample:
                    self.corrupt_sample = line[:200].decode("utf-8", "replace")
                continue
            if not 0 <= sid < ID_SPAN or seq > self.messages:
                self.foreign += 1  # not from this run
                continue
            if self.talkers and sid == c.index:
                continue  # an echo of its own message (MQTT)
            bm = c.seen.get(sid)
            if bm is None:
                bm = c.seen[sid] = bytearray(self.messages + 1)
            if bm[seq]:
                c.dups += 1
                continue
            bm[seq] = 1
            c.got += 1
            if seq < c.last.get(sid, -1):
                c.order += 1
            c.last[sid] = seq
            if seq > c.top.get(sid, -1):
                c.top[sid] = seq
            if self.timing and not seq % self.sample:
                self.lat_ns.append(now_ns - ts)


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


def percentile(sorted_values: list[float] | list[int], q: float) -> float:
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
    lat_ns: list[int] = field(default_factory=list)
    gen_cpu: float = 0.0
    server: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        lat = sorted(self.lat_ns)
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
            "lat_p50_ms": percentile(lat, 0.50) / 1e6,
            "lat_p99_ms": percentile(lat, 0.99) / 1e6,
            "lat_max_ms": (lat[-1] if lat else float("nan")) / 1e6,
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
    tally = Tally(base, sc.messages, sc.talkers, sc.sample)
    res.lat_ns = tally.lat_ns
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

    while True:
        now = time.monotonic()
        if now > t_end:
            break
        timeout = 0.02
        if phase == "probe":
            if all(c.ready or c.closed for c in receivers):
                phase = "send"
                tally.timing = True
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
                        s.outbuf += s.frame(tally.payload(s.index, seqs[k]))
                        seqs[k] += 1
                        due = t0 + seqs[k] / sc.rate
                    timeout = min(timeout, max(0.0, due - now))
                else:
                    live = [c.got for c in reading if not c.closed]
                    low = min(live) if live else seqs[k]
                    room = sc.window - (seqs[k] - low)
                    while room > 0 and seqs[k] < sc.messages and not s.outbuf:
                        s.outbuf += s.frame(tally.payload(s.index, seqs[k]))
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
            tally.receive(c, c.take(), time.monotonic_ns())

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
    tally.timing = False  # their late deliveries are not latencies
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
                tally.receive(c, c.take(), time.monotonic_ns())
        except TimeoutError:
            pass
        except OSError:
            res.stalled_disconnected += 1
        res.stalled_got += c.got
    for c in conns:
        if not c.closed:
            c.sock.close()
    sel.close()
    res.foreign = tally.foreign
    res.corrupt_sample = tally.corrupt_sample
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
