"""Durable history against real processes: kill -9, cut files, a full disk,
a newer format, restarts.

The server keeps its history in a state directory (``--state-dir``); what is
checked is what docs/protocol.md promises ("The delivery guarantee"): a
message acknowledged (picchat-send exited 0) is in the history after a crash,
replayed once; a resuming client gets no gap and no duplicate across a
restart; a damaged file is repaired at start and logged; a full disk is said,
not hidden, and the chat goes on.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import socket
import stat
import struct
import subprocess
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .support import (
    DEFAULT_TIMEOUT,
    StructuredClient,
    base_env,
    send_cmd,
    settled_client,
    unavailable,
)

EX_DATAERR = 65
EX_CONFIG = 78
SEG1 = "history-000000000001.log"


# ---- helpers -------------------------------------------------------------------------------


def send(port: int, *args: str, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    """picchat-send over TCP to ``port``; returns the finished process."""
    return subprocess.run(
        [*send_cmd(), "--port", str(port), "--timeout", "5", *args],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def frames_until(client: StructuredClient, done, what: str, timeout: float = DEFAULT_TIMEOUT):
    """Frames read until ``done(frame)`` holds (that frame included)."""
    deadline = time.monotonic() + timeout
    got: list[dict[str, Any]] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {what} within {timeout} s; got {got}")
        frame = client.read_frame(left)
        if frame is None:
            raise AssertionError(f"EOF before {what}; got {got}")
        got.append(frame)
        if done(frame):
            return got


def whole_history(port: int, history_id: str, clients: list) -> list[dict[str, Any]]:
    """Every message the server holds, as a new structured member resuming
    ``history_id`` from seq 0 gets them (checked: no gap)."""
    c = StructuredClient(port, None, resume={"history_id": history_id, "seq": 0})
    clients.append(c)
    assert c.welcome["history_id"] == history_id
    newest = c.welcome["seq"]
    if newest == 0:
        return []
    got = frames_until(c, lambda f: f.get("type") == "msg" and f["seq"] == newest, "the replay")
    assert not [f for f in got if f["type"] == "gap"], got
    return [f for f in got if f["type"] == "msg"]


def parse_records(data: bytes) -> tuple[dict[str, Any], list[tuple[int, int, dict[str, Any]]]]:
    """A segment read by the documented layout: its header's JSON and its
    records as (start, end, payload)."""
    head, meta, _ = data.split(b"\n", 2)
    assert head == b"PICCHAT-HISTORY 1"
    pos = len(head) + len(meta) + 2
    records = []
    while pos < len(data):
        length, crc = struct.unpack_from("<II", data, pos)
        payload = data[pos + 8 : pos + 8 + length]
        assert len(payload) == length and zlib.crc32(payload) == crc, f"bad record at {pos}"
        records.append((pos, pos + 8 + length, json.loads(payload)))
        pos += 8 + length
    return json.loads(meta), records


# ---- kill -9 -------------------------------------------------------------------------------


class Reader:
    """A structured member's view across connections: every msg frame it got
    (live or replayed), the acks of its own messages (id -> seq), gaps."""

    def __init__(self, client: StructuredClient) -> None:
        self.client = client
        self.msgs: list[dict[str, Any]] = []
        self.acks: dict[str, int] = {}
        self.gaps: list[dict[str, Any]] = []

    def take(self, frame: dict[str, Any]) -> None:
        if frame["type"] == "msg":
            self.msgs.append(frame)
        elif frame["type"] == "ack":
            self.acks[frame["id"]] = frame["seq"]
        elif frame["type"] == "gap":
            self.gaps.append(frame)

    def until(self, done, what: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        frames_until(self.client, lambda f: self.take(f) or done(f), what, timeout)

    def to_eof(self) -> None:
        """What the dead server had sent (a bounded read: EOF comes at once)."""
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        while (frame := self.client.read_frame(max(deadline - time.monotonic(), 0.01))) is not None:
            self.take(frame)

    @property
    def last_seq(self) -> int:
        return max((f["seq"] for f in self.msgs), default=0)


def burst(port: int, tag: str, n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` picchat-send processes at once, each posting "burst TAG.I"."""
    return [
        subprocess.Popen(
            [
                *send_cmd(),
                "--port",
                str(port),
                "--timeout",
                "5",
                "--name",
                f"s{i}",
                f"burst {tag}.{i}",
            ],
            env=base_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(n)
    ]


def reap(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    """Their exit codes (each bounded by its --timeout); any still running is
    ended, by its pid."""
    try:
        return [p.wait(timeout=20) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


def test_kill_9_during_a_burst_loses_no_acknowledged_message_and_resume_has_no_gap(
    start_server, short_tmp, clients
):
    state = short_tmp / "state"
    server = start_server("--state-dir", str(state))
    watcher = Reader(StructuredClient(server.port, "watcher"))  # reads everything
    poster = Reader(StructuredClient(server.port, "poster"))  # posts, reads nothing but acks
    clients += [watcher.client, poster.client]
    history_id = watcher.client.welcome["history_id"]
    sessions = {
        "watcher": watcher.client.welcome["session"],
        "poster": poster.client.welcome["session"],
    }
    poster_from = poster.client.welcome["seq"]
    # Stored before the burst, so the server knows both sessions after a crash.
    for r, id_ in ((watcher, "w0"), (poster, "p0")):
        r.client.send({"type": "msg", "id": id_, "text": id_})
        r.until(lambda f, id_=id_: f.get("id") == id_, f"the ack of {id_}")
    own = {"watcher": ["w0"], "poster": ["p0"]}
    confirmed: set[str] = set()

    for round_ in range(2):  # two crashes: the second after a recovery
        senders = burst(server.port, str(round_), 12)
        try:
            # Their own messages, in flight when the server dies or not (the
            # poster's connection is gone after the first crash).
            for r in (watcher, poster) if round_ == 0 else (watcher,):
                name = r.client.welcome["name"]
                id_ = f"{name[0]}{round_ + 1}"
                r.client.send({"type": "msg", "id": id_, "text": id_})
                own[name].append(id_)

            # Kill the server while the burst is under way: once it has delivered 6.
            def enough(f: dict[str, Any], tag=f"burst {round_}.") -> bool:
                return sum(m["text"].startswith(tag) for m in watcher.msgs) >= 6

            watcher.until(enough, "half the burst", timeout=20)
            server.proc.kill()  # SIGKILL, this pid only
            server.wait_exit()
            watcher.to_eof()  # every byte it sent had been fsync'd first
            if round_ == 0:
                poster.to_eof()
        finally:
            codes = reap(senders)
        confirmed |= {f"burst {round_}.{i}" for i, rc in enumerate(codes) if rc == 0}
        seqs = [f["seq"] for f in watcher.msgs]
        assert seqs == sorted(set(seqs)), seqs  # nothing twice, in order

        server = start_server("--state-dir", str(state))
        server.wait_for_log(r"History: \d+ messages kept in")
        seen = watcher.last_seq
        watcher.client.close()
        watcher.client = StructuredClient(
            server.port,
            "watcher",
            session=sessions["watcher"],
            resume={"history_id": history_id, "seq": seen},
        )
        clients.append(watcher.client)
        welcome = watcher.client.welcome
        assert welcome["history_id"] == history_id  # the same history: no gap
        assert welcome["session"] == sessions["watcher"]  # known from the stored records
        assert welcome["seq"] >= seen  # all it saw was on disk
        marker = send(server.port, "--name", "marker", f"marker {round_}")
        assert marker.returncode == 0, marker.stderr
        before = len(watcher.msgs)
        watcher.until(lambda f, t=f"marker {round_}": f.get("text") == t, "the marker")
        replayed = watcher.msgs[before:]
        assert [f["seq"] for f in replayed] == sorted({f["seq"] for f in replayed})
        assert all(f["seq"] > seen for f in replayed), (seen, replayed)
        assert all(f.get("replay") for f in replayed[:-1]), replayed
        assert watcher.gaps == []
        texts = Counter(f["text"] for f in watcher.msgs)
        assert max(texts.values()) == 1, texts  # exactly once across the crash
        for text in confirmed:  # whatever picchat-send confirmed is there
            assert texts[text] == 1, (text, sorted(texts))
    assert confirmed, "no picchat-send was confirmed: the test proved nothing"
    assert not [f for f in watcher.msgs if f["from"] == "watcher"]

    everything = whole_history(server.port, history_id, clients)
    assert [f["seq"] for f in everything] == list(range(1, len(everything) + 1))
    texts = Counter(f["text"] for f in everything)
    assert max(texts.values()) == 1, texts
    for text in [*confirmed, "w0", "p0", "marker 0", "marker 1"]:
        assert texts[text] == 1, (text, sorted(texts))
    stored = {f["text"]: f["seq"] for f in everything}

    # The poster comes back from where its welcome was: everything since,
    # once, in order, but none of its own messages.
    poster.client.close()
    acked_earlier = poster.acks
    poster = Reader(
        StructuredClient(
            server.port,
            "poster",
            session=sessions["poster"],
            resume={"history_id": history_id, "seq": poster_from},
        )
    )
    poster.acks.update(acked_earlier)
    clients.append(poster.client)
    assert poster.client.welcome["session"] == sessions["poster"]
    poster.until(lambda f: f.get("text") == "marker 1", "the replay")
    assert poster.gaps == []
    assert [(f["seq"], f["text"]) for f in poster.msgs] == [
        (f["seq"], f["text"])
        for f in everything
        if f["seq"] > poster_from and f["from"] != "poster"
    ]

    # Their messages resent with their ids (as after a lost ack): each is
    # acknowledged with the seq it has if it was stored, and none is posted twice.
    for r in (watcher, poster):
        name = r.client.welcome["name"]
        acked_before = dict(r.acks)
        r.acks.clear()
        for id_ in own[name]:
            r.client.send({"type": "msg", "id": id_, "text": id_})
        wanted = len(own[name])
        r.until(lambda f, r=r, n=wanted: len(r.acks) == n, f"the acks of {name}")
        for id_ in own[name]:
            if id_ in stored:
                assert r.acks[id_] == stored[id_], (id_, r.acks, stored)
            if id_ in acked_before:
                assert r.acks[id_] == acked_before[id_], (id_, r.acks, acked_before)
    texts = Counter(f["text"] for f in whole_history(server.port, history_id, clients))
    assert max(texts.values()) == 1, texts
    for text in [*own["watcher"], *own["poster"]]:
        assert texts[text] == 1, (text, sorted(texts))


def test_sync_interval_writes_at_once_so_a_kill_9_loses_nothing_acknowledged(
    start_server, short_tmp, clients
):
    state = short_tmp / "state"
    server = start_server("--state-dir", str(state), "--sync", "interval", "--sync-interval", "600")
    c = StructuredClient(server.port, "alice")
    clients.append(c)
    for j in range(3):
        c.send({"type": "msg", "id": str(j), "text": f"m{j}"})
        c.expect(type="ack", id=str(j))
    server.proc.kill()
    server.wait_exit()
    server = start_server("--state-dir", str(state))
    assert [f["text"] for f in whole_history(server.port, c.welcome["history_id"], clients)] == [
        "m0",
        "m1",
        "m2",
    ]


# ---- a cut file ----------------------------------------------------------------------------


def test_a_history_file_cut_at_a_random_byte_is_repaired_at_start(start_server, short_tmp, clients):
    state = short_tmp / "state"
    server = start_server("--state-dir", str(state))
    lines = [f"line {i} " + "x" * i for i in range(1, 7)]
    proc = subprocess.run(
        [*send_cmd(), "--port", str(server.port), "--name", "cron", "-"],
        env=base_env(),
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert proc.returncode == 0, proc.stderr
    server.stop()
    data = (state / SEG1).read_bytes()
    meta, records = parse_records(data)
    assert [r[2]["text"] for r in records] == lines
    history_id = meta["history_id"]
    starts = {r[0] for r in records}
    inside = [off for off in range(records[0][0] + 1, len(data)) if off not in starts]
    for cut in sorted(random.Random(20261125).sample(inside, 3)):
        kept = sum(1 for r in records if r[1] <= cut)
        d = short_tmp / f"cut{cut}"
        d.mkdir(mode=0o700)
        (d / SEG1).write_bytes(data[:cut])
        server = start_server("--state-dir", str(d))
        warning = server.wait_for_log(r"is damaged at byte")
        assert "WARNING" in warning and SEG1 in warning, warning
        assert f"at byte {records[kept][0]} " in warning, (cut, warning)
        assert f": 1 record after it dropped, the {kept} before it kept" in warning, warning
        server.wait_for_log(rf"History: {kept} messages kept in {d}")
        assert [f["text"] for f in whole_history(server.port, history_id, clients)] == lines[:kept]
        c = StructuredClient(server.port, "alice")
        clients.append(c)
        assert (c.welcome["history_id"], c.welcome["seq"]) == (history_id, kept)
        c.send({"type": "msg", "id": "1", "text": "after the repair"})
        assert c.expect(type="ack", id="1")["seq"] == kept + 1
        server.stop()
        repaired = (d / SEG1).read_bytes()
        assert repaired[: records[kept][0]] == data[: records[kept][0]]
        _, now = parse_records(repaired)  # whole records only, nothing after them
        assert [(r[2]["seq"], r[2]["text"]) for r in now] == [
            *((i + 1, t) for i, t in enumerate(lines[:kept])),
            (kept + 1, "after the repair"),
        ]


# ---- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(short_tmp: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs of our own, to fill up; unmounted at teardown (list this
    fixture before start_server, so the server is stopped first)."""
    path = short_tmp / "disk"
    path.mkdir()
    why = "the disk-full test mounts a small tmpfs to fill up, which needs root"
    if os.geteuid() != 0:
        unavailable(f"{why} (run the tests as root, e.g. in a container)")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        unavailable(f"{why} and mount(8) (util-linux)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "picchat-test", str(path)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if mounted.returncode != 0:
        unavailable(f"{why} with CAP_SYS_ADMIN: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        done = subprocess.run(["umount", str(path)], capture_output=True, timeout=10)
        if done.returncode != 0:  # still busy: detach it; it goes when the last fd closes
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def fill(path: Path) -> None:
    """Write ``path`` until the file system has no byte left."""
    with open(path, "wb", buffering=0) as f:
        for size in (65536, 4096, 1):
            block = b"\0" * size
            for _ in range(1 << 20):  # bounded: 256 KiB ends far sooner
                try:
                    f.write(block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    with pytest.raises(OSError), open(path.parent / "probe", "wb", buffering=0) as f:
        f.write(b"x" * 4096)


def test_a_full_disk_is_said_the_chat_goes_on_and_saving_resumes(small_disk, start_server, clients):
    state = small_disk / "state"
    server = start_server("--state-dir", str(state), "--max-line", "16384")
    a = settled_client(server, server.port, "a")
    b = settled_client(server, server.port, "b")
    clients += [a, b]
    first = send(server.port, "--name", "cron", "saved before")
    assert first.returncode == 0, first.stderr
    b.expect(r"^cron: saved before$")

    fill(small_disk / "filler")
    # A record bigger than a page needs space the disk no longer has.
    big = "too big to save " + "x" * 6000
    refused = send(server.port, "--name", "cron", big)
    assert refused.returncode == EX_DATAERR, (refused.returncode, refused.stderr)
    assert "not saved to disk" in refused.stderr and "No space left" in refused.stderr
    assert "Traceback" not in refused.stderr
    server.wait_for_log(r"ERROR.*Cannot save the history in .*No space left on device")
    a.expect(r"^cron: too big to save x+$")  # delivered all the same

    # The daemon keeps serving: two plain clients chat.
    a.send_line("still chatting")
    b.expect(rf"^{a.name}: still chatting$")
    b.send_line("me too")
    a.expect(rf"^{b.name}: me too$")
    structured = StructuredClient(server.port, "carol")
    clients.append(structured)
    structured.send({"type": "msg", "id": "1", "text": "from carol"})
    error = structured.expect(id="1")
    assert (error["type"], error["code"]) == ("error", "not_stored"), error

    (small_disk / "filler").unlink()
    mark = server.mark()
    again = send(server.port, "--name", "cron", "saved after")
    assert again.returncode == 0, again.stderr
    server.wait_for_log(r"WARNING.*Saving the history to disk works again", start=mark)
    history_id = structured.welcome["history_id"]
    server.stop()
    # What the full disk refused waited and was written once it could be.
    server = start_server("--state-dir", str(state), "--max-line", "16384")
    texts = [f["text"] for f in whole_history(server.port, history_id, clients)]
    assert texts == ["saved before", big, "still chatting", "me too", "from carol", "saved after"]


# ---- formats and restarts ------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b'PICCHAT-HISTORY 2\n{"history_id": "abc", "first_seq": 1}\n\x00\x00\x00\x00',
        b"PICCHAT-HISTORY 2\n\x00\x01 a header laid out otherwise",
    ],
)
def test_a_history_in_a_newer_format_is_refused_with_exit_78(start_server, short_tmp, content):
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    (state / SEG1).write_bytes(content)
    server = start_server("--state-dir", str(state), wait=False)
    assert server.wait_exit(10) == EX_CONFIG, server.log
    log = server.log
    assert "history format 2, written by a newer picchat" in log, log
    assert "Upgrade picchat, or move the state directory aside" in log, log
    assert "Server is running" not in log
    assert (state / SEG1).read_bytes() == content  # left as it was


def test_a_restart_keeps_the_history_id_and_the_numbering(start_server, short_tmp, clients):
    state = short_tmp / "state"  # made by the server, given as systemd gives it
    env = base_env(STATE_DIRECTORY=str(state))
    server = start_server(env=env)
    server.wait_for_log(rf"History: a new one, kept in {state}")
    alice = StructuredClient(server.port, "alice")
    clients.append(alice)
    history_id = alice.welcome["history_id"]
    assert alice.welcome["seq"] == 0
    for j in range(1, 4):
        alice.send({"type": "msg", "id": str(j), "text": f"m{j}"})
        assert alice.expect(type="ack", id=str(j))["seq"] == j
    server.stop()
    assert stat.S_IMODE(os.stat(state).st_mode) & 0o077 == 0
    assert stat.S_IMODE(os.stat(state / SEG1).st_mode) == 0o600

    server = start_server(env=env)
    server.wait_for_log(rf"History: 3 messages kept in {state}")
    bob = StructuredClient(server.port, "bob")
    clients.append(bob)
    assert (bob.welcome["history_id"], bob.welcome["seq"]) == (history_id, 3)
    bob.send({"type": "msg", "id": "x", "text": "m4"})
    assert bob.expect(type="ack", id="x")["seq"] == 4
    server.stop()

    # And again, with the directory given as --state-dir.
    server = start_server("--state-dir", str(state))
    texts = [(f["seq"], f["text"]) for f in whole_history(server.port, history_id, clients)]
    assert texts == [(1, "m1"), (2, "m2"), (3, "m3"), (4, "m4")]


def test_without_a_state_dir_a_restart_begins_a_new_history(start_server, clients):
    # The contrast that makes the test above mean something.
    server = start_server()
    server.wait_for_log(r"History is kept in memory only")
    c = StructuredClient(server.port, "alice")
    clients.append(c)
    first = c.welcome["history_id"]
    server.stop()
    server = start_server()
    c = StructuredClient(server.port, "alice")
    clients.append(c)
    assert c.welcome["history_id"] != first


# ---- running out of file descriptors ----------------------------------------------------


def test_running_out_of_file_descriptors_does_not_stop_saving(start_server, short_tmp, clients):
    if shutil.which("prlimit") is None:
        unavailable("prlimit (util-linux) is needed to give the server few file descriptors")
    state = short_tmp / "state"
    server = start_server("--state-dir", str(state), prefix=["prlimit", "--nofile=64:64"])
    alice = StructuredClient(server.port, "alice")
    clients.append(alice)
    mark = server.mark()
    crowd = []
    try:
        for _ in range(100):  # bounded: 64 fds run out well before
            crowd.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        server.wait_for_log(r"out of file descriptors", start=mark)
    finally:
        for s in crowd:
            s.close()
    alice.send({"type": "msg", "id": "1", "text": "after running out"})
    assert alice.expect(timeout=3, type="ack", id="1")["seq"] == 1
    assert "History saved" not in server.log  # the store is still open
    server.stop()
    _, records = parse_records((state / SEG1).read_bytes())
    assert [r[2]["text"] for r in records] == ["after running out"]
