"""The hub: the room plus every connection's protocol state and output queue.

Still sans I/O. The I/O layer (``server``) tells the hub what happened
(``open``, ``receive``, ``gone``, ``post``) and then moves bytes: it sends from
``output(cid)`` for the connections in ``take_dirty()``, closes those for
which ``should_close(cid)`` holds, and drops those in ``take_doomed()`` at once.

Sessions and resume (structured members): the welcome hands out a session
token. A client that reconnects presents it with the last (history id, seq)
it saw; the hub then closes the old connection if it still holds the session
(its death not yet noticed), hands its place and name to the new one, and
replays the history after that seq. Replay is paced: history is copied into
the output queue only while the queue is under half of ``max_queue``
(``refill``), and live chat for a replaying peer is not queued at all -- it
is in history already, so order is kept and memory stays bounded. Message
ids are remembered per session (the last ``dedupe_window``), so a message
resent after a lost ack is acknowledged again, not posted twice.

Invariants:
- a frame is encoded at most once per wire format per delivery (replays,
  which go to one peer each, excepted);
- a connection's output queue never exceeds ``max_queue`` bytes: a peer that
  stops reading is dropped (and leaves the room) instead of stalling others
  or growing memory without bound;
- a connection is a room member from ``open`` until it leaves, is dropped,
  or turns out to be a non-member sender (picchat-send).
"""

from __future__ import annotations

import os

try:  # the C module hashlib takes blake2b from, without loading OpenSSL's libcrypto
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - a Python built without it
    from hashlib import blake2b
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable

from . import __version__, logs
from .auth import Gate
from .events import (
    Ack,
    Auth,
    Bye,
    Chat,
    Closed,
    Error,
    Fatal,
    Frame,
    Gap,
    Hello,
    Help,
    Invalid,
    Message,
    Nick,
    Notice,
    Quit,
    Refuse,
    Renamed,
    Request,
    Resume,
    Say,
    Welcome,
    Who,
)
from .protocol import AUTH_FIRST, ServerConnection, State, Wire, encode, encode_hello_reply
from .room import Deliver, Room, name_problem

log = logs.get(__name__)

HELP_TEXT = (
    "Commands: /nick NAME (change your name), /who (who is here), /help, "
    "/quit (leave). Any other line goes to everyone; start it with // to send "
    "a line that begins with /."
)


class Session:
    """What outlives one connection of a structured member.

    The ids of its last acknowledged messages are kept compactly, as keyed
    64-bit hashes in a ring of ``dedupe_window`` entries (16 bytes each): the
    worst case, ``sessions`` x ``dedupe_window`` of them, must fit a Pi
    (docs/robustness.md), which a dict of strings would not."""

    __slots__ = ("cid", "ids", "seqs", "next")

    def __init__(self, cid: int | None) -> None:
        self.cid = cid  # the connection holding it, None while away
        self.ids = array("Q")  # hashes of acknowledged message ids
        self.seqs = array("Q")  # their sequence numbers, in step with ids
        self.next = 0  # where the next one goes once the ring is full

    def acked(self, key: int) -> int | None:
        try:
            return self.seqs[self.ids.index(key)]
        except ValueError:
            return None

    def remember(self, key: int, seq: int, window: int) -> None:
        n = len(self.ids)
        if n != window and self.next:
            # The window changed (a reload) after the ring wrapped: put it
            # back in order, oldest first, before growing or shrinking it.
            order = [(self.next + i) % n for i in range(n)]
            self.ids = array("Q", (self.ids[i] for i in order))
            self.seqs = array("Q", (self.seqs[i] for i in order))
            self.next = 0
        if len(self.ids) > window:  # it shrank: keep the newest
            del self.ids[: len(self.ids) - window]
            del self.seqs[: len(self.seqs) - window]
        if len(self.ids) < window:
            self.ids.append(key)
            self.seqs.append(seq)
        else:
            self.ids[self.next] = key
            self.seqs[self.next] = seq
            self.next = (self.next + 1) % window


class Peer:
    """One connection as the hub sees it."""

    __slots__ = (
        "cid",
        "address",
        "proto",
        "out",
        "sender",
        "closing",
        "doomed",
        "logged",
        "session",
        "replay_next",
        "limit",
        "dropped",
        "way",
        "user",
        "wake_at",
        "refused",
        "token",
    )

    def __init__(self, cid: int, address: str, max_line: int) -> None:
        self.cid = cid
        self.address = address
        self.proto = ServerConnection(max_line)
        self.out = bytearray()
        self.sender: str | None = None  # set for non-member senders (their name)
        self.closing = False  # close once the output queue is flushed
        self.doomed = False  # close now, unsent output is dropped
        self.logged = False  # its arrival as a member was logged
        self.session: str | None = None  # its session token (structured members)
        self.replay_next: int | None = None  # next history seq to replay, None: live
        self.limit: int | None = None  # drop the oldest lines beyond this (serial lines)
        self.dropped = 0  # lines dropped that way, not yet reported
        self.way = "tcp"  # how it came in: tcp, unix, console, serial (for the log)
        self.user: str | None = None  # the local user behind a Unix socket (not root)
        self.wake_at: float | None = None  # held (auth back-off) until then: see wake()
        self.refused = False  # its token was wrong: say so and close when it wakes
        self.token = b""  # the token it sent, while it waits to be judged

    @property
    def host(self) -> str:
        """Its address without the port, for the auth back-off (made when
        needed: a string per connection is memory with 10,000 of them)."""
        return self.address.rpartition(":")[0].strip("[]") or self.address


class Hub:
    def __init__(
        self,
        *,
        history_id: str,
        history_limit: int,
        max_line: int,
        max_queue: int,
        log_chat: bool = True,
        max_sessions: int = 10000,
        dedupe_window: int = 128,
        max_total: int = 1 << 62,
        new_token: Callable[[], str] = lambda: os.urandom(16).hex(),
        reserved_names: tuple[str, ...] = (),
        gate: Gate | None = None,
    ) -> None:
        self.gate = gate or Gate(())  # the tokens, where a connection needs one
        self.room = Room(history_id, history_limit, reserved_names)
        self.max_line = max_line
        self.max_queue = max_queue
        self.log_chat = log_chat
        self.max_sessions = max_sessions
        self.dedupe_window = dedupe_window
        self.max_total = max_total  # all output queues together
        self._appended = 0  # an upper bound of their total; see _enforce_total
        self._new_token = new_token
        self.sessions: dict[str, Session] = {}
        self._away: OrderedDict[str, None] = (
            OrderedDict()
        )  # sessions with no connection, oldest first
        self.peers: dict[int, Peer] = {}
        self.messages = 0  # accepted since start
        self._dirty: set[int] = set()
        # Some queue is past half of max_queue: the I/O layer should send at
        # the end of this turn rather than gather more input first.
        self.full = False
        self._batch_bytes = 0  # about what the batch adds to each member's queue
        self._doomed: list[tuple[int, str]] = []
        self._id_secret = os.urandom(16)
        # With durable history (the server's store): messages posted and not
        # yet handed to the store, and acks that wait until they are on disk.
        self.posted: list[Message] | None = None
        self._unconfirmed: list[tuple[int, str, int]] = []  # (cid, message id, seq)
        # Chat posted and not yet queued: what is posted until the I/O layer
        # next asks for output (take_dirty, output) reaches each member as one
        # append (see _flush_batch). Any other output, and any change of who
        # is in the room or replaying, queues it first. Decisions it causes
        # (a reader too far behind) are made then: take_doomed after take_dirty.
        self._batch: list[Deliver] = []

    # ---- what the I/O layer reports ----------------------------------------

    def open(
        self,
        cid: int,
        address: str,
        way: str = "tcp",
        user: str | None = None,
        auth: bool = False,
    ) -> None:
        """A connection was accepted: it joins as a guest and is greeted.
        ``way`` is how it came in (tcp, unix, tls), for the log; ``user`` the
        local user behind a Unix socket connection (its sender names must be
        that user's: USER or USER@something), None if anything goes. With
        ``auth`` it must send a valid ``/auth TOKEN`` first, and is not in the
        room (it gets nothing of the chat) until it has."""
        peer = Peer(cid, address, self.max_line)
        peer.way = way
        peer.user = user
        self.peers[cid] = peer
        if auth:
            peer.proto = ServerConnection(self.max_line, auth=True)
            self._send(peer, Notice(AUTH_FIRST, "auth"))
            log.debug("connection from %s: waiting for its token", address)
            return
        self._admit(peer)

    def _admit(self, peer: Peer) -> None:
        self._flush_batch()  # chat posted before it joined is not for it
        name = self.room.join(peer.cid)
        self._send(peer, self._welcome(name))
        # Logged as a member once it shows it is one (a line, a member hello,
        # or its join announcement): picchat-send's visits are not news.
        log.debug("%s: connection from %s", name, peer.address)

    def open_local(
        self, cid: int, name: str, address: str, announce: bool = True, limit: int | None = None
    ) -> None:
        """A participant of the server's own (the console, a serial line) joins
        under its fixed name, as a plain member. With ``limit``, its output
        queue drops its oldest lines beyond ``limit`` bytes instead of dropping
        the participant: a serial line cannot reconnect and resume."""
        peer = Peer(cid, address, self.max_line)
        peer.way = address.split()[0]  # "console", "serial"
        peer.proto.state = State.PLAIN  # its lines are never a hello
        peer.logged = True
        peer.limit = limit
        self.peers[cid] = peer
        self._flush_batch()  # chat posted before it joined is not for it
        self.room.join(cid, name, announce=announce)
        if announce:
            log.info("%s joined from %s", name, address)

    def reconfigure(
        self,
        *,
        max_queue: int,
        history_limit: int,
        log_chat: bool,
        max_sessions: int,
        dedupe_window: int,
        reserved_names: tuple[str, ...],
        max_total: int = 1 << 62,
    ) -> None:
        """New limits from a reload; connections stay."""
        self.max_queue = max_queue
        self.max_total = max_total
        self.log_chat = log_chat
        self.max_sessions = max_sessions
        self.dedupe_window = dedupe_window
        self.room.set_history_limit(history_limit)
        self.room.reserved = {n.casefold() for n in reserved_names}

    # ---- durable history -----------------------------------------------------

    def keep_durably(self, messages: list[Message]) -> None:
        """History comes from disk and goes to disk: take what was loaded (its
        senders' sessions too, so a client resuming after a restart is
        recognised and its resent messages are not posted twice), and from
        now on acknowledge a message only once ``confirm`` says it is stored."""
        self.posted = []
        self.room.restore(messages[-self.room.history.maxlen :] if messages else [])
        for msg in messages:  # oldest first: the newest sessions stay longest
            if not msg.origin:
                continue
            session = self.sessions.get(msg.origin)
            if session is None:
                session = self.sessions[msg.origin] = Session(None)
            self._away[msg.origin] = None
            self._away.move_to_end(msg.origin)
            if msg.id:
                session.remember(self._id_key(msg.id), msg.seq, self.dedupe_window)
        while len(self._away) > self.max_sessions:
            token, _ = self._away.popitem(last=False)
            del self.sessions[token]

    def take_posted(self) -> list[Message]:
        if self.posted is None:
            return []
        posted, self.posted = self.posted, []
        return posted

    def confirm(self, stored: bool, problem: str = "") -> None:
        """The messages handed over by take_posted are on disk (or not: then
        their senders are told, and the messages live on in memory only)."""
        waiting, self._unconfirmed = self._unconfirmed, []
        for cid, id_, seq in waiting:
            peer = self.peers.get(cid)
            if peer is None or peer.doomed:
                continue
            if stored:
                self._send(peer, Ack(id_, seq))
            else:
                text = (
                    f"delivered, but not saved to disk yet ({problem}): lost if the server "
                    "stops before it can be saved"
                )
                self._send(peer, Error("not_stored", text, id_))

    def take_dropped(self, cid: int) -> int:
        """Lines dropped from a limited queue since the last call."""
        peer = self.peers.get(cid)
        if peer is None:
            return 0
        dropped, peer.dropped = peer.dropped, 0
        return dropped

    def receive(
        self, cid: int, data: bytes, now: float, limit: int | None = None, budget: int | None = None
    ) -> None:
        """Bytes arrived from a connection (``b""``: it closed its end).

        With ``limit`` lines or ``budget`` bytes, only that much is handled;
        ``backlogged(cid)`` then says more waits for ``continue_input``.
        """
        peer = self.peers.get(cid)
        # A closing peer (it quit, or was refused) is no longer in the room:
        # what it sends while its last output drains is ignored.
        if peer is None or peer.doomed or peer.closing:
            return
        self._requests(peer, peer.proto.receive_data(data, limit, budget), now)

    def continue_input(
        self, cid: int, now: float, limit: int | None = None, budget: int | None = None
    ) -> None:
        peer = self.peers.get(cid)
        if peer is None or peer.doomed or peer.closing:
            return
        self._requests(peer, peer.proto.next_requests(limit, budget), now)

    def backlogged(self, cid: int) -> bool:
        peer = self.peers.get(cid)
        return (
            peer is not None
            and not peer.doomed
            and not peer.closing
            and peer.wake_at is None
            and peer.proto.backlog
        )

    def lines_read(self, cid: int) -> int:
        """Lines taken from the connection's input so far (for the rate limit)."""
        peer = self.peers.get(cid)
        return 0 if peer is None else peer.proto.lines

    def first_line_pending(self, cid: int) -> bool:
        """Has begun its first line and not ended it (a slowloris, or slow typing)."""
        peer = self.peers.get(cid)
        return peer is not None and peer.proto.first_line_pending

    def authenticating(self, cid: int) -> bool:
        """Still has to send a valid token (or is waiting for its verdict)."""
        peer = self.peers.get(cid)
        return peer is not None and peer.proto.authenticating

    def wake_at(self, cid: int) -> float | None:
        """When a held connection (its token waits for the back-off) is to be
        woken with ``wake``; None if it is not held. Read nothing from it meanwhile."""
        peer = self.peers.get(cid)
        return None if peer is None or peer.doomed else peer.wake_at

    def wake(self, cid: int, now: float) -> None:
        peer = self.peers.get(cid)
        if peer is None or peer.doomed or peer.wake_at is None or now < peer.wake_at:
            return
        peer.wake_at = None
        if peer.refused:
            # Said only now, after the back-off, and without any hint.
            self._send(peer, Error("auth_failed", "authentication failed"))
            self._close_after_flush(peer)
        elif (wait := self.gate.wait(peer.host, now)) > 0:
            # Another attempt from its address failed meanwhile: one guess per back-off.
            peer.wake_at = now + wait
        else:
            self._judge(peer, now)

    def set_tokens(self, tokens: list[bytes]) -> None:
        """New tokens (a reload); authenticated connections stay."""
        self.gate.tokens = tokens

    def _requests(self, peer: Peer, requests: list[Request], now: float) -> None:
        for request in requests:
            self._handle(peer, request, now)
            if peer.closing or peer.doomed or peer.wake_at is not None:
                break

    def post(self, sender: str, text: str, now: float) -> None:
        """A message from a non-member source (the FIFO)."""
        self._post(sender, text, now, exclude=None, way="fifo")

    def gone(self, cid: int, reason: str) -> None:
        """The I/O layer closed or lost the connection."""
        self._flush_batch()  # while it is still a member to skip or serve
        peer = self.peers.pop(cid, None)
        if peer is None:
            return
        self._dirty.discard(cid)
        self._detach(peer)
        if cid in self.room:
            self._leave(peer, reason)
        else:
            log.debug("%s (%s) closed: %s", peer.sender or "connection", peer.address, reason)

    def take_presence(self) -> bool:
        """Announce pending joins and leaves; True if there were any."""
        waiting = self.room.pending_joins()
        out = self.room.take_presence(hold=self._undecided)
        still = set(self.room.pending_joins())
        for cid in waiting:
            if cid not in still:
                self._log_member(self.peers[cid])
        self._deliver_all(out)
        return bool(out)

    def _undecided(self, cid: int) -> bool:
        """Has not sent its first line yet (it may still turn out to be a sender)."""
        return self.peers[cid].proto.state is State.AWAIT_FIRST

    def shutdown(self, text: str) -> None:
        """Tell everyone the server is going down; close after flushing."""
        frame = Bye(text)
        for peer in self.peers.values():
            if not peer.doomed:
                self._send(peer, frame)
                self._close_after_flush(peer)

    # ---- what the I/O layer asks ---------------------------------------------

    def output(self, cid: int) -> bytearray:
        """The connection's output queue: send from its front, then delete what went."""
        if self._batch:
            self._flush_batch()
        return self.peers[cid].out

    def check_behind(self, cid: int) -> bool:
        """After a send: is more than max_queue still waiting? Then the peer has
        stopped reading; it is dropped (True). Within one turn a queue may
        grow to twice max_queue before it gets its send (see _queue)."""
        peer = self.peers.get(cid)
        if peer is None or peer.doomed or len(peer.out) <= self.max_queue:
            return False
        self._too_slow(peer)
        return True

    def should_close(self, cid: int) -> bool:
        peer = self.peers.get(cid)
        return peer is not None and peer.closing and not peer.out

    def take_dirty(self) -> set[int]:
        self._flush_batch()  # the chat of every recv() since the last time
        dirty, self._dirty = self._dirty, set()
        self.full = False
        return dirty

    def take_doomed(self) -> list[tuple[int, str]]:
        doomed, self._doomed = self._doomed, []
        return doomed

    @property
    def presence_pending(self) -> bool:
        return self.room.presence_pending

    @property
    def members(self) -> int:
        return len(self.room)

    # ---- requests ------------------------------------------------------------

    def _handle(self, peer: Peer, request: Request, now: float) -> None:
        cid = peer.cid
        if not peer.logged and not isinstance(request, (Hello, Fatal, Closed, Refuse)):
            self._log_member(peer)
        if self._batch and not isinstance(request, Say):
            self._flush_batch()  # whatever it does comes after the chat before it
        match request:
            case Auth(token=token):
                wait = self.gate.wait(peer.host, now)
                if wait > 0:  # this address failed lately: judged after its back-off
                    peer.wake_at = now + wait
                    peer.token = token
                else:
                    self._judge(peer, now, token)
            case Say(text=text, id=id_):
                session = self.sessions.get(peer.session) if peer.session else None
                key = self._id_key(id_) if session is not None and id_ is not None else None
                seq = session.acked(key) if session is not None and key is not None else None
                if seq is not None:
                    # Sent again after a lost ack: it is in already.
                    self._send(peer, Ack(id_, seq))
                    return
                if peer.sender is not None:
                    msg = self._post(peer.sender, text, now, None, way=peer.way, id_=id_ or "")
                else:
                    name = self.room.name_of(cid)
                    origin = peer.session or ""
                    msg = self._post(name, text, now, cid, origin, peer.way, id_ or "")
                if id_ is not None and peer.proto.wire is Wire.JSON:
                    if self.posted is None:
                        self._send(peer, Ack(id_, msg.seq))  # after the chat before it
                    else:  # acknowledged once it is on disk (confirm)
                        self._unconfirmed.append((cid, id_, msg.seq))
                    if session is not None and key is not None:
                        session.remember(key, msg.seq, self.dedupe_window)
            case Hello():
                self._hello(peer, request)
            case Nick(name=name, id=id_):
                if peer.sender is not None:
                    self._send(peer, Error("not_member", "senders have no room name", id_))
                else:
                    old = self.room.name_of(cid)
                    self._deliver_all(self.room.rename(cid, name, id_))
                    if self.room.name_of(cid) != old:
                        log.info("%s (%s) is now known as %s", old, peer.address, name)
            case Who(id=id_):
                self._send(peer, self.room.names(id_))
            case Help():
                self._send(peer, Notice(HELP_TEXT, "help"))
            case Quit():
                self._send(peer, Bye("Goodbye."))
                self._leave(peer, "quit")
                self._close_after_flush(peer)
            case Invalid(code=code, text=text, id=id_):
                self._send(peer, Error(code, text, id_))
            case Fatal(code=code, text=text):
                log.info("Refused %s: %s", peer.address, text)
                self._queue(peer, encode_hello_reply(Error(code, text)))
                self._leave(peer)
                self._close_after_flush(peer)
            case Closed():
                self._leave(peer, "closed the connection")
                self._close_after_flush(peer)
            case Refuse(reply=reply):
                self._queue(peer, reply)

    def _id_key(self, id_: str) -> int:
        """A message id as a 64-bit hash, keyed with a secret of this server so
        that no client can make two of its ids collide on purpose."""
        digest = blake2b(id_.encode(), digest_size=8, key=self._id_secret).digest()
        return int.from_bytes(digest, "little")

    def _judge(self, peer: Peer, now: float, token: bytes | None = None) -> None:
        if token is None:
            token, peer.token = peer.token, b""
        if self.gate.check(token):
            self.gate.succeeded(peer.host)
            peer.proto.authenticated()
            log.info("%s authenticated", peer.address)
            self._admit(peer)
            return
        delay = self.gate.failed(peer.host, now)
        # The peer's doing, but an operator may want to see it: notice.
        log.notice(
            "Failed authentication from %s (answered after %.0f s)",
            peer.address,
            delay,
        )
        peer.refused = True
        peer.wake_at = now + delay

    def _hello(self, peer: Peer, hello: Hello) -> None:
        cid = peer.cid
        if not hello.member:
            name = hello.name or peer.user or "anonymous"
            problem = name_problem(name)
            if problem is None and peer.user is not None:
                if name != peer.user and not name.startswith(peer.user + "@"):
                    problem = (
                        f"on the local socket, user {peer.user} posts as {peer.user} or "
                        f"{peer.user}@something, not as {name}"
                    )
            if problem is not None:
                self._queue(peer, encode_hello_reply(Error("bad_name", problem)))
                self._leave(peer)
                self._close_after_flush(peer)
                return
            # Its join was never announced (presence is coalesced), so this
            # leave is silent too: senders are not members.
            self.room.leave(cid)
            peer.sender = name
            self._send(peer, self._welcome(name, member=False))
            log.info("%s posts from %s (%s)", name, peer.address, hello.client or "a sender")
            return
        resumed = self._attach(peer, hello.session)
        replies: list[Deliver] = []
        if hello.name is not None and hello.name != self.room.name_of(cid):
            # The welcome carries the new name: only errors need telling.
            replies = [
                d
                for d in self.room.rename(cid, hello.name)
                if not (isinstance(d.frame, Renamed) and d.to == (cid,))
            ]
        self._send(peer, self._welcome(self.room.name_of(cid), session=peer.session))
        self._deliver_all(replies)
        if hello.resume is not None:
            self._start_replay(peer, hello.resume)
        if resumed:
            peer.logged = True
            log.info("%s resumed its session from %s", self.room.name_of(cid), peer.address)
        else:
            self._log_member(peer)

    # ---- sessions and replay ---------------------------------------------------

    def _attach(self, peer: Peer, token: str | None) -> bool:
        """Give ``peer`` its session: the one named by ``token`` if known (True),
        else a new one. A connection still holding that session is replaced."""
        session = self.sessions.get(token) if token else None
        if session is None or token is None:
            token = self._new_token()
            self.sessions[token] = Session(peer.cid)
            peer.session = token
            return False
        self._away.pop(token, None)
        old = self.peers.get(session.cid) if session.cid is not None else None
        if old is not None and old is not peer:
            # The client came back before TCP noticed its old connection die:
            # close that one and give its place in the room to the new one.
            if old.cid in self.room:
                self.room.transfer(old.cid, peer.cid)
            old.session = None
            self._doom(old, "replaced by a reconnection of the same session")
        session.cid = peer.cid
        peer.session = token
        return True

    def _detach(self, peer: Peer) -> None:
        if peer.session is not None:
            session = self.sessions.get(peer.session)
            if session is not None and session.cid == peer.cid:
                session.cid = None
                # Remember it for a while, so the client can resume; forget
                # the longest-away sessions beyond max_sessions.
                self._away[peer.session] = None
                while len(self._away) > self.max_sessions:
                    token, _ = self._away.popitem(last=False)
                    del self.sessions[token]
            peer.session = None

    def _start_replay(self, peer: Peer, resume: Resume) -> None:
        room = self.room
        # A seq beyond the newest cannot come from this history (a client
        # confused, or from another server): treat it as another history.
        if resume.history_id != room.history_id or resume.seq > room.seq:
            self._send(
                peer,
                Gap(
                    "new_history",
                    None,
                    "The server's message history has restarted (was the server restarted?): "
                    "there may be a gap. Replaying everything it still has, if anything.",
                ),
            )
            peer.replay_next = room.oldest_seq
        else:
            peer.replay_next = max(resume.seq + 1, 1)
            if peer.replay_next < room.oldest_seq:
                self._send(peer, self._overflow_gap(room.oldest_seq - peer.replay_next))
                peer.replay_next = room.oldest_seq
        self.refill(peer.cid)

    def _overflow_gap(self, missed: int) -> Gap:
        return Gap(
            "overflow",
            missed,
            f"You missed {missed} message{'s' if missed != 1 else ''}: the server keeps only "
            f"the last {self.room.history.maxlen}.",
        )

    def refill(self, cid: int) -> bool:
        """Copy more history into a replaying peer's queue, up to half of
        max_queue. Returns True while the replay goes on."""
        peer = self.peers.get(cid)
        if peer is None or peer.replay_next is None or peer.doomed:
            return False
        # Chat still in the batch is in the history already: queue it (to
        # the others) before this replay can catch up and go live.
        self._flush_batch()
        room = self.room
        if peer.replay_next < room.oldest_seq:  # history moved on under the replay
            self._send(peer, self._overflow_gap(room.oldest_seq - peer.replay_next))
            peer.replay_next = room.oldest_seq
        limit = self.max_queue // 2
        while len(peer.out) < limit:
            msg = room.message(peer.replay_next)
            if msg is None:  # caught up with the present: live from now on
                peer.replay_next = None
                return False
            peer.replay_next += 1
            if msg.origin and msg.origin == peer.session:
                continue  # its own message: it has it
            if not self._queue(peer, encode(Chat(msg, replay=True), peer.proto.wire)):
                return False  # dropped (max-total-queue): no replay any more
        return True

    def replaying(self, cid: int) -> bool:
        peer = self.peers.get(cid)
        return peer is not None and peer.replay_next is not None

    def _welcome(self, name: str, member: bool = True, session: str | None = None) -> Welcome:
        return Welcome(
            name=name,
            history_id=self.room.history_id,
            seq=self.room.seq,
            max_line=self.max_line,
            server=f"picchat/{__version__}",
            member=member,
            session=session,
        )

    def _too_slow(self, peer: Peer, leave: bool = True, reason: str = "") -> None:
        # A reader this far behind has stopped reading: waiting for it would
        # stall everyone or grow without bound. It can reconnect (and resume).
        name = self.room.name_of(peer.cid) if peer.cid in self.room else peer.address
        reason = "too slow: " + (
            reason or f"it stopped reading with over {self.max_queue} bytes (max-queue) waiting"
        )
        # The client's trouble, not the server's: notice, not warning.
        log.notice("Disconnecting %s (%s): %s", name, peer.address, reason)
        self._doom(peer, reason)
        if leave:
            self._leave(peer, "too slow")

    @staticmethod
    def _drop_oldest(peer: Peer, excess: int) -> None:
        """Make room in a limited queue by dropping whole lines from its front;
        the newest line stays, whole, even if it alone is over the limit."""
        out = peer.out
        newest = out.rfind(b"\n", 0, len(out) - 1) + 1  # where the last line begins
        cut = out.find(b"\n", excess - 1) + 1
        cut = newest if cut == 0 or cut > newest else cut
        peer.dropped += out.count(b"\n", 0, cut)
        del out[:cut]

    def _doom(self, peer: Peer, reason: str) -> None:
        """Close ``peer`` now; the I/O layer collects it from take_doomed()."""
        peer.doomed = True
        peer.out.clear()
        peer.replay_next = None
        self._dirty.discard(peer.cid)
        self._doomed.append((peer.cid, reason))

    def _close_after_flush(self, peer: Peer) -> None:
        peer.closing = True
        self._dirty.add(peer.cid)  # so the I/O layer looks at it even with nothing to send

    def _log_member(self, peer: Peer) -> None:
        if not peer.logged and peer.cid in self.room:
            peer.logged = True
            log.info("%s connected from %s", self.room.name_of(peer.cid), peer.address)

    def _leave(self, peer: Peer, how: str = "closed") -> None:
        self._flush_batch()  # it still gets the chat posted before it left
        if peer.cid in self.room:
            name = self.room.name_of(peer.cid)
            self.room.leave(peer.cid)
            self._log_leave(peer, name, how)

    @staticmethod
    def _log_leave(peer: Peer, name: str, how: str) -> None:
        if peer.logged:
            log.info("%s (%s) left: %s", name, peer.address, how)
        else:  # its arrival was never logged: say both at once
            log.info("%s connected from %s and left without a word: %s", name, peer.address, how)

    def _post(
        self,
        sender: str,
        text: str,
        now: float,
        exclude: int | None,
        origin: str = "",
        way: str = "",
        id_: str = "",
    ):
        msg, out = self.room.post(sender, text, now, exclude, origin, id_)
        self.messages += 1
        if self.posted is not None:
            self.posted.append(msg)
        if self.log_chat:
            # The fields go to the journal as PICCHAT_SENDER= and so on
            # (journalctl -u picchat-server PICCHAT_SENDER=alice).
            fields = {"SENDER": sender, "SEQ": str(msg.seq), "ORIGIN": way}
            logs.chat(sender, text, fields)
        self._batch += out  # queued by _flush_batch, before any other output
        self._batch_bytes += len(text) + 64
        if self._batch_bytes > self.max_queue // 2:
            self.full = True  # this much waiting for every member: send this turn
        return msg

    # ---- output ----------------------------------------------------------------

    def _deliver_all(self, deliveries: Iterable[Deliver]) -> None:
        for d in deliveries:
            self._deliver(d)

    def _flush_batch(self) -> None:
        """Queue the chat posted since the last call: for each member, every
        line it should get, joined, in one append.

        Encoding happens once per message and wire format, and the per-member
        work once per batch instead of once per line: with 100 members and
        four recv()s of 50 lines before the server sends, that is 100 appends
        instead of 20,000.
        """
        batch = self._batch
        if not batch:
            return
        self._batch = []
        self._batch_bytes = 0
        if len(batch) == 1:
            self._deliver(batch[0])
            return
        encoded: dict[Wire, list[bytes]] = {}
        joined: dict[Wire, bytes] = {}
        excluded = {d.exclude for d in batch}
        overflowed = []
        for cid in self.room.members():
            peer = self.peers[cid]
            if peer.replay_next is not None:
                continue  # a replaying peer gets it from history, in order
            wire = peer.proto.wire
            parts = encoded.get(wire)
            if parts is None:
                parts = encoded[wire] = [encode(d.frame, wire) for d in batch]
            if cid in excluded:  # a sender in the batch: not its own lines
                data = b"".join([p for p, d in zip(parts, batch, strict=True) if d.exclude != cid])
            else:
                data = joined.get(wire)
                if data is None:
                    data = joined[wire] = b"".join(parts)
            if data and not self._append(peer, data, leave=False):
                overflowed.append(peer)
        for peer in overflowed:  # not while iterating over the members
            self._leave(peer, "too slow")

    def _deliver(self, d: Deliver) -> None:
        """Queue one frame for its recipients, encoding it once per wire format."""
        self._flush_batch()
        encoded: dict[Wire, bytes] = {}
        recipients = d.to if d.to is not None else self.room.members()
        overflowed = []
        live_chat = isinstance(d.frame, Chat)
        for cid in recipients:
            if cid == d.exclude:
                continue
            peer = self.peers[cid]
            if live_chat and peer.replay_next is not None:
                continue  # a replaying peer gets it from history, in order
            wire = peer.proto.wire
            data = encoded.get(wire)
            if data is None:
                data = encoded[wire] = encode(d.frame, wire)
            if data and not self._append(peer, data, leave=False):
                overflowed.append(peer)
        for peer in overflowed:  # not while iterating over the members
            self._leave(peer, "too slow")

    def _send(self, peer: Peer, frame: Frame) -> None:
        data = encode(frame, peer.proto.wire)
        if data:
            self._queue(peer, data)

    def _queue(self, peer: Peer, data: bytes, leave: bool = True) -> bool:
        """Append to ``peer``'s output after any chat batched before it."""
        self._flush_batch()
        return self._append(peer, data, leave)

    def _append(self, peer: Peer, data: bytes, leave: bool = True) -> bool:
        """Append to ``peer``'s output queue within its bounds; False if that
        made it too slow (it is doomed, and has left the room if ``leave``)."""
        if peer.doomed:
            return True
        if peer.limit is None and len(peer.out) + len(data) > 2 * self.max_queue:
            # Even before its next send, this much waiting means the reader
            # is far behind: holding more would let memory grow without bound.
            self._too_slow(peer, leave)
            return False
        peer.out += data
        if peer.limit is not None:
            if len(peer.out) > peer.limit:
                self._drop_oldest(peer, len(peer.out) - peer.limit)
        elif len(peer.out) > self.max_queue // 2:
            self.full = True
        self._dirty.add(peer.cid)
        self._appended += len(data)
        if self._appended > self.max_total:
            self._enforce_total()
        return not peer.doomed

    def _enforce_total(self) -> None:
        """Keep all output queues together under max_total bytes.

        ``_appended`` counts bytes queued since the last exact count and so
        over-estimates the total (sends are not subtracted); only when it
        passes the ceiling do we count exactly, which costs one pass over the
        connections per max_total bytes queued. If the real total is over,
        the readers furthest behind are disconnected first, down to three
        quarters of the ceiling (so this does not run again at once). They
        leave the room when the I/O layer drops them.
        """
        total = sum(len(p.out) for p in self.peers.values())
        if total > self.max_total:
            behind = sorted(
                (p for p in self.peers.values() if p.limit is None and not p.doomed and p.out),
                key=lambda p: len(p.out),
                reverse=True,
            )
            for peer in behind:
                if total <= self.max_total * 3 // 4:
                    break
                total -= len(peer.out)
                self._too_slow(
                    peer,
                    leave=False,
                    reason=f"furthest behind when all output waiting passed {self.max_total} "
                    "bytes (max-total-queue)",
                )
        self._appended = total
