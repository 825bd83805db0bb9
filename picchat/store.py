"""Durable history: an append-only log of chat messages in the state directory.

The format (docs/protocol.md states what it guarantees):

- Segment files ``history-<first seq, 12 digits>.log``, mode 0600. Each
  starts with a header: the line ``PICCHAT-HISTORY <format>`` and a JSON line
  ``{"history_id": ..., "first_seq": ...}``; then records, each
  ``<length u32 LE><crc32 u32 LE><JSON payload>``. A message is written once,
  appended: the history is never rewritten.
- A segment is closed once it holds ``segment_records`` records (the
  ``history`` setting) and a new one begins; only the two newest are kept, so
  the disk holds between one and two histories' worth, and at least all the
  server replays. A segment's records are numbered without a gap: when
  numbering skips (records given up while the disk refused them), a new
  segment begins.
- At start, every record's checksum is verified. A damaged or cut tail (a
  power cut mid-write) is cut off, the damage logged with the number of
  records lost; the messages before it stay. A newest segment holding no
  message (its header cut while it was being created, or numbered past what
  the segment before still holds) is removed. The history id is the one in
  the files: clients resume across a restart without a gap.
- The format line decides first: a newer format is refused by name
  (``StoreError``), never repaired or removed; this version reads format 1,
  and later versions are to read it too.

One server per directory: ``load`` takes an exclusive lock on the directory
(``flock``, held until ``close`` or the process ends) and raises ``StoreBusy``
if another process holds it; two servers appending to one history would
number messages twice and damage each other's records.

Writing is the server's: ``append`` buffers records; ``commit`` writes them
(one write) and, with ``sync``, fsyncs once -- the group commit: every message
of a loop turn is on disk before any of them is acknowledged. All file access
goes through ``Files``, which tests replace to count fsyncs and inject faults.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import zlib
from pathlib import Path

from . import logs
from .events import Message, Value
from .protocol import dumps

log = logs.get(__name__)

FORMAT = 1
MAGIC = b"PICCHAT-HISTORY "
_HEAD = struct.Struct("<II")  # payload length, crc32 of the payload
RECORD_MAX = 1 << 20  # a longer length field can only be damage
PENDING_MAX = 4 << 20  # bytes of records kept for a retry while the disk refuses them
_SEGMENT_RE = re.compile(r"history-(\d{12})\.log\Z")


class StoreError(Exception):
    """The history cannot be used (a newer format, an unreadable directory)."""


class StoreBusy(StoreError):
    """Another process (another picchat-server) uses this state directory."""


class TornHeader(StoreError):
    """A segment whose header was being written when the power went."""


class Files:
    """The file operations the store needs; a test substitutes its own."""

    def listdir(self, path: Path) -> list[str]:
        return os.listdir(path)

    def read(self, path: Path) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def open_append(self, path: Path) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def close(self, fd: int) -> None:
        os.close(fd)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def lock(self, path: Path) -> int:
        """An fd holding an exclusive lock on the directory; BlockingIOError if taken."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        return fd

    def sync_dir(self, path: Path) -> None:
        """Make a new or removed segment's name durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def encode_record(msg: Message) -> bytes:
    obj = {"seq": msg.seq, "time": msg.time, "from": msg.sender, "text": msg.text}
    if msg.origin:
        obj["origin"] = msg.origin
    if msg.id:
        obj["id"] = msg.id
    payload = dumps(obj).encode()
    return _HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes) -> Message:
    obj = json.loads(payload)
    seq, when, sender, text = obj["seq"], obj["time"], obj["from"], obj["text"]
    if not (isinstance(seq, int) and isinstance(when, (int, float))):
        raise ValueError("bad seq or time")
    if not (isinstance(sender, str) and isinstance(text, str)):
        raise ValueError("bad sender or text")
    origin, id_ = obj.get("origin", ""), obj.get("id", "")
    return Message(seq, float(when), sender, text, str(origin), str(id_))


def header(history_id: str, first_seq: int) -> bytes:
    meta = json.dumps({"history_id": history_id, "first_seq": first_seq})
    return MAGIC + str(FORMAT).encode() + b"\n" + meta.encode() + b"\n"


class Segment:
    """One segment file as read; ``parse_segment`` fills it in."""

    __slots__ = (
        "path",
        "history_id",
        "first_seq",
        "messages",
        "good_size",
        "dropped",
        "damaged_at",
    )

    def __init__(self, path: Path, history_id: str, first_seq: int) -> None:
        self.path = path
        self.history_id = history_id
        self.first_seq = first_seq
        self.messages: list[Message] = []
        self.good_size = 0  # bytes up to the end of the last valid record
        self.dropped = 0  # records lost to damage
        self.damaged_at: int | None = None  # byte offset of the damage, if any


def parse_segment(path: Path, data: bytes) -> Segment:
    """Read one segment; damage ends it (recorded, not raised). Raises
    StoreError for what is not ours to repair: a newer format, no header."""
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):
            raise TornHeader(f"{path}: its header is cut off")
        raise StoreError(f"{path} is not a picchat history file")
    first_nl = data.find(b"\n")
    if first_nl < 0:
        raise TornHeader(f"{path}: its header is cut off")
    # The version decides before anything else: a newer format's header may
    # be laid out otherwise, and must be neither misread nor "repaired".
    digits = data[len(MAGIC) : first_nl]
    if not (digits.isdigit() and int(digits) >= 1):
        raise StoreError(f"{path}: unreadable format line")
    version = int(digits)
    if version > FORMAT:
        raise StoreError(
            f"{path} is in history format {version}, written by a newer picchat; this one "
            f"reads format {FORMAT} and older. Upgrade picchat, or move the state directory "
            "aside to start a new history."
        )
    second_nl = data.find(b"\n", first_nl + 1)
    if second_nl < 0:
        raise TornHeader(f"{path}: its header is cut off")
    try:
        meta = json.loads(data[first_nl + 1 : second_nl])
        history_id, first_seq = str(meta["history_id"]), int(meta["first_seq"])
    except (ValueError, KeyError, TypeError):
        raise StoreError(f"{path}: its header is damaged") from None
    seg = Segment(path, history_id, first_seq)
    pos = second_nl + 1
    seg.good_size = pos
    expected = first_seq
    while pos < len(data):
        if len(data) - pos < _HEAD.size:
            seg.damaged_at, seg.dropped = pos, 1
            break
        length, crc = _HEAD.unpack_from(data, pos)
        payload = data[pos + _HEAD.size : pos + _HEAD.size + length]
        bad = length > RECORD_MAX or len(payload) < length or zlib.crc32(payload) != crc
        msg = None
        if not bad:
            try:
                msg = _decode_payload(payload)
            except (ValueError, KeyError, TypeError):
                bad = True
        if bad or msg is None or msg.seq != expected:
            seg.damaged_at = pos
            seg.dropped = _count_records(data, pos)
            break
        seg.messages.append(msg)
        expected += 1
        pos += _HEAD.size + length
        seg.good_size = pos
    return seg


def _count_records(data: bytes, pos: int) -> int:
    """How many records the damaged part held, as far as its lengths tell (at least 1)."""
    count = 0
    while pos < len(data) and count < 1 << 24:
        count += 1
        if len(data) - pos < _HEAD.size:
            break
        (length,) = struct.unpack_from("<I", data, pos)
        if length > RECORD_MAX or length == 0:
            # No record is empty: zeros are a tail the file system lengthened
            # but never wrote (one lost write, not a record every 8 bytes).
            break
        pos += _HEAD.size + length
    return max(count, 1)


class Loaded(Value):
    __slots__ = __match_args__ = ("history_id", "messages")

    def __init__(self, history_id: str | None, messages: list[Message]) -> None:
        self.history_id = history_id  # None: no history yet
        self.messages = messages  # the newest, contiguous, oldest first


class Store:
    """The history's files. ``load`` once, then ``append``/``commit``."""

    def __init__(self, directory: Path, segment_records: int, files: Files | None = None) -> None:
        self.directory = directory
        self.segment_records = max(1, segment_records)
        self.files = files or Files()
        self.history_id = ""
        self._segments: list[Path] = []  # oldest first; the last is written to
        self._fd = -1
        self._lock = -1  # the directory's lock, from load() to close()
        self._size = 0  # bytes of the current segment known to be whole records
        self._records = 0  # records in the current segment
        self._pending = bytearray()  # records not yet written
        self._pending_seqs: list[int] = []  # their seqs (for rotation), in order
        self._next_seq = 1  # the seq the current segment's next record must have
        self.unsynced = False  # written since the last fsync
        self.fsyncs = 0  # since start (logged at the end; the benchmark reads it)
        self.written = 0  # records written since start

    # ---- start ---------------------------------------------------------------

    def load(self) -> Loaded:
        """Lock the directory, read what it holds, repair a damaged tail."""
        if self._lock < 0:
            try:
                self._lock = self.files.lock(self.directory)
            except BlockingIOError:
                raise StoreBusy(
                    f"the history in {self.directory} is in use by another picchat-server "
                    "(one server per state directory)"
                ) from None
            except OSError as exc:
                where = self.directory
                problem = exc.strerror or exc
                raise StoreError(f"cannot read the state directory {where}: {problem}") from None
        try:
            names = self.files.listdir(self.directory)
        except OSError as exc:
            raise StoreError(f"cannot read the state directory {self.directory}: {exc}") from None
        paths = sorted(self.directory / n for n in names if _SEGMENT_RE.match(n))
        segments = []
        for path in paths:
            try:
                data = self.files.read(path)
            except OSError as exc:
                raise StoreError(f"cannot read {path}: {exc.strerror}") from None
            try:
                seg = parse_segment(path, data)
            except TornHeader:
                if path != paths[-1]:
                    raise
                # Only the newest segment can have been cut while being
                # begun; it holds no message yet.
                log.warning("History file %s was cut while being created; removed", path)
                self.files.unlink(path)
                continue
            if seg.damaged_at is not None:
                log.warning(
                    "History file %s is damaged at byte %d (a power cut while writing?): "
                    "%d record%s after it dropped, the %d before it kept",
                    path,
                    seg.damaged_at,
                    seg.dropped,
                    "s" * (seg.dropped != 1),
                    len(seg.messages),
                )
            segments.append(seg)
        if not segments:
            return Loaded(None, [])
        while True:
            last = segments[-1]
            self.history_id = last.history_id
            messages = _joined(segments)
            follows = messages[-1].seq + 1 if messages else 1  # the seq the server goes on with
            if last.messages or last.first_seq == follows:
                break
            # A newest segment with no message whose numbering does not follow
            # the messages kept (the segment before it lost its tail): records
            # written to it would be misnumbered, read as damage at the next
            # start. It holds nothing: remove it, go on in the one before.
            log.warning(
                "History file %s holds no message and does not follow the %d kept; removed",
                last.path,
                len(messages),
            )
            self.files.unlink(last.path)
            segments.pop()
            if not segments:
                self._next_seq = follows
                return Loaded(self.history_id, [])
        self._segments = [s.path for s in segments]
        self._next_seq = last.first_seq + len(last.messages)
        self._open_last(last)
        return Loaded(self.history_id, messages)

    def _open_last(self, seg: Segment) -> None:
        self._fd = self.files.open_append(seg.path)
        if self.files.size(self._fd) != seg.good_size:
            self.files.truncate(self._fd, seg.good_size)  # cut the damaged tail off
            self.files.fsync(self._fd)
            self.fsyncs += 1
        self._size = seg.good_size
        self._records = len(seg.messages)

    def ready(self, next_seq: int) -> None:
        """Have a segment open for writing from the start (raises OSError): its
        fd is then held, so running out of fds later cannot stop the saving."""
        if self._fd < 0:
            self._rotate(next_seq)

    def start(self, history_id: str, next_seq: int) -> None:
        """A new history (nothing loaded): its first segment comes with its first message."""
        self.history_id = history_id
        self._next_seq = next_seq

    # ---- writing -------------------------------------------------------------

    def append(self, msg: Message) -> None:
        self._pending += encode_record(msg)
        self._pending_seqs.append(msg.seq)

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def commit(self, sync: bool) -> int:
        """Write every pending record; fsync if ``sync``. Returns how many were
        written. Raises OSError (disk full, I/O error): the file is cut back
        to its last whole record and the records stay pending for the next
        commit (up to PENDING_MAX bytes; beyond, the oldest are given up)."""
        if not self._pending:
            if sync:
                self.sync()
            return 0
        written = 0
        try:
            while self._pending_seqs:
                first = self._pending_seqs[0]
                # A segment's records are numbered without a gap (a gap reads as
                # damage at start): records given up while the disk refused
                # them (PENDING_MAX) make the next ones begin a new segment.
                if self._fd < 0 or self._records >= self.segment_records or first > self._next_seq:
                    self._rotate(first)
                limit = min(len(self._pending_seqs), self.segment_records - self._records)
                take = 1
                while take < limit and self._pending_seqs[take] == first + take:
                    take += 1
                cut = _offset_after(self._pending, take)
                self.files.write(self._fd, bytes(self._pending[:cut]))
                self._size += cut
                self._records += take
                written += take
                self.written += take
                del self._pending[:cut]
                del self._pending_seqs[:take]
                self._next_seq = first + take
                self.unsynced = True
            if sync:
                self.sync()
        except OSError:
            self._recover()
            raise
        return written

    def sync(self) -> None:
        if self.unsynced and self._fd >= 0:
            self.files.fsync(self._fd)
            self.fsyncs += 1
            self.unsynced = False

    def _recover(self) -> None:
        if self._fd >= 0:
            try:
                self.files.truncate(self._fd, self._size)
            except OSError:
                pass
        over = len(self._pending) - PENDING_MAX
        if over > 0:
            lost = 0
            cut = 0
            while cut < over and lost < len(self._pending_seqs):
                (length,) = struct.unpack_from("<I", self._pending, cut)
                cut += _HEAD.size + length
                lost += 1
            del self._pending[:cut]
            del self._pending_seqs[:lost]
            log.error("Gave up saving %d messages to disk (it keeps refusing them)", lost)

    def _rotate(self, first_seq: int) -> None:
        """Begin a new segment; keep only the previous one besides it."""
        if self._fd >= 0:
            if self.unsynced:
                self.files.fsync(self._fd)
                self.fsyncs += 1
                self.unsynced = False
            self.files.close(self._fd)
            self._fd = -1
        path = self.directory / f"history-{first_seq:012d}.log"
        fd = self.files.open_append(path)
        try:
            head = header(self.history_id, first_seq)
            self.files.write(fd, head)
            self.files.fsync(fd)
            self.fsyncs += 1
        except OSError:
            self.files.close(fd)
            try:
                self.files.unlink(path)
            except OSError:
                pass
            raise
        self._fd, self._size, self._records = fd, len(head), 0
        self._next_seq = first_seq
        self._segments.append(path)
        while len(self._segments) > 2:
            old = self._segments.pop(0)
            try:
                self.files.unlink(old)
            except OSError as exc:
                log.warning("Cannot remove the old history file %s: %s", old, exc.strerror)
        self.files.sync_dir(self.directory)

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.sync()
            except OSError:
                pass
            self.files.close(self._fd)
            self._fd = -1
        if self._lock >= 0:
            self.files.close(self._lock)  # the lock goes with the fd
            self._lock = -1


def _joined(segments: list[Segment]) -> list[Message]:
    """The one contiguous run of messages, ending with the newest, that can
    be replayed."""
    history_id = segments[-1].history_id
    messages: list[Message] = []
    for seg in reversed(segments):
        if seg.history_id != history_id:
            break
        if messages and (not seg.messages or seg.messages[-1].seq + 1 != messages[0].seq):
            if seg.messages:
                log.warning(
                    "History file %s does not join the newer ones; its %d messages are "
                    "not replayed",
                    seg.path,
                    len(seg.messages),
                )
            break
        messages[:0] = seg.messages
    return messages


def _offset_after(buf: bytearray, records: int) -> int:
    pos = 0
    for _ in range(records):
        (length,) = struct.unpack_from("<I", buf, pos)
        pos += _HEAD.size + length
    return pos
