"""Sessions, resume and paced replay, through the hub's in-memory pair.

The hub side is the real Hub with real ServerConnections; where a whole client
is wanted, the real ClientConnection + ClientSession talk to it (``Client``).
"""

from __future__ import annotations

import itertools

from test_hub import Net

from picchat.client_session import ClientSession, Show
from picchat.hub import Hub
from picchat.protocol import ClientConnection, encode_hello, encode_request


class ResumeNet(Net):
    """``Net`` with the session settings exposed and predictable tokens t1, t2, ..."""

    def __init__(
        self, *, max_line=1024, max_queue=1 << 20, history_limit=100, history_id="h1", **hub
    ) -> None:
        super().__init__(max_line=max_line, max_queue=max_queue, history_limit=history_limit)
        tokens = (f"t{i}" for i in itertools.count(1))
        self.hub = Hub(
            history_id=history_id,
            history_limit=history_limit,
            max_line=max_line,
            max_queue=max_queue,
            log_chat=False,
            new_token=lambda: next(tokens),
            **hub,
        )

    def hello(self, cid: int, name: str | None = "alice", **hello) -> list[dict]:
        """Open ``cid`` and say a structured hello; returns every frame it got
        (the welcome first)."""
        self.open(cid)
        self.send(cid, encode_hello(name, **hello))
        client = ClientConnection()
        frames = client.receive_data(self.read(cid))
        assert frames[0]["type"] == "welcome"
        return frames

    def say(self, cid: int, text: str, id_: str | None = None) -> None:
        obj = {"type": "msg", "text": text}
        if id_ is not None:
            obj["id"] = id_
        self.send(cid, encode_request(obj))

    def history(self, n: int, start: int = 1, sender: str = "fifo") -> None:
        for i in range(start, start + n):
            self.hub.post(sender, f"m{i}", self.now)


def chat(frames: list[dict]) -> list[tuple[int, str, str, bool]]:
    return [(f["seq"], f["from"], f["text"], f.get("replay", False)) for f in frames]


class Client:
    """A whole picchat client (ClientConnection + ClientSession) without sockets."""

    def __init__(self, net: ResumeNet, name: str) -> None:
        self.net = net
        self.session = ClientSession(name)
        self.cid: int | None = None
        self.frames: list[dict] = []
        self.shown: list = []

    def connect(self, cid: int) -> None:
        self.session.disconnected()
        self.cid = cid
        self.conn = ClientConnection()
        self.net.open(cid)
        self.net.send(cid, self.session.hello())
        self.pump()

    def pump(self) -> None:
        """Take everything the hub has for us (refilling a replay as a server would)."""
        while True:
            data = self.net.read(self.cid)
            if not data:
                if self.net.hub.replaying(self.cid):
                    self.net.hub.refill(self.cid)
                    continue
                return
            for frame in self.conn.receive_data(data):
                self.frames.append(frame)
                reply, out = self.session.receive(frame)
                self.shown += out
                if reply:
                    self.net.send(self.cid, reply)

    def type(self, line: str) -> None:
        data, out = self.session.submit(line)
        self.shown += out
        if data and self.cid is not None:
            self.net.send(self.cid, data)

    def drop(self) -> None:
        """The link dies; the server notices."""
        self.net.hub.gone(self.cid, "connection reset")
        self.session.disconnected()

    def chat_shown(self) -> list[str]:
        return [s.text for s in self.shown if isinstance(s, Show) and s.kind == "chat"]


# ---- session tokens ----------------------------------------------------------------------


def test_a_structured_member_gets_a_session_token_in_its_welcome():
    net = ResumeNet()
    assert net.hello(1)[0]["session"] == "t1"
    assert net.hello(2, "bob")[0]["session"] == "t2"
    assert set(net.hub.sessions) == {"t1", "t2"}


def test_senders_and_plain_peers_get_no_session():
    net = ResumeNet()
    assert "session" not in net.hello(1, "cron", member=False)[0]
    assert b"t1" not in net.open(2)
    net.send(2, b"hi\n")
    assert net.hub.sessions == {}


def test_an_unknown_token_gets_a_new_session():
    net = ResumeNet()
    welcome = net.hello(1, session="forged")[0]
    assert welcome["session"] == "t1"
    assert "forged" not in net.hub.sessions


# ---- replay after a reconnect ------------------------------------------------------------


def test_a_reconnect_replays_exactly_what_came_after_seq_in_order_once_without_its_own():
    net = ResumeNet()
    net.plain(2)  # bob
    token = net.hello(1)[0]["session"]
    net.send(2, b"b1\n")  # seq 1, seen live by alice
    assert chat(net.frames(1)) == [(1, "guest1", "b1", False)]
    net.say(1, "a1", "1")  # seq 2: alice's own
    assert net.frames(1) == [{"type": "ack", "id": "1", "seq": 2}]
    net.hub.gone(1, "connection reset")
    net.send(2, b"b2\n")  # seq 3
    net.hub.post("fifo", "f1", net.now)  # seq 4
    net.send(2, b"b3\n")  # seq 5

    frames = net.hello(3, session=token, resume={"history_id": "h1", "seq": 1})
    assert frames[0]["session"] == token
    assert frames[0]["name"] == "alice"
    assert frames[0]["seq"] == 5
    assert chat(frames[1:]) == [
        (3, "guest1", "b2", True),
        (4, "fifo", "f1", True),
        (5, "guest1", "b3", True),
    ]
    assert all(isinstance(f["time"], float) for f in frames[1:])
    assert not net.hub.replaying(3)
    net.send(2, b"b4\n")  # live again, not marked
    assert chat(net.frames(3)) == [(6, "guest1", "b4", False)]


def test_resume_at_the_newest_seq_replays_nothing():
    net = ResumeNet()
    net.history(4)
    frames = net.hello(1, resume={"history_id": "h1", "seq": 4})
    assert [f["type"] for f in frames] == ["welcome"]
    assert not net.hub.replaying(1)


def test_a_wrong_history_id_gets_a_new_history_gap_and_all_retained_history():
    net = ResumeNet(history_limit=3)
    net.history(5)  # history holds 3, 4, 5
    frames = net.hello(1, resume={"history_id": "old", "seq": 40})
    gap = frames[1]
    assert (gap["type"], gap["reason"], gap["missed"]) == ("gap", "new_history", None)
    assert "restarted" in gap["text"]
    assert chat(frames[2:]) == [
        (3, "fifo", "m3", True),
        (4, "fifo", "m4", True),
        (5, "fifo", "m5", True),
    ]


def test_a_wrong_history_id_with_an_empty_history_gets_only_the_gap():
    net = ResumeNet()
    frames = net.hello(1, resume={"history_id": "old", "seq": 3})
    assert [f["type"] for f in frames] == ["welcome", "gap"]
    assert not net.hub.replaying(1)


def test_a_resume_older_than_history_gets_an_overflow_gap_with_the_exact_count():
    net = ResumeNet(history_limit=3)
    net.history(10)  # history holds 8, 9, 10
    frames = net.hello(1, resume={"history_id": "h1", "seq": 2})  # missed 3..7
    gap = frames[1]
    assert gap == {
        "type": "gap",
        "reason": "overflow",
        "missed": 5,
        "text": "You missed 5 messages: the server keeps only the last 3.",
    }
    assert [f["seq"] for f in frames[2:]] == [8, 9, 10]
    assert all(f["replay"] for f in frames[2:])


def test_one_missed_message_and_none_missed_at_the_boundary():
    net = ResumeNet(history_limit=3)
    net.history(10)
    frames = net.hello(1, resume={"history_id": "h1", "seq": 6})  # missed only 7
    assert (frames[1]["missed"], frames[1]["text"]) == (
        1,
        "You missed 1 message: the server keeps only the last 3.",
    )
    frames = net.hello(2, "bob", resume={"history_id": "h1", "seq": 7})  # 8 is the oldest held
    assert [f["type"] for f in frames] == ["welcome", "msg", "msg", "msg"]


# ---- resent messages ----------------------------------------------------------------------


def test_a_resent_message_id_is_acked_with_the_original_seq_and_not_posted_again():
    net = ResumeNet()
    net.plain(2)
    token = net.hello(1)[0]["session"]
    net.history(3)
    net.settle()
    net.say(1, "important", "17")  # seq 4; pretend the ack got lost
    net.read(1)
    assert net.lines(2) == ["alice: important"]
    net.hub.gone(1, "connection reset")

    net.hello(3, session=token, resume={"history_id": "h1", "seq": 3})
    net.say(3, "important", "17")
    assert net.frames(3) == [{"type": "ack", "id": "17", "seq": 4}]
    assert net.read(2) == b""
    assert net.hub.messages == 4
    assert net.hub.room.seq == 4
    # On the same connection too.
    net.say(3, "important", "17")
    assert net.frames(3) == [{"type": "ack", "id": "17", "seq": 4}]
    assert net.read(2) == b""
    # A new id is a new message.
    net.say(3, "more", "18")
    assert net.frames(3) == [{"type": "ack", "id": "18", "seq": 5}]
    assert net.lines(2) == ["alice: more"]


def test_message_ids_are_remembered_per_session():
    net = ResumeNet()
    net.hello(1, "alice")
    net.hello(2, "bob")
    net.say(1, "from alice", "1")
    net.say(2, "from bob", "1")  # same id, other session: a different message
    assert net.frames(2)[-1] == {"type": "ack", "id": "1", "seq": 2}
    assert net.hub.room.seq == 2


def test_dedupe_window_bounds_the_ids_remembered():
    net = ResumeNet(dedupe_window=2)
    net.hello(1)
    for id_ in ("a", "b", "c"):
        net.say(1, f"text {id_}", id_)
    assert [f["seq"] for f in net.frames(1)] == [1, 2, 3]
    assert remembered(net, "t1", "abc") == {"b": 2, "c": 3}
    net.say(1, "text c", "c")  # remembered: acked again, not posted
    net.say(1, "text a", "a")  # forgotten: posted again
    assert net.frames(1) == [
        {"type": "ack", "id": "c", "seq": 3},
        {"type": "ack", "id": "a", "seq": 4},
    ]
    assert net.hub.room.seq == 4
    assert remembered(net, "t1", "abc") == {"c": 3, "a": 4}


def remembered(net, token, ids):
    """The ids among ``ids`` the session remembers, with their seqs."""
    session = net.hub.sessions[token]
    assert len(session.ids) == len(session.seqs) <= net.hub.dedupe_window
    found = {i: session.acked(net.hub._id_key(i)) for i in ids}
    return {i: seq for i, seq in found.items() if seq is not None}


def test_a_smaller_dedupe_window_after_a_reload_keeps_the_newest_ids():
    net = ResumeNet(dedupe_window=4)
    net.hello(1)
    for id_ in "abcdef":  # the ring wraps: e and f overwrite a and b
        net.say(1, f"text {id_}", id_)
    assert remembered(net, "t1", "abcdef") == {"c": 3, "d": 4, "e": 5, "f": 6}
    net.hub.dedupe_window = 2
    net.say(1, "text g", "g")
    assert remembered(net, "t1", "abcdefg") == {"f": 6, "g": 7}


def test_message_ids_are_hashed_with_a_secret_of_the_server():
    one, two = ResumeNet(), ResumeNet()
    assert one.hub._id_key("x") == one.hub._id_key("x")
    assert one.hub._id_key("x") != two.hub._id_key("x")
    assert one.hub._id_key("x") != one.hub._id_key("y")


# ---- a reconnect that overtakes the old connection's death ---------------------------------


def test_a_reconnect_while_the_old_connection_is_open_replaces_it_silently():
    net = ResumeNet()
    net.plain(2)
    token = net.hello(1)[0]["session"]
    net.settle()
    assert net.hub.take_doomed() == []

    frames = net.hello(3, None, session=token, resume={"history_id": "h1", "seq": 0})
    assert frames[0]["name"] == "alice"  # its name comes with the session
    assert frames[0]["session"] == token
    [(cid, reason)] = net.hub.take_doomed()
    assert cid == 1
    assert "replaced" in reason
    assert net.hub.output(1) == b""
    net.hub.gone(1, reason)  # what the I/O layer does with a doomed connection

    assert net.hub.room.name_of(3) == "alice"
    assert 1 not in net.hub.room
    assert net.hub.members == 2
    assert net.hub.sessions[token].cid == 3
    assert net.presence() is False
    assert net.presence() is False
    assert net.read(2) == b""  # no "left", no "joined", no "renamed"
    net.send(2, b"still there?\n")
    assert chat(net.frames(3)) == [(1, "guest1", "still there?", False)]
    net.send(2, b"/who\n")
    assert net.lines(2) == ["* 2 here: guest1, alice"]


def test_after_the_replacement_the_session_lives_on_in_the_new_connection():
    net = ResumeNet()
    net.plain(2)
    token = net.hello(1)[0]["session"]
    net.hello(3, session=token)
    net.hub.gone(1, "replaced")
    net.hub.gone(3, "connection reset")  # now the session is away
    net.history(2)
    frames = net.hello(4, session=token, resume={"history_id": "h1", "seq": 0})
    assert frames[0]["session"] == token
    assert [f["text"] for f in frames[1:]] == ["m1", "m2"]


# ---- paced replay ----------------------------------------------------------------------------


def test_paced_replay_stays_under_max_queue_and_live_messages_follow_in_order():
    max_queue = 8192
    net = ResumeNet(max_queue=max_queue, history_limit=5000)
    net.plain(2)  # bob, who keeps talking
    token = net.hello(1)[0]["session"]
    net.hub.gone(1, "connection reset")
    for i in range(1, 1001):  # 1000 messages of about 100 bytes
        net.send(2, f"m{i:04d} ".encode() + b"x" * 90 + b"\n")
    net.settle()

    net.open(3)
    net.send(3, encode_hello("alice", session=token, resume={"history_id": "h1", "seq": 0}))
    conn = ClientConnection()
    frames: list[dict] = []
    live = 0
    rounds = 0
    while True:
        assert len(net.hub.output(3)) <= max_queue
        data = net.read(3)  # the peer drained its queue
        frames += conn.receive_data(data)
        if rounds % 3 == 0 and net.hub.replaying(3):
            live += 1
            net.send(2, f"live{live}".encode() + b"\n")  # not queued for 3: in history
            assert len(net.hub.output(3)) <= max_queue
        if rounds == 5:
            net.say(3, "alice mid-replay", "a1")  # its own: acked, never replayed to it
        rounds += 1
        if not net.hub.refill(3) and not net.hub.output(3):
            break
    assert rounds > 20  # it really was paced
    assert live > 5
    assert net.hub.take_doomed() == []
    own = next(f for f in frames if f["type"] == "ack")
    assert own == {"type": "ack", "id": "a1", "seq": own["seq"]}

    msgs = [f for f in frames if f["type"] == "msg"]
    expected = [s for s in range(1, net.hub.room.seq + 1) if s != own["seq"]]
    assert [m["seq"] for m in msgs] == expected
    assert all(m["replay"] for m in msgs)
    texts = [m["text"] for m in msgs]
    assert texts[:1000] == [f"m{i:04d} " + "x" * 90 for i in range(1, 1001)]
    assert texts[1000:] == [f"live{i}" for i in range(1, live + 1)]

    # Caught up: live from now on.
    assert not net.hub.replaying(3)
    net.send(2, b"after\n")
    assert chat(conn.receive_data(net.read(3))) == [(net.hub.room.seq, "guest1", "after", False)]


def test_history_moving_on_under_a_replay_is_told_as_a_gap():
    net = ResumeNet(max_queue=4096, history_limit=50)
    net.plain(2)
    net.history(50)
    net.open(1)
    net.send(1, encode_hello("alice", resume={"history_id": "h1", "seq": 0}))
    conn = ClientConnection()
    first = conn.receive_data(net.read(1))
    replayed = [f["seq"] for f in first if f["type"] == "msg"]
    assert replayed == list(range(1, len(replayed) + 1))
    assert 5 < len(replayed) < 50  # paced: only part of it so far
    net.history(100, start=51)  # history now holds 101..150
    frames: list[dict] = []
    while net.hub.refill(1) or net.hub.output(1):
        frames += conn.receive_data(net.read(1))
    gap = frames[0]
    assert (gap["type"], gap["reason"]) == ("gap", "overflow")
    assert gap["missed"] == 101 - (len(replayed) + 1)
    assert [f["seq"] for f in frames[1:]] == list(range(101, 151))


def test_a_replaying_peer_that_stops_reading_is_not_grown_past_max_queue():
    net = ResumeNet(max_queue=4096, history_limit=1000)
    net.history(500)
    net.open(1)
    net.send(1, encode_hello("alice", resume={"history_id": "h1", "seq": 0}))
    for _ in range(10):  # refill without draining: it stays at about half
        net.hub.refill(1)
        assert len(net.hub.output(1)) <= 4096
    assert net.hub.replaying(1)
    net.history(50, start=501)
    assert len(net.hub.output(1)) <= 4096
    assert net.hub.take_doomed() == []


# ---- the sessions bound ------------------------------------------------------------------------


def test_max_sessions_forgets_the_longest_away_sessions():
    net = ResumeNet(max_sessions=2)
    for cid in (1, 2, 3):
        net.hello(cid, f"user{cid}")
    net.hello(4, "stays")  # t4: connected, never forgotten
    # Away in the order 2, 1, 3: t2 has been away longest.
    for cid in (2, 1, 3):
        net.hub.gone(cid, "connection reset")
    assert set(net.hub.sessions) == {"t1", "t3", "t4"}

    assert net.hello(10, "user2", session="t2")[0]["session"] == "t5"  # forgotten: a new one
    assert net.hello(11, "user1", session="t1")[0]["session"] == "t1"
    assert net.hub.sessions["t4"].cid == 4


def test_max_sessions_zero_remembers_no_one_away():
    net = ResumeNet(max_sessions=0)
    net.hello(1)
    net.hub.gone(1, "connection reset")
    assert net.hub.sessions == {}
    assert net.hello(2, session="t1")[0]["session"] == "t2"


def test_a_forgotten_session_can_still_resume_its_messages():
    # The token is forgotten, but the (history_id, seq) resume still works.
    net = ResumeNet(max_sessions=0)
    net.hello(1)
    net.history(3)
    net.hub.gone(1, "connection reset")
    frames = net.hello(2, session="t1", resume={"history_id": "h1", "seq": 1})
    assert [f["seq"] for f in frames[1:]] == [2, 3]


# ---- whole clients -----------------------------------------------------------------------------


def test_whole_clients_across_a_drop_see_every_message_once_and_send_each_once():
    net = ResumeNet()
    alice = Client(net, "alice")
    bob = Client(net, "bob")
    alice.connect(1)
    bob.connect(2)
    net.settle()
    net.history(2)  # two messages before the drop
    alice.pump()
    bob.pump()
    alice.type("before the drop")
    alice.pump()
    alice.drop()
    alice.type("typed while away")  # queued: (pending)
    bob.type("you there?")
    bob.pump()
    net.hub.post("fifo", "cron says hi", net.now)

    alice.connect(3)
    alice.pump()
    bob.pump()
    assert alice.chat_shown() == ["fifo: m1", "fifo: m2", "bob: you there?", "fifo: cron says hi"]
    assert not alice.session.unacked
    assert bob.chat_shown() == [
        "fifo: m1",
        "fifo: m2",
        "alice: before the drop",
        "fifo: cron says hi",
        "alice: typed while away",
    ]
    assert net.hub.room.seq == 6
    assert [s for s in alice.shown if isinstance(s, Show) and s.kind == "status"] == [
        Show("(pending) typed while away", kind="status"),
        Show("sending 1 pending message(s)", kind="status"),
    ]


def test_a_lost_ack_is_resent_after_the_reconnect_and_not_duplicated():
    net = ResumeNet()
    alice = Client(net, "alice")
    bob = Client(net, "bob")
    alice.connect(1)
    bob.connect(2)
    alice.type("once only")
    net.read(1)  # the ack is lost with the connection
    alice.drop()
    assert list(alice.session.unacked.values()) == ["once only"]
    alice.connect(3)  # the welcome makes it resend; the hub acks the original seq
    assert not alice.session.unacked
    bob.pump()
    assert bob.chat_shown() == ["alice: once only"]
    assert net.hub.room.seq == 1
    assert alice.chat_shown() == []


def test_a_client_that_saw_nothing_before_a_drop_is_not_flooded_with_old_history():
    net = ResumeNet()
    net.history(30)
    alice = Client(net, "alice")
    alice.connect(1)
    alice.drop()
    net.history(2, start=31)
    alice.connect(2)
    assert alice.chat_shown() == ["fifo: m31", "fifo: m32"]


def test_a_restarted_server_shows_a_gap_and_its_whole_history():
    net = ResumeNet()
    alice = Client(net, "alice")
    alice.connect(1)
    net.history(3)
    alice.pump()
    alice.drop()
    # The server restarts: a new hub with a new history id and new numbers.
    net2 = ResumeNet(history_id="h2")
    net2.history(2, start=100)
    alice.net = net2
    alice.connect(1)
    notices = [s.text for s in alice.shown if isinstance(s, Show) and s.kind == "notice"]
    assert any("restarted" in n for n in notices)
    assert alice.chat_shown() == ["fifo: m1", "fifo: m2", "fifo: m3", "fifo: m100", "fifo: m101"]
    assert alice.session.history_id == "h2"
    assert alice.session.seq == 2


def test_a_resume_seq_beyond_the_newest_is_treated_as_another_history():
    net = Net()
    net.structured(1, "alice")
    net.send(1, encode_request({"type": "msg", "id": "a", "text": "one"}))
    net.read(1)
    net.open(2)
    net.send(2, encode_hello("bob", resume={"history_id": "h1", "seq": 99}))
    client = ClientConnection()
    frames = client.receive_data(net.read(2))
    assert [f["type"] for f in frames][:2] == ["welcome", "gap"]
    assert frames[1]["reason"] == "new_history"
    assert [f["text"] for f in frames if f["type"] == "msg"] == ["one"]


def test_a_replay_cut_short_by_max_total_queue_ends_without_an_error():
    # Copying history into a resuming peer's queue can pass max-total-queue:
    # the peer is dropped, and the replay ends there.
    hub = Hub(
        history_id="h1",
        history_limit=100,
        max_line=256,
        max_queue=1 << 20,
        log_chat=False,
        max_total=3000,
    )
    hub.open(1, "10.0.0.1:1")
    for i in range(40):
        hub.post("cron", f"message number {i} " + "x" * 20, 1000.0)
    hub.output(1).clear()
    hub.open(2, "10.0.0.2:1")
    hub.output(2).clear()
    hub.receive(2, encode_hello("bob", resume={"history_id": "h1", "seq": 0}), 1000.0)
    assert not hub.replaying(2)
    assert 2 in [cid for cid, _ in hub.take_doomed()]


def test_chat_posted_while_a_replay_catches_up_arrives_once_and_in_order():
    # Live chat waits in the hub's batch until the I/O layer takes output; a
    # replay that catches up meanwhile must not get it from history and live.
    hub = Hub(history_id="h1", history_limit=100, max_line=256, max_queue=600, log_chat=False)
    hub.open(1, "10.0.0.1:1")
    for i in range(20):
        hub.post("cron", f"old {i}", 1000.0)
    hub.open(2, "10.0.0.2:1")
    hub.output(2).clear()
    hub.receive(2, encode_hello("bob", resume={"history_id": "h1", "seq": 0}), 1000.0)
    client = ClientConnection()
    seqs = []
    for turn in range(100):
        hub.receive(1, f"live {turn}\n".encode(), 1001.0 + turn)  # a member chats on
        out = hub.output(2)
        frames = client.receive_data(bytes(out))
        out.clear()
        seqs += [f["seq"] for f in frames if f.get("type") == "msg"]
        hub.refill(2)
        if not hub.replaying(2) and turn > 30:
            break
    hub.take_dirty()
    frames = client.receive_data(bytes(hub.output(2)))
    seqs += [f["seq"] for f in frames if f.get("type") == "msg"]
    assert seqs == list(range(1, hub.room.seq + 1))
