"""Fuzzing the sans-IO objects: arbitrary bytes, arbitrary chunkings, arbitrary slicing.

The protocol (``ServerConnection``, ``ClientConnection``), the line editor and
the whole hub are fed bytes an attacker (or a confused server, or line noise)
could send. None of them may raise anything but the protocol's own error
(``ClientConnection`` only: ``ProtocolError`` and its ``AuthRefused``), and
each keeps the invariants its docstrings promise. Other hypothesis tests (in
test_protocol, test_editor, test_auth, test_hostile_input) cover single
chunkings or a narrower alphabet; these vary the chunking, the per-call line
and byte limits, the moment of the verdict, the terminal's width, and drive
the hub with several peers at once.

The example counts keep the unit suite quick; ``PICCHAT_FUZZ_SCALE=N`` runs
N times as many. The atheris target in tests/fuzz/fuzz_protocol.py runs
similar checks coverage-guided, for as long as one likes; the tests at the end
run it briefly where atheris is installed.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from picchat.auth import Gate
from picchat.editor import Editor, Line, QuitRequest
from picchat.events import (
    Auth,
    Closed,
    Fatal,
    Hello,
    Help,
    Invalid,
    Nick,
    Quit,
    Refuse,
    Say,
    Who,
)
from picchat.hub import Hub, Session
from picchat.protocol import (
    AuthRefused,
    ClientConnection,
    ProtocolError,
    ServerConnection,
    State,
    encode_hello,
)
from picchat.sanitize import TelnetRefusals, clean_bytes

REQUESTS = (Auth, Closed, Fatal, Hello, Help, Invalid, Nick, Quit, Say, Who)
# What sanitising removes: C0 controls but TAB, DEL, C1 controls, lone surrogates.
UNSAFE_TEXT = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")
TOKEN = b"s3cret-token-0123"
# PICCHAT_FUZZ_SCALE=50 pytest tests/unit/test_fuzz.py: fifty times the examples.
SCALE = max(1, int(os.environ.get("PICCHAT_FUZZ_SCALE", "1")))
# JSON nested this deep makes json recurse past any recursion limit (hypothesis
# raises the limit while it runs a test: a thousand levels would not do).
DEEP = 20_000

# Pieces that reach the interesting states, mixed with raw bytes.
MEANINGFUL = [
    b"\n",
    b"\r\n",
    b"\r",
    b"/auth " + TOKEN + b"\n",
    b"/auth wrong-token-000\n",
    b"/auth\n",
    b" /AUTH\t" + TOKEN + b" \r\n",
    b"PICCHAT/1 {}\n",
    b'PICCHAT/1 {"name":"fuzz","client":"x\\u001b[2J"}\n',
    b'PICCHAT/1 {"member":false,"name":"bot"}\n',
    b'PICCHAT/1 {"session":"t1","resume":{"history_id":"h","seq":1}}\n',
    b'PICCHAT/1 {"resume":{"history_id":"h","seq":-1}}\n',
    b"PICCHAT/2 {}\n",
    b"PICCHAT/1 [1]\n",
    b"PICCHAT/",
    b"\x16\x03\x01\x02\x00",
    b'{"type":"msg","text":"hi","id":1}\n',
    b'{"type":"msg","text":"\\ud800\\u001b]0;t\\u0007","id":"a"}\n',
    b'{"type":"msg","text":"again","id":1}\n',
    b'{"type":"nick","name":"zed","id":"n"}\n',
    b'{"type":"who","id":[1]}\n',
    b'{"type":"quit"}\n',
    b"/nick bob\n",
    b"/nick two words\n",
    b"/who\n",
    b"/help\n",
    b"/quit\n",
    b"/bogus\n",
    b"//slash\n",
    b"hello\n",
    b"\xff\xfb\x01\xff\xfa\x18\x01\xff\xf0",
    b"\x1b[31mred\x1b[0m\x9b2J\n",
    b"\xe2\x82",
    b"\xac\n",
    b"x" * 70,
    b"y" * 300 + b"\n",
]
# Nested too deep for json (drawn by index: their repr would be huge).
DEEP_LINES = [
    b"PICCHAT/1 " + b"[" * DEEP + b"\n",
    b"[" * DEEP + b"\n",
    b'{"type":"msg","text":' + b"[" * DEEP + b"\n",
    b'{"a":' * DEEP + b"\n",
]
deep_lines = st.integers(0, len(DEEP_LINES) - 1).map(DEEP_LINES.__getitem__)
pieces = st.one_of(st.binary(max_size=40), st.sampled_from(MEANINGFUL), deep_lines)
streams = st.lists(pieces, max_size=12).map(b"".join)
# For the hub (its max_line is small: the deep lines would only be discarded).
small_streams = st.lists(st.binary(max_size=40) | st.sampled_from(MEANINGFUL), max_size=12).map(
    b"".join
)
limits = st.one_of(st.none(), st.integers(1, 4))
budgets = st.one_of(st.none(), st.integers(1, 120))


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` in chunks cut at the given offsets (no empty chunk: b"" is EOF)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


# ---- ServerConnection ----------------------------------------------------------------


REFUSAL = re.compile(rb"(?:\xff[\xfc\xfe][\x00-\xff])+\Z")  # IAC WONT/DONT option, ...


def check_requests(requests: list, seen: list) -> None:
    for request in requests:
        if isinstance(request, Refuse):  # telnet replies: not a request of the chat's
            assert REFUSAL.match(request.reply), request
            continue
        assert isinstance(request, REQUESTS), request
        assert not (seen and isinstance(seen[-1], Closed)), f"{request!r} after the end"
        if isinstance(request, Say):
            assert request.text and request.text == request.text.strip()
            assert not UNSAFE_TEXT.search(request.text), request
        if isinstance(request, (Nick, Say, Who, Invalid)) and request.id is not None:
            assert len(request.id) <= 64 and request.id.isprintable()
        seen.append(request)


def run_server_connection(
    chunks: list[bytes],
    max_line: int,
    auth: bool,
    slices: list[tuple[int | None, int | None]],
    verdicts: list[bool],
) -> tuple[list, int]:
    """Feed ``chunks`` then EOF, each call with the next (limit, budget) of
    ``slices`` (cycled), draining the backlog; call ``authenticated()`` after a
    call wherever ``verdicts`` says so, and in any case once the connection is
    judging and has nothing else to do. Returns the requests and the lines taken."""
    conn = ServerConnection(max_line, auth=auth)
    seen: list = []
    calls = 0

    def slice_() -> tuple[int | None, int | None]:
        nonlocal calls
        calls += 1
        return slices[calls % len(slices)] if slices else (None, None)

    def after_call() -> None:
        if verdicts and verdicts[calls % len(verdicts)]:
            conn.authenticated()  # a no-op unless judging
        assert conn.authenticating == (conn.state in (State.AWAIT_AUTH, State.JUDGING))
        if not auth:
            assert conn.state not in (State.AWAIT_AUTH, State.JUDGING)
        if conn.state is State.JUDGING:
            assert not conn.backlog  # nothing is parsed until the verdict

    def drain() -> None:
        for _ in range(10_000):
            if not conn.backlog:
                break
            check_requests(conn.next_requests(*slice_()), seen)
            after_call()
        else:
            raise AssertionError("the backlog never drains")
        # Without a backlog, going on gives nothing (the server may rely on it).
        if conn.state is not State.JUDGING:
            assert conn.next_requests() == []

    for chunk in [*chunks, b""]:
        check_requests(conn.receive_data(chunk, *slice_()), seen)
        after_call()
        drain()
        if conn.state is State.JUDGING:
            conn.authenticated()
            drain()
    assert conn.state is State.CLOSED
    assert isinstance(seen[-1], (Closed, Fatal)), seen[-1:]
    # Once closed, nothing more comes out.
    assert conn.receive_data(b"more\n") == [] and conn.next_requests() == []
    assert not conn.backlog
    return seen, conn.lines


@settings(max_examples=150 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(
    data=b"PICCHAT/1 {}\n" + b"[" * DEEP + b"\n" + b"{}",
    cuts=[20, 500],
    max_line=1 << 18,
    auth=False,
    slices=[(1, 7)],
    verdicts=[],
)
@example(
    data=b"/auth x\nPICCHAT/1 " + b"[" * DEEP + b"\n",
    cuts=[3],
    max_line=1 << 18,
    auth=True,
    slices=[],
    verdicts=[False, True],
)
@given(
    data=streams,
    cuts=st.lists(st.integers(0, 10_000), max_size=10),
    max_line=st.sampled_from([1, 2, 16, 64, 4096, 1 << 18]),
    auth=st.booleans(),
    slices=st.lists(st.tuples(limits, budgets), max_size=5),
    verdicts=st.lists(st.booleans(), max_size=5),
)
def test_server_connection_same_requests_however_sliced(
    data, cuts, max_line, auth, slices, verdicts
):
    """Any bytes, in any chunks, handled in slices of any size, judged at any
    moment: never an exception, only request objects, sanitised text, nothing
    after Closed, and the very same requests (and line count) as all at once."""
    whole, whole_lines = run_server_connection([data] if data else [], max_line, auth, [], [])
    requests, lines = run_server_connection(cut(data, cuts), max_line, auth, slices, verdicts)
    assert requests == whole
    if not any(isinstance(r, Fatal) for r in whole):
        # The rate limit counts lines taken: the same count, however they came.
        # (After a fatal line, what came with it in the same chunk may count.)
        assert lines == whole_lines
    one_by_one, _ = run_server_connection(
        [bytes([b]) for b in data[:400]], max_line, auth, slices, verdicts
    )
    prefix, _ = run_server_connection([data[:400]] if data else [], max_line, auth, [], [])
    assert one_by_one == prefix


@settings(max_examples=150 * SCALE, deadline=None)
@given(
    data=st.lists(
        st.sampled_from(
            [b"\xff", b"\xfb", b"\xfc", b"\xfd", b"\xfe", b"\xfa", b"\xf0", b"\x06", b"a"]
        ),
        max_size=60,
    ).map(b"".join),
    cuts=st.lists(st.integers(0, 60), max_size=8),
)
def test_telnet_refusals_are_the_same_however_the_bytes_are_cut(data, cuts):
    whole = TelnetRefusals().feed(data)
    sliced = TelnetRefusals()
    assert b"".join(sliced.feed(chunk) for chunk in cut(data, cuts)) == whole
    assert whole == b"" or REFUSAL.match(whole)


# ---- ClientConnection ------------------------------------------------------------------

SERVER_LINES = [
    b"* Welcome to picchat! You are guest1. Type /help for commands.\n",
    b"! server full\n",
    b"! authentication failed\n",
    b'PICCHAT/1 {"type":"welcome","name":"a","member":true,"history_id":"h","seq":0}\n',
    b'PICCHAT/1 {"type":"error","code":"bad_hello","text":"no"}\n',
    b'PICCHAT/7 {"type":"error","code":"version","text":"no"}\n',
    b'PICCHAT/7 {"type":"welcome"}\n',
    b"PICCHAT/1 \n",
    b"PICCHAT/1 [1,2]\n",
    b"PICCHAT/1 {\n",
    b"PICCHAT/1234567 {}\n",
    b'{"type":"msg","seq":1,"time":1.5,"from":"b","text":"hi"}\n',
    b'{"type":"ack","id":"1","seq":1}\n',
    b"[1]\n",
    b"null\n",
    b"{\xff}\n",
    b"\x00\x00\x00{\n",
    b"1" * 5000 + b"\n",
]
server_streams = st.lists(
    st.one_of(st.binary(max_size=30), st.sampled_from(SERVER_LINES), deep_lines), max_size=10
).map(b"".join)


def run_client(chunks: list[bytes], max_line: int) -> tuple[list, BaseException | None]:
    client = ClientConnection(max_line)
    frames: list = []
    for chunk in chunks:
        try:
            got = client.receive_data(chunk)
        except AuthRefused as exc:  # a ProtocolError too
            return frames, exc
        except ProtocolError as exc:
            return frames, exc
        for frame in got:
            assert isinstance(frame, dict)
        frames += got
        if client.welcome is not None:
            assert client.welcome.get("type") == "welcome"
    return frames, None


@settings(max_examples=150 * SCALE, deadline=None)
@example(data=b"PICCHAT/1 " + b"[" * DEEP + b"\n", cuts=[5], max_line=1 << 20)
@example(data=SERVER_LINES[3] + b'{"a":' * DEEP + b"\n", cuts=[], max_line=1 << 20)
@example(data=SERVER_LINES[0] + SERVER_LINES[2], cuts=[3], max_line=100)
@given(
    data=server_streams,
    cuts=st.lists(st.integers(0, 10_000), max_size=10),
    max_line=st.sampled_from([8, 100, 1 << 20]),
)
def test_client_connection_raises_only_protocol_errors_whatever_the_chunking(data, cuts, max_line):
    """A hostile or broken server makes the client raise ProtocolError (or
    AuthRefused) and nothing else; and it is the same error, after the same
    frames, however the bytes arrive (the frames of a chunk that fails are
    lost with it, so a chunking gives a prefix of what line by line gives)."""
    by_line, error = run_client(data.splitlines(keepends=True), max_line)
    frames, error2 = run_client(cut(data, cuts), max_line)
    assert type(error) is type(error2)
    if error is None:
        assert frames == by_line
    else:
        assert frames == by_line[: len(frames)]


# ---- Editor ----------------------------------------------------------------------------

# What the editor may write besides printable text (its module docstring): CR,
# LF only as part of CRLF, BEL, and the escapes ESC[nA, ESC[J, ESC[H, ESC[2J.
_EDITOR_ESCAPES = re.compile(r"\x1b\[\d*A|\x1b\[J|\x1b\[H|\x1b\[2J")


def check_editor_output(out: bytes, prompt: str) -> None:
    text = out.decode("utf-8")  # always valid UTF-8
    text = _EDITOR_ESCAPES.sub("", text).replace("\r\n", "").replace("\r", "").replace("\a", "")
    # Everything left is printable: echoed keys (never a control from the input) and the prompt.
    assert "\x1b" not in text and "\n" not in text, repr(text)
    assert all(ch.isprintable() or ch in prompt for ch in text), repr(text)


printable_text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=30)
editor_ops = st.one_of(
    st.tuples(st.just("feed"), st.binary(max_size=24)),
    st.tuples(
        st.just("feed"),
        st.lists(
            st.sampled_from(
                [
                    *(b"\x1b[", b"\x1bO", b"\x1b", b"A", b"\r", b"\n", b"\x7f", b"\x08"),
                    *(b"\x03", b"\x04", b"\x15", b"\x17", b"\x0c", b"\t", b"abc ", b"x" * 40),
                    *("日".encode(), "\u0301".encode(), b"\xf0\x9f", b"\x98\x80", b"\xff"),
                ]
            ),
            max_size=8,
        ).map(b"".join),
    ),
    st.tuples(st.just("resize"), st.integers(-3, 200)),
    st.tuples(st.just("show"), printable_text),
    st.tuples(st.just("prompt"), printable_text),
    st.tuples(st.just("start"), st.none()),
    st.tuples(st.just("hide"), st.none()),
)


@settings(max_examples=150 * SCALE, deadline=None)
@given(
    width=st.integers(1, 120),
    max_bytes=st.integers(1, 80),
    ops=st.lists(editor_ops, max_size=40),
)
def test_editor_any_keys_any_width_never_raises_and_writes_nothing_unsafe(width, max_bytes, ops):
    """Whatever is typed (all 256 byte values, escape sequences cut anywhere,
    invalid UTF-8), with resizes to any width (even below 1), messages shown
    and prompts set in between: nothing raises, the output holds nothing but
    printable text and the editor's own few controls, the buffer stays
    printable and within max_bytes, and every Line is printable."""
    ed = Editor("> ", width, max_bytes=max_bytes)
    check_editor_output(ed.start(), ed.prompt)
    for op, arg in ops:
        if op == "feed":
            out, events = ed.feed(arg)
            for event in events:
                assert isinstance(event, (Line, QuitRequest))
                if isinstance(event, Line):
                    assert all(ch.isprintable() for ch in event.text)
                    assert len(event.text.encode()) <= max_bytes
                else:
                    assert event.key in ("ctrl-c", "ctrl-d")
        elif op == "resize":
            out = ed.resize(arg)
            assert ed.width == max(1, arg)
        elif op == "show":
            out = ed.show(arg)
        elif op == "prompt":
            out = ed.set_prompt(arg)
            assert ed.prompt == arg
        elif op == "start":
            out = ed.start()
        else:
            out = ed.hide()
            assert ed.hide() == b""  # hidden already: nothing to erase
        check_editor_output(out, ed.prompt + (arg if op == "show" else ""))
        assert all(ch.isprintable() for ch in ed.buffer)
        assert len(ed.buffer.encode()) <= max_bytes
        assert ed.width >= 1


@settings(max_examples=100 * SCALE, deadline=None)
@given(
    width=st.integers(1, 40),
    data=st.lists(
        st.one_of(st.binary(max_size=10), st.sampled_from([b"\x1b[1;5A", b"\r\n", b"\xe6\x97"])),
        max_size=12,
    ).map(b"".join),
    cuts=st.lists(st.integers(0, 1000), max_size=12),
)
def test_editor_keys_in_any_chunking_give_the_same_screen_bytes_and_lines(width, data, cuts):
    """Keystrokes arrive as the terminal or the serial line splits them:
    any split (inside a UTF-8 character, an escape sequence, a CRLF) gives the
    same output bytes, the same events and the same buffer as one read."""
    one = Editor("p> ", width)
    out_one, events_one = one.feed(data)
    other = Editor("p> ", width)
    out, events = b"", []
    for chunk in cut(data, cuts):
        o, e = other.feed(chunk)
        out += o
        events += e
    assert (out, events, other.buffer) == (out_one, events_one, one.buffer)


# ---- the hub, end to end -----------------------------------------------------------------

MAX_QUEUE = 700
SERIAL_LIMIT = 300
LOCAL = 99  # a serial-like participant with a limited (drop-oldest) queue


class HubMachine(RuleBasedStateMachine):
    """Several peers (plain, structured, needing a token, one local with a
    limited queue) send arbitrary bytes in arbitrary slices while the I/O
    layer's part is played as the server plays it: sends drain queues
    partially, doomed peers are dropped, closing peers closed once flushed,
    held peers woken, presence announced, replays refilled. Throughout: no
    exception, every queue within 2 x max_queue (a local one within its
    limit), and every byte a peer got decodes: UTF-8, no controls, and for
    structured peers, JSON frames a real client parses."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = iter(f"t{i}" for i in range(1, 10_000))
        self.hub = Hub(
            history_id="h",
            history_limit=8,
            max_line=128,
            max_queue=MAX_QUEUE,
            log_chat=False,
            max_sessions=3,
            dedupe_window=4,
            max_total=6 * MAX_QUEUE,
            new_token=lambda: next(self.tokens),
            reserved_names=("Server",),
            gate=Gate([TOKEN], backoff_max=4.0),
        )
        self.now = 1000.0
        self.next_cid = 1
        self.received: dict[int, bytearray] = {}  # what each peer has been sent so far
        self.ended: dict[int, bytes] = {}  # streams of peers that are gone
        self.hub.open_local(LOCAL, "serial0", "serial /dev/ttyS0", limit=SERIAL_LIMIT)
        self.received[LOCAL] = bytearray()

    # -- what peers do

    @rule(auth=st.booleans(), way=st.sampled_from(["tcp", "unix", "tls"]))
    def connect(self, auth, way):
        if len(self.hub.peers) >= 7:
            return
        cid = self.next_cid
        self.next_cid += 1
        self.hub.open(cid, f"10.0.0.{cid % 3}:{4000 + cid}", way, None, auth)
        self.received[cid] = bytearray()
        self.after()

    def _cid(self, data) -> int | None:
        cids = sorted(c for c in self.hub.peers if c != LOCAL)
        return data.draw(st.sampled_from(cids)) if cids else None

    @rule(data=st.data(), chunk=small_streams, limit=limits, budget=budgets)
    def send(self, data, chunk, limit, budget):
        cid = self._cid(data)
        if cid is None or self.hub.wake_at(cid) is not None:
            return  # the server reads nothing from a held connection
        self.hub.receive(cid, chunk, self.now, limit, budget)
        self.after()

    @rule(
        data=st.data(),
        member=st.booleans(),
        session=st.none() | st.sampled_from(["t1", "t2", "t3", "t9"]),
        seq=st.none() | st.integers(0, 30),
        auth=st.booleans(),
    )
    def hello(self, data, member, session, seq, auth):
        """The structured start a real client makes (with its token first, perhaps)."""
        cid = self._cid(data)
        if cid is None or self.hub.wake_at(cid) is not None:
            return
        resume = None if seq is None else {"history_id": "h", "seq": seq}
        extra = {"session": session, "resume": resume} if session else {}
        line = encode_hello(None, member=member, **extra)
        self.hub.receive(cid, (b"/auth " + TOKEN + b"\n" if auth else b"") + line, self.now)
        self.after()

    @rule(
        data=st.data(),
        n=st.integers(1, 60),
        ids=st.booleans(),
        limit=limits,
        budget=budgets,
    )
    def flood(self, data, n, ids, limit, budget):
        """Many lines at once (chat for everyone: queues fill)."""
        cid = self._cid(data)
        if cid is None or self.hub.wake_at(cid) is not None:
            return
        if self.hub.peers[cid].proto.state is State.JSON:
            lines = [
                json.dumps({"type": "msg", "text": f"m{i}", **({"id": i % 5} if ids else {})})
                for i in range(n)
            ]
            chunk = "\n".join(lines).encode() + b"\n"
        else:
            chunk = b"".join(b"line %d\n" % i for i in range(n))
        self.hub.receive(cid, chunk, self.now, limit, budget)
        self.after()

    @rule(data=st.data(), limit=limits, budget=budgets)
    def go_on(self, data, limit, budget):
        cid = self._cid(data)
        if cid is not None and self.hub.backlogged(cid):
            self.hub.continue_input(cid, self.now, limit, budget)
            self.after()

    @rule(data=st.data())
    def hang_up(self, data):
        cid = self._cid(data)
        if cid is not None and self.hub.wake_at(cid) is None:
            self.hub.receive(cid, b"", self.now)
            self.after()

    @rule(data=st.data())
    def lost(self, data):
        cid = self._cid(data)
        if cid is not None:
            self.close(cid, "reset by peer")
            self.after()

    @rule(line=st.binary(max_size=30))
    def fifo(self, line):
        text = clean_bytes(line).strip()  # as the server takes a FIFO line
        if text:
            self.hub.post("fifo", text, self.now)
            self.after()

    @rule(line=st.binary(max_size=40))
    def serial_line(self, line):
        self.hub.receive(LOCAL, line.replace(b"\n", b"") + b"\n", self.now)
        self.after()

    # -- what the server does

    @rule(dt=st.floats(0.0, 5.0))
    def time_passes(self, dt):
        self.now += dt
        for cid in list(self.hub.peers):
            at = self.hub.wake_at(cid)
            if at is not None and at <= self.now:
                self.hub.wake(cid, self.now)
        self.hub.take_presence()
        self.after()

    @rule(data=st.data(), fraction=st.floats(0.0, 1.0))
    def flush(self, data, fraction):
        """One send() to a peer, taking any part of its queue."""
        cid = data.draw(st.sampled_from(sorted(self.hub.peers)))
        out = self.hub.output(cid)
        # The serial bridge takes whole lines; a socket takes what the kernel takes.
        n = len(out) if cid == LOCAL else int(len(out) * fraction)
        self.received[cid] += out[:n]
        del out[:n]
        if not self.hub.check_behind(cid):  # (else dropped: collected in after())
            if not out:
                self.hub.refill(cid)
            if self.hub.should_close(cid):
                self.close(cid, "closing")
        self.after()

    @rule(window=st.integers(1, 6))
    def reload(self, window):
        self.hub.reconfigure(
            max_queue=MAX_QUEUE,
            history_limit=8,
            log_chat=False,
            max_sessions=3,
            dedupe_window=window,
            reserved_names=("Server",),
            max_total=6 * MAX_QUEUE,
        )

    def close(self, cid: int, reason: str) -> None:
        if cid == LOCAL:
            return
        self.hub.gone(cid, reason)
        self.ended[cid] = bytes(self.received.pop(cid))

    def after(self) -> None:
        """The end of a turn, as the server does it: take the output (which
        queues the batched chat), then drop the doomed."""
        dirty = self.hub.take_dirty()
        for cid, reason in self.hub.take_doomed():
            self.close(cid, reason)
        for cid in dirty:
            if cid in self.received and self.hub.should_close(cid):
                self.close(cid, "closing")

    # -- invariants

    @invariant()
    def queues_are_bounded(self):
        for cid, peer in self.hub.peers.items():
            if cid == LOCAL:
                assert len(peer.out) <= SERIAL_LIMIT
            else:
                assert len(peer.out) <= 2 * MAX_QUEUE, (cid, len(peer.out))
            assert not peer.doomed  # collected at the end of every turn

    @invariant()
    def room_is_consistent(self):
        room = self.hub.room
        names = [room.name_of(cid) for cid in room.members()]
        assert len({n.casefold() for n in names}) == len(names)
        for cid in room.members():
            assert cid in self.hub.peers
            assert not self.hub.peers[cid].proto.authenticating
        assert len(self.hub._away) <= 3

    @invariant()
    def everything_sent_decodes(self):
        for cid in list(self.received):
            check_stream(bytes(self.received[cid]) + bytes(self.hub.peers[cid].out))

    def teardown(self):
        for cid in list(self.received):
            check_stream(bytes(self.received[cid]) + bytes(self.hub.output(cid)))
        for stream in self.ended.values():
            check_stream(stream)


def check_stream(stream: bytes) -> None:
    """What one peer received, in complete lines (the last may be cut by a
    partial send, or by the drop of a peer too slow): UTF-8 without controls;
    after a hello reply, JSON frames a real ClientConnection accepts. Telnet
    refusals (IAC WONT/DONT x, for a peer that sent telnet commands) aside:
    0xFF never occurs in UTF-8, so they are told apart exactly."""
    stream = re.sub(rb"\xff[\xfc\xfe][\x00-\xff]", b"", stream)
    complete = stream[: stream.rfind(b"\n") + 1]
    text = complete.decode("utf-8")
    assert not UNSAFE_TEXT.search(text.replace("\n", "")), text
    client = ClientConnection()
    try:
        frames = client.receive_data(complete)
    except AuthRefused:
        return  # "! authentication failed": the plain refusal a client expects
    for frame in frames:
        assert isinstance(frame, dict) and "type" in frame, frame


TestHub = HubMachine.TestCase
TestHub.settings = settings(
    max_examples=40 * SCALE,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# ---- the dedupe ring (Session) against a reference model ------------------------------


class Ring:
    """The reference: the last ``window`` ids remembered, oldest first."""

    def __init__(self) -> None:
        self.entries: OrderedDict[int, int] = OrderedDict()

    def acked(self, key: int) -> int | None:
        return self.entries.get(key)

    def remember(self, key: int, seq: int, window: int) -> None:
        self.entries[key] = seq
        while len(self.entries) > window:
            self.entries.popitem(last=False)


def run_dedupe(messages: list[tuple[int, int | None]]) -> None:
    """Drive a Session as the hub does: an id found is acked again; an id not
    found is posted and remembered. ``window`` None keeps the last window."""
    session, model = Session(None), Ring()
    seq = 0
    window = 4
    for key, new_window in messages:
        if new_window is not None:
            window = new_window
        assert session.acked(key) == model.acked(key), (key, dict(model.entries))
        if model.acked(key) is None:
            seq += 1
            session.remember(key, seq, window)
            model.remember(key, seq, window)
        assert len(session.ids) == len(session.seqs) == len(model.entries)
        assert sorted(zip(session.ids, session.seqs, strict=True)) == sorted(model.entries.items())


# Window 3: ids 1 2 3, then 4 overwrites 1 (the ring has wrapped). Window 5:
# 5 and 6 are appended, 7 and 8 overwrite 2 and 3; 9 must forget 4, the
# oldest left, but overwrites 5.
GROWN_AFTER_WRAP = [(1, 3), (2, None), (3, None), (4, None), (5, 5)] + [
    (k, None) for k in (6, 7, 8, 9)
]


keys = st.integers(0, 12) | st.integers(0, 2**64 - 1)


@settings(max_examples=150 * SCALE, deadline=None)
@given(
    start=st.integers(1, 8),
    messages=st.lists(st.tuples(keys, st.none() | st.integers(1, 8)), max_size=60),
)
def test_session_dedupe_ring_is_the_last_window_ids_when_the_window_only_shrinks(start, messages):
    # Reloads that never grow the window (it shrinks or stays): what works today.
    window, shaped = start, []
    for key, new in messages:
        if new is not None:
            window = min(window, new)
        shaped.append((key, window))
    run_dedupe(shaped)


@settings(max_examples=200 * SCALE, deadline=None)
@example(messages=GROWN_AFTER_WRAP)
@given(messages=st.lists(st.tuples(keys, st.none() | st.integers(1, 8)), max_size=60))
def test_session_dedupe_ring_is_the_last_window_ids_whatever_the_reloads(messages):
    run_dedupe(messages)


def test_a_grown_window_after_the_ring_wrapped_still_forgets_the_oldest_first():
    run_dedupe(GROWN_AFTER_WRAP)


@settings(max_examples=60 * SCALE, deadline=None)
@given(ids=st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f", 7, 8]), max_size=30))
def test_the_hub_acks_a_resent_id_with_its_first_seq_within_the_window(ids):
    """End to end through the hub: a message id within the last dedupe_window
    is acked with its original seq and not posted again; any other is posted."""
    hub = Hub(
        history_id="h",
        history_limit=100,
        max_line=256,
        max_queue=1 << 20,
        log_chat=False,
        dedupe_window=3,
    )
    hub.open(1, "a")
    hub.receive(1, encode_hello("alice"), 0.0)
    hub.output(1).clear()
    model, seq = Ring(), 0
    for id_ in ids:
        hub.receive(1, json.dumps({"type": "msg", "text": "x", "id": id_}).encode() + b"\n", 1.0)
        (ack,) = [json.loads(line) for line in bytes(hub.output(1)).splitlines()]
        hub.output(1).clear()
        key = hub._id_key(str(id_))
        expected = model.acked(key)
        if expected is None:
            seq += 1
            model.remember(key, seq, 3)
            expected = seq
        assert ack == {"type": "ack", "id": str(id_), "seq": expected}
        assert hub.room.seq == seq


# ---- the atheris target ----------------------------------------------------------------

FUZZ_TARGET = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_protocol.py"
ROOT = Path(__file__).resolve().parents[2]
# Runs the target with a bug planted in the protocol: the target must find it.
PLANTED = """
import runpy, sys
from picchat.protocol import ServerConnection
target = sys.argv[1]
sys.argv = sys.argv[1:]
real = ServerConnection.receive_data
def receive_data(self, data, limit=None, budget=None):
    if b"\\x00\\x00" in data:
        raise RuntimeError("planted bug")
    return real(self, data, limit, budget)
ServerConnection.receive_data = receive_data
runpy.run_path(target, run_name="__main__")
"""


def run_target(tmp_path: Path, runs: int, planted: bool = False) -> subprocess.CompletedProcess:
    pytest.importorskip(
        "atheris", reason="atheris is not installed (pip install atheris)", exc_type=ImportError
    )
    args = [str(FUZZ_TARGET), f"-runs={runs}", "-seed=1", f"-artifact_prefix={tmp_path}/"]
    command = [sys.executable, "-c", PLANTED, *args] if planted else [sys.executable, *args]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=tmp_path,
    )


def test_the_atheris_target_runs_clean(tmp_path):
    done = run_target(tmp_path, 3000)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done 3000 runs" in done.stderr, done.stderr[-3000:]
    assert not list(tmp_path.glob("crash-*"))


def test_the_atheris_target_finds_a_planted_bug(tmp_path):
    done = run_target(tmp_path, 100_000, planted=True)
    assert done.returncode != 0, done.stderr[-3000:]
    assert "planted bug" in done.stdout + done.stderr
    assert list(tmp_path.glob("crash-*"))


# ---- what the fuzzing found ------------------------------------------------------------------


def test_an_unterminated_last_line_of_a_structured_peer_is_answered_in_json():
    """Found by TestHub: the requests that come with the end of input (an
    unterminated last line, then Closed) were answered after the state had
    become CLOSED, which made the wire plain: a JSON peer got a plain
    "! ..." line, and a message with an id got no ack at all."""
    hub = Hub(history_id="h", history_limit=10, max_line=128, max_queue=1 << 16, log_chat=False)
    hub.open(1, "a")
    hub.receive(1, encode_hello("alice") + b'{"type":"msg","text":"hi","id":"z"}', 0.0)
    hub.receive(1, b"\x00", 0.0)  # not JSON
    hub.output(1).clear()
    hub.receive(1, b"", 0.0)  # the peer closes its end
    lines = bytes(hub.output(1)).splitlines()
    assert [json.loads(line) for line in lines] == [
        {"type": "error", "code": "bad_frame", "text": "not a JSON object: ignored"}
    ]
    hub.open(2, "b")
    hub.receive(2, encode_hello("bob") + b'{"type":"msg","text":"bye","id":"last"}', 0.0)
    hub.output(2).clear()
    hub.receive(2, b"", 0.0)
    assert json.loads(bytes(hub.output(2))) == {"type": "ack", "id": "last", "seq": 1}
