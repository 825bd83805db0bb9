"""The durable history: ``picchat.store`` and the hub's side of it.

Every file operation of the store goes through ``store.Files``; the tests
substitute ``Recording``, which counts them and can refuse writes the way a
full disk does. What is counted:

- ``fsyncs``: ``Files.fsync`` on a segment file. A new segment's header is
  fsync'd once when the segment begins; a group commit with ``sync=True`` is
  one fsync however many records it writes; a segment closed by rotation is
  fsync'd if it holds unsynced writes; cutting a damaged tail off at start is
  one fsync.
- ``dir_syncs``: ``Files.sync_dir``, the fsync of the directory that makes a
  segment's creation (and the removal of the oldest) durable. Counted apart.
- ``writes``: the sizes of the ``Files.write`` calls (a group is one write).

The store's own ``Store.fsyncs`` counts the same file fsyncs (STATUS reports it).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import stat
import struct
import zlib
from pathlib import Path

import pytest
from test_resume import ResumeNet, chat

from picchat import store
from picchat.events import Message
from picchat.store import (
    RECORD_MAX,
    Files,
    Store,
    StoreError,
    encode_record,
    header,
    parse_segment,
)

T0 = 1_764_072_000.0
SEG1 = "history-000000000001.log"


def msg(seq: int, text: str | None = None, **kw) -> Message:
    return Message(seq, T0 + seq, kw.pop("sender", "alice"), text or f"m{seq}", **kw)


def msgs(first: int, last: int) -> list[Message]:
    return [msg(i) for i in range(first, last + 1)]


class Recording(Files):
    """The real file operations, counted; ``space`` bytes may still be written
    (None: no limit). A write that does not fit writes what fits, then fails
    with ENOSPC, as a full disk does."""

    def __init__(self, space: int | None = None) -> None:
        self.space = space
        self.fsyncs = 0
        self.dir_syncs = 0
        self.writes: list[int] = []
        self.fsync_error: int | None = None  # errno to fail fsyncs with

    def reset(self) -> None:
        self.fsyncs = self.dir_syncs = 0
        self.writes = []

    def write(self, fd: int, data: bytes) -> None:
        if self.space is not None and len(data) > self.space:
            if self.space:
                super().write(fd, data[: self.space])
            self.space = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.space is not None:
            self.space -= len(data)
        self.writes.append(len(data))
        super().write(fd, data)

    def fsync(self, fd: int) -> None:
        if self.fsync_error is not None:
            raise OSError(self.fsync_error, os.strerror(self.fsync_error))
        self.fsyncs += 1
        super().fsync(fd)

    def sync_dir(self, path: Path) -> None:
        self.dir_syncs += 1
        super().sync_dir(path)


def new_store(directory: Path, segment_records: int = 100, files: Files | None = None) -> Store:
    """A store on an empty directory, a new history "h1" begun."""
    directory.mkdir(exist_ok=True)
    s = Store(directory, segment_records, files)
    loaded = s.load()
    assert loaded.history_id is None and loaded.messages == []
    s.start("h1", 1)
    return s


def commit(s: Store, messages: list[Message], sync: bool = True) -> int:
    for m in messages:
        s.append(m)
    return s.commit(sync=sync)


class Unlocked(Files):
    """The directory as a new process finds it after the writer crashed: the
    writer's lock went with it (this test's first store is still open)."""

    def lock(self, path: Path) -> int:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def reload(directory: Path, segment_records: int = 100) -> store.Loaded:
    s = Store(directory, segment_records, Unlocked())
    try:
        return s.load()
    finally:
        s.close()


def segments(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("history-"))


def by_hand(history_id: str, first_seq: int, records: list[dict], version: str = "1") -> bytes:
    """A segment written from the documented layout alone (store.py's docstring,
    docs/operations.md), not with the store's own encoders."""
    data = f"PICCHAT-HISTORY {version}\n".encode()
    data += json.dumps({"first_seq": first_seq, "history_id": history_id}).encode() + b"\n"
    for obj in records:
        payload = json.dumps(obj).encode()
        data += struct.pack("<I", len(payload)) + struct.pack("<I", zlib.crc32(payload)) + payload
    return data


def layout(messages: list[Message], history_id: str = "h1") -> tuple[bytes, list[int]]:
    """A segment's bytes and where each record begins (the last entry: the end)."""
    data = header(history_id, messages[0].seq)
    bounds = [len(data)]
    for m in messages:
        data += encode_record(m)
        bounds.append(len(data))
    return data, bounds


# ---- fsyncs per policy -------------------------------------------------------------------


def test_a_group_commit_is_one_write_and_one_fsync_whatever_its_size(tmp_path):
    files = Recording()
    s = new_store(tmp_path / "d", files=files)
    assert commit(s, msgs(1, 5), sync=True) == 5
    # The first segment begins: its header is written and fsync'd (and the
    # directory), then the five records: one write, one fsync.
    first = sum(len(encode_record(m)) for m in msgs(1, 5))
    assert files.writes == [len(header("h1", 1)), first]
    assert (files.fsyncs, files.dir_syncs) == (2, 1)
    files.reset()
    assert commit(s, msgs(6, 50), sync=True) == 45
    assert files.writes == [sum(len(encode_record(m)) for m in msgs(6, 50))]
    assert (files.fsyncs, files.dir_syncs) == (1, 0)
    assert s.fsyncs == 3 and not s.unsynced and s.written == 50
    files.reset()
    assert s.commit(sync=True) == 0  # nothing pending, nothing unsynced: no fsync
    assert (files.fsyncs, files.writes) == (0, [])
    s.close()
    assert reload(tmp_path / "d").messages == msgs(1, 50)


def test_commit_without_sync_writes_at_once_and_sync_fsyncs_once(tmp_path):
    files = Recording()
    s = new_store(tmp_path / "d", files=files)
    commit(s, msgs(1, 3), sync=False)
    assert files.fsyncs == 1  # the new segment's header only
    assert s.unsynced
    files.reset()
    commit(s, msgs(4, 6), sync=False)
    commit(s, msgs(7, 9), sync=False)
    assert files.fsyncs == 0 and len(files.writes) == 2
    # Written at once: another reader sees them before any fsync.
    assert reload(tmp_path / "d").messages == msgs(1, 9)
    s.sync()
    assert files.fsyncs == 1 and not s.unsynced
    s.sync()  # nothing written since: nothing to do
    assert files.fsyncs == 1
    commit(s, msgs(10, 10), sync=False)
    s.commit(sync=True)  # nothing pending, but a write not yet fsync'd: one fsync
    assert files.fsyncs == 2 and not s.unsynced
    s.close()


def test_close_fsyncs_what_is_unsynced(tmp_path):
    files = Recording()
    s = new_store(tmp_path / "d", files=files)
    commit(s, msgs(1, 2), sync=False)
    files.reset()
    s.close()
    assert files.fsyncs == 1


def test_rotation_keeps_the_two_newest_segments_and_fsyncs_each_closed_one(tmp_path):
    d = tmp_path / "d"
    files = Recording()
    s = new_store(d, segment_records=3, files=files)
    assert commit(s, msgs(1, 7), sync=True) == 7
    # Segments 1 (1-3), 4 (4-6), 7 (7): three headers fsync'd, two segments
    # closed with unsynced records fsync'd, the final group fsync'd: 6. The
    # directory is synced for each new segment.
    assert files.fsyncs == 6 and files.dir_syncs == 3
    assert segments(d) == ["history-000000000004.log", "history-000000000007.log"]
    for name in segments(d):
        assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600
    s.close()
    loaded = reload(d, 3)
    assert (loaded.history_id, loaded.messages) == ("h1", msgs(4, 7))
    # Going on after a restart: the newest segment is filled up, then a new one.
    s = Store(d, 3)
    s.load()
    commit(s, msgs(8, 9))
    assert segments(d) == ["history-000000000004.log", "history-000000000007.log"]
    commit(s, msgs(10, 10))
    assert segments(d) == ["history-000000000007.log", "history-000000000010.log"]
    s.close()
    assert reload(d, 3).messages == msgs(7, 10)


def test_rotation_without_sync_still_fsyncs_the_segment_it_closes(tmp_path):
    files = Recording()
    s = new_store(tmp_path / "d", segment_records=3, files=files)
    commit(s, msgs(1, 4), sync=False)
    assert files.fsyncs == 3  # header, segment 1 closed, header of segment 4
    assert s.unsynced  # record 4 is not fsync'd yet
    s.close()


def test_a_shorter_segment_setting_applies_at_the_next_commit(tmp_path):
    d = tmp_path / "d"
    s = new_store(d, segment_records=10)
    commit(s, msgs(1, 5))
    s.segment_records = 2  # a reload lowered `history`
    commit(s, msgs(6, 6))
    assert segments(d) == [SEG1, "history-000000000006.log"]
    s.close()
    assert reload(d, 2).messages == msgs(1, 6)


def test_records_keep_every_field_and_any_text(tmp_path):
    d = tmp_path / "d"
    s = new_store(d)
    written = [
        msg(1, "héllo wörld ✓ 🙂", origin="t1", id="7"),
        msg(2, 'quotes " and \\ and \n newline', sender="cron@pi"),
        msg(3, "x" * 5000, origin="t2", id="abc"),
    ]
    commit(s, written)
    s.close()
    loaded = reload(d)
    assert loaded.messages == written
    assert [m.origin for m in loaded.messages] == ["t1", "", "t2"]
    assert [m.id for m in loaded.messages] == ["7", "", "abc"]


# ---- checksums ------------------------------------------------------------------------


def test_a_flipped_byte_anywhere_in_a_record_is_detected(tmp_path):
    written = [msg(1, "a"), msg(2, "bb", origin="t1", id="x"), msg(3, "ccc")]
    data, bounds = layout(written)
    path = tmp_path / SEG1
    for offset in range(bounds[0], len(data)):
        record = max(i for i in range(len(written)) if bounds[i] <= offset)
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(data)
            damaged[offset] ^= mask
            seg = parse_segment(path, bytes(damaged))
            where = f"byte {offset} ^ {mask:#x}"
            assert seg.messages == written[:record], where
            assert (seg.damaged_at, seg.good_size) == (bounds[record], bounds[record]), where
            if offset >= bounds[record] + 4:  # not in the length field: counted exactly
                assert seg.dropped == len(written) - record, where
            else:
                assert seg.dropped >= 1, where


def test_a_damaged_record_is_cut_off_at_start_with_what_follows_and_logged(tmp_path, logged):
    d = tmp_path / "d"
    d.mkdir()
    data, bounds = layout(msgs(1, 5))
    damaged = bytearray(data)
    damaged[bounds[2] + 10] ^= 0x20  # record 3's payload
    (d / SEG1).write_bytes(bytes(damaged))
    files = Recording()
    s = Store(d, 100, files)
    with logged.at_level(logging.WARNING, logger="picchat.store"):
        loaded = s.load()
    assert loaded.messages == msgs(1, 2)
    assert f"damaged at byte {bounds[2]}" in logged.text
    assert "3 records after it dropped, the 2 before it kept" in logged.text
    assert (d / SEG1).stat().st_size == bounds[2]
    assert files.fsyncs == 1  # the cut is made durable
    # Numbering goes on from the last message kept.
    commit(s, [msg(3, "again")])
    s.close()
    assert reload(d).messages == [*msgs(1, 2), msg(3, "again")]


# ---- cut (torn) tails -----------------------------------------------------------------


def test_a_file_cut_at_every_byte_offset_recovers_the_whole_records_before_the_cut(
    tmp_path, logged
):
    written = [msg(1, "a"), msg(2, "bé", origin="t1", id="1"), msg(3, "c" * 40), msg(4, "d")]
    data, bounds = layout(written)
    logged.set_level(logging.WARNING, logger="picchat.store")
    for cut in range(len(data) + 1):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / SEG1).write_bytes(data[:cut])
        logged.clear()
        s = Store(d, 100)
        loaded = s.load()
        if cut < bounds[0]:
            # The header was being written: the file held no message yet and
            # is removed; a new history begins.
            assert (loaded.history_id, loaded.messages) == (None, []), cut
            assert segments(d) == [], cut
            assert "was cut while being created" in logged.text, cut
            s.close()
            continue
        whole = max(i for i in range(len(bounds)) if bounds[i] <= cut)
        assert (loaded.history_id, loaded.messages) == ("h1", written[:whole]), cut
        assert (d / SEG1).stat().st_size == bounds[whole], cut
        if cut == bounds[whole]:
            assert logged.text == "", cut
        else:
            assert f"damaged at byte {bounds[whole]}" in logged.text, cut
            assert f"1 record after it dropped, the {whole} before it kept" in logged.text, cut
        # New messages go on with the next seq, after the kept ones.
        commit(s, [msg(whole + 1, "next")])
        s.close()
        assert reload(d).messages == [*written[:whole], msg(whole + 1, "next")], cut


def test_a_newest_segment_cut_while_being_created_is_removed_and_made_again(tmp_path, logged):
    first, _ = layout(msgs(1, 2))
    second, bounds = layout(msgs(3, 3))
    logged.set_level(logging.WARNING, logger="picchat.store")
    for cut in range(bounds[0]):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / SEG1).write_bytes(first)
        (d / "history-000000000003.log").write_bytes(second[:cut])
        s = Store(d, 2)
        loaded = s.load()
        assert (loaded.history_id, loaded.messages) == ("h1", msgs(1, 2)), cut
        assert segments(d) == [SEG1], cut
        commit(s, msgs(3, 3))
        s.close()
        assert segments(d) == [SEG1, "history-000000000003.log"], cut
        assert reload(d, 2).messages == msgs(1, 3), cut


def test_a_segment_begun_just_before_a_crash_is_written_on(tmp_path):
    # Rotation wrote the new segment's header, then the power went.
    d = tmp_path / "d"
    d.mkdir()
    (d / SEG1).write_bytes(layout(msgs(1, 3))[0])
    (d / "history-000000000004.log").write_bytes(header("h1", 4))
    s = Store(d, 3)
    assert s.load().messages == msgs(1, 3)
    commit(s, msgs(4, 4))
    s.close()
    assert segments(d) == [SEG1, "history-000000000004.log"]
    assert reload(d, 3).messages == msgs(1, 4)


def test_an_empty_newest_segment_that_does_not_follow_is_removed(tmp_path, logged):
    # Segment 1 lost its last record (3), segment 4 holds none: numbering goes
    # on at 3, which segment 4 cannot hold (it would read as damage next time).
    d = tmp_path / "d"
    d.mkdir()
    data, bounds = layout(msgs(1, 3))
    (d / SEG1).write_bytes(data[: bounds[3] - 2])
    (d / "history-000000000004.log").write_bytes(header("h1", 4))
    logged.set_level(logging.WARNING, logger="picchat.store")
    s = Store(d, 3)
    loaded = s.load()
    assert (loaded.history_id, loaded.messages) == ("h1", msgs(1, 2))
    assert "history-000000000004.log holds no message and does not follow" in logged.text
    assert segments(d) == [SEG1]
    commit(s, [msg(3, "new 3")])
    s.close()
    logged.clear()
    assert reload(d, 3).messages == [*msgs(1, 2), msg(3, "new 3")]
    assert "damaged" not in logged.text


def test_a_lone_empty_segment_that_does_not_begin_at_1_is_removed(tmp_path):
    # Its predecessor is gone (removed by hand): nothing is kept but the
    # history id; numbering starts again, in a segment that says so.
    d = tmp_path / "d"
    d.mkdir()
    (d / "history-000000000004.log").write_bytes(header("h1", 4))
    s = Store(d, 3)
    loaded = s.load()
    assert (loaded.history_id, loaded.messages) == ("h1", [])
    commit(s, msgs(1, 1))
    s.close()
    assert segments(d) == [SEG1]
    assert reload(d, 3) == store.Loaded("h1", msgs(1, 1))


def test_an_older_segment_with_a_cut_header_is_refused(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / SEG1).write_bytes(b"PICCHAT-HISTORY 1\n{")
    (d / "history-000000000003.log").write_bytes(layout(msgs(3, 3))[0])
    with pytest.raises(StoreError, match="cut off"):
        Store(d, 2).load()
    assert (d / SEG1).exists()


# ---- corrupted tails ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("tail", "dropped"),
    [
        # A file lengthened by the file system but whose data never reached the
        # disk reads as zeros: not 4096 / 8 records, but one.
        (b"\0" * 4096, 1),
        (random.Random(7).randbytes(300), None),  # garbage
        (encode_record(msg(2)), 1),  # a record written twice (its seq does not follow)
        (encode_record(msg(9)), 1),  # a seq that skips
        (struct.pack("<II", 8, zlib.crc32(b"not json")) + b"not json", 1),  # good crc, no JSON
        (struct.pack("<II", 2, zlib.crc32(b"[]")) + b"[]", 1),  # JSON, not a record
        (struct.pack("<II", RECORD_MAX + 1, 0) + b"x" * 100, 1),  # an impossible length
        (b"\x05\x00", 1),  # a length field cut
    ],
)
def test_a_corrupted_tail_is_cut_off(tmp_path, logged, tail, dropped):
    d = tmp_path / "d"
    d.mkdir()
    data, _ = layout(msgs(1, 3))
    (d / SEG1).write_bytes(data + tail)
    with logged.at_level(logging.WARNING, logger="picchat.store"):
        s = Store(d, 100)
        loaded = s.load()
    assert loaded.messages == msgs(1, 3)
    assert (d / SEG1).stat().st_size == len(data)
    assert f"damaged at byte {len(data)}" in logged.text
    if dropped is not None:
        plural = "s" * (dropped != 1)
        assert f" {dropped} record{plural} after it dropped, the 3 before it kept" in logged.text
    commit(s, msgs(4, 4))
    s.close()
    assert reload(d).messages == msgs(1, 4)


# ---- format versions ------------------------------------------------------------------


def test_a_format_1_file_written_by_hand_from_the_documented_layout_loads(tmp_path):
    # Every later picchat must go on reading this file.
    d = tmp_path / "d"
    d.mkdir()
    records = [
        {"seq": 41, "time": T0, "from": "alice", "text": "hi", "origin": "tok", "id": "1"},
        {"text": "ünïcode", "from": "cron@pi", "seq": 42, "time": int(T0) + 1},
        {"seq": 43, "time": T0 + 2.5, "from": "bob", "text": ""},
    ]
    (d / "history-000000000041.log").write_bytes(by_hand("9f1c2e", 41, records))
    loaded = reload(d)
    assert loaded.history_id == "9f1c2e"
    assert loaded.messages == [
        Message(41, T0, "alice", "hi", "tok", "1"),
        Message(42, T0 + 1, "cron@pi", "ünïcode"),
        Message(43, T0 + 2.5, "bob", ""),
    ]
    assert isinstance(loaded.messages[1].time, float)


def test_the_store_writes_what_the_documented_layout_says(tmp_path):
    d = tmp_path / "d"
    s = new_store(d)
    commit(s, [msg(1, "hi", origin="t1", id="5")])
    s.close()
    data = (d / SEG1).read_bytes()
    head, meta, rest = data.split(b"\n", 2)
    assert head == b"PICCHAT-HISTORY 1"
    assert json.loads(meta) == {"history_id": "h1", "first_seq": 1}
    length, crc = struct.unpack_from("<II", rest)
    payload = rest[8:]
    assert (length, crc) == (len(payload), zlib.crc32(payload))
    assert json.loads(payload) == {
        "seq": 1,
        "time": T0 + 1,
        "from": "alice",
        "text": "hi",
        "origin": "t1",
        "id": "5",
    }


@pytest.mark.parametrize(
    "data",
    [
        by_hand("h9", 1, [{"seq": 1, "time": T0, "from": "a", "text": "b"}], version="2"),
        # A newer format's header need not be two lines: the version decides.
        b"PICCHAT-HISTORY 2\n\x00\x01binary header",
        b"PICCHAT-HISTORY 2\n",
        b"PICCHAT-HISTORY 17\n{}\n",
    ],
)
def test_a_newer_format_is_refused_by_name_and_left_alone(tmp_path, data):
    d = tmp_path / "d"
    d.mkdir()
    (d / SEG1).write_bytes(data)
    version = data.split(b"\n")[0].split()[1].decode()
    with pytest.raises(StoreError) as info:
        Store(d, 100).load()
    text = str(info.value)
    assert f"history format {version}" in text
    assert "newer picchat" in text
    assert "Upgrade picchat" in text and "move the state directory aside" in text
    assert (d / SEG1).read_bytes() == data  # never repaired, never removed


def test_a_newer_format_among_older_segments_is_refused(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / SEG1).write_bytes(layout(msgs(1, 2))[0])
    (d / "history-000000000003.log").write_bytes(b"PICCHAT-HISTORY 2\n")
    with pytest.raises(StoreError, match="format 2"):
        Store(d, 2).load()


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"hello, world\n", "not a picchat history file"),
        (b"\x7fELF\x02\x01\x01\x00" + bytes(100), "not a picchat history file"),
        (b"PICCHAT-HISTORX 1\n{}\n", "not a picchat history file"),
        (b"SQLite format 3\x00", "not a picchat history file"),
        (b"PICCHAT-HISTORY one\n{}\n", "unreadable format line"),
        (b"PICCHAT-HISTORY 0\n{}\n", "unreadable format line"),
        (b"PICCHAT-HISTORY -1\n{}\n", "unreadable format line"),
        (b"PICCHAT-HISTORY 1\n{broken\n", "header is damaged"),
        (b'PICCHAT-HISTORY 1\n{"history_id": "h"}\n', "header is damaged"),
        (b'PICCHAT-HISTORY 1\n{"history_id": "h", "first_seq": "x"}\n', "header is damaged"),
    ],
)
def test_an_unknown_or_damaged_file_is_refused_and_left_alone(tmp_path, data, says):
    d = tmp_path / "d"
    d.mkdir()
    (d / SEG1).write_bytes(data)
    with pytest.raises(StoreError, match=says):
        Store(d, 100).load()
    assert (d / SEG1).read_bytes() == data


def test_files_that_are_not_segments_are_ignored(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for name in ("history.log", "history-1.log", "notes.txt", "history-000000000001.log.bak"):
        (d / name).write_bytes(b"anything")
    loaded = reload(d)
    assert (loaded.history_id, loaded.messages) == (None, [])


def test_an_unreadable_state_directory_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="cannot read the state directory"):
        Store(tmp_path / "missing", 100).load()


# ---- a full disk --------------------------------------------------------------------


def test_a_write_refused_at_any_byte_is_cut_back_kept_pending_and_retried(tmp_path):
    size = sum(len(encode_record(m)) for m in msgs(3, 5))
    for space in range(size):
        d = tmp_path / f"space{space}"
        files = Recording()
        s = new_store(d, files=files)
        commit(s, msgs(1, 2))
        before = (d / SEG1).stat().st_size
        files.space = space
        with pytest.raises(OSError) as info:
            commit(s, msgs(3, 5))
        assert info.value.errno == errno.ENOSPC
        assert (d / SEG1).stat().st_size == before, space  # no part of a record left
        assert s.pending, space
        assert reload(d).messages == msgs(1, 2), space
        # Still full: a later turn's messages wait with them, in order.
        with pytest.raises(OSError):
            commit(s, msgs(6, 6))
        files.space = None  # space freed
        assert commit(s, msgs(7, 7)) == 5, space
        assert not s.pending
        s.close()
        assert reload(d).messages == msgs(1, 7), space


def test_a_refused_segment_header_leaves_no_file_and_is_retried(tmp_path):
    d = tmp_path / "d"
    files = Recording()
    s = new_store(d, segment_records=2, files=files)
    commit(s, msgs(1, 2))  # segment 1 is full: record 3 begins segment 3
    s.append(msg(3))
    size = len(header("h1", 3))
    for space in (0, 5, size - 1, size + 3):
        files.space = space
        with pytest.raises(OSError):
            s.commit(sync=True)
        assert s.pending
        if space < size:
            assert segments(d) == [SEG1], space  # the half-made segment is gone
        assert reload(d, 2).messages == msgs(1, 2)
    files.space = None
    assert s.commit(sync=True) == 1
    s.close()
    assert segments(d) == [SEG1, "history-000000000003.log"]
    assert reload(d, 2).messages == msgs(1, 3)


def test_a_refused_first_segment_header_is_retried(tmp_path):
    d = tmp_path / "d"
    files = Recording(space=3)
    s = new_store(d, files=files)
    with pytest.raises(OSError):
        commit(s, msgs(1, 1))
    assert segments(d) == []
    files.space = None
    assert commit(s, msgs(2, 2)) == 2
    s.close()
    assert reload(d).messages == msgs(1, 2)


def test_a_failing_fsync_is_reported(tmp_path):
    files = Recording()
    s = new_store(tmp_path / "d", files=files)
    commit(s, msgs(1, 1))
    files.fsync_error = errno.EIO
    with pytest.raises(OSError) as info:
        commit(s, msgs(2, 2))
    assert info.value.errno == errno.EIO
    files.fsync_error = None
    s.close()


def test_pending_records_are_bounded_and_numbering_survives_what_was_given_up(
    tmp_path, monkeypatch, logged
):
    d = tmp_path / "d"
    files = Recording()
    s = new_store(d, files=files)
    commit(s, msgs(1, 2))
    files.space = 0
    monkeypatch.setattr(store, "PENDING_MAX", 1000)
    logged.set_level(logging.WARNING, logger="picchat.store")
    for seq in range(3, 103):  # 100 records of ~60 bytes: far more than 1000 bytes
        with pytest.raises(OSError):
            commit(s, [msg(seq)])
        assert len(s._pending) <= 1000
    kept = [m for m in msgs(3, 102) if encode_record(m) in bytes(s._pending)]
    assert kept and kept[-1].seq == 102  # the newest are kept, the oldest given up
    assert bytes(s._pending) == b"".join(encode_record(m) for m in kept)
    assert "Gave up saving" in logged.text
    logged.clear()
    files.space = None
    assert commit(s, msgs(103, 103)) == len(kept) + 1
    s.close()
    # What was kept is on disk under its own numbers, and the history goes on
    # from there: no record is misread as damage, no seq is given twice.
    s = Store(d, 100)
    loaded = s.load()
    assert loaded.messages == [*kept, msg(103)]
    assert "damaged" not in logged.text
    commit(s, msgs(104, 104))
    s.close()
    assert reload(d).messages == [*kept, *msgs(103, 104)]


def test_records_given_up_are_skipped_in_the_next_segment_too(tmp_path, monkeypatch):
    # The same with the gap falling where a segment is full anyway.
    d = tmp_path / "d"
    files = Recording()
    s = new_store(d, segment_records=2, files=files)
    commit(s, msgs(1, 2))
    files.space = 0
    monkeypatch.setattr(store, "PENDING_MAX", 300)
    for seq in range(3, 20):
        with pytest.raises(OSError):
            commit(s, [msg(seq)])
    files.space = None
    s.commit(sync=True)
    s.close()
    loaded = reload(d, 2)
    assert loaded.messages and loaded.messages[-1].seq == 19
    seqs = [m.seq for m in loaded.messages]
    assert seqs == list(range(seqs[0], 20))


# ---- the hub: acknowledged once stored ---------------------------------------------------


def durable_net(messages: list[Message] | None = None, **kw) -> ResumeNet:
    net = ResumeNet(**kw)
    net.hub.keep_durably(messages or [])
    return net


def test_an_ack_waits_until_the_store_confirms(tmp_path):
    net = durable_net()
    net.plain(2)
    net.hello(1)
    net.say(1, "hello", "a")
    assert net.frames(1) == []  # no ack yet
    assert net.lines(2) == ["alice: hello"]  # delivered live meanwhile
    posted = net.hub.take_posted()
    assert [(m.seq, m.text, m.id, m.origin) for m in posted] == [(1, "hello", "a", "t1")]
    assert net.hub.take_posted() == []
    net.hub.confirm(True)
    assert net.frames(1) == [{"type": "ack", "id": "a", "seq": 1}]


def test_messages_not_stored_are_answered_with_an_error_not_an_ack():
    net = durable_net()
    net.hello(1)
    net.hello(2, "cron", member=False)  # as picchat-send
    net.say(1, "one", "a")
    net.say(2, "two", "b")
    assert [m.text for m in net.hub.take_posted()] == ["one", "two"]
    net.hub.confirm(False, "No space left on device")
    for cid, id_ in ((1, "a"), (2, "b")):
        frames = [f for f in net.frames(cid) if f["type"] != "msg"]
        assert len(frames) == 1
        error = frames[0]
        assert (error["type"], error["code"], error["id"]) == ("error", "not_stored", id_)
        assert "not saved to disk" in error["text"]
        assert "No space left on device" in error["text"]
    # The next turn's messages are acknowledged again once stored.
    net.say(2, "three", "c")
    net.hub.take_posted()
    net.hub.confirm(True)
    assert net.frames(2) == [{"type": "ack", "id": "c", "seq": 3}]


def test_every_message_is_handed_to_the_store_but_only_structured_ones_get_acks():
    net = durable_net()
    net.plain(1)
    net.hello(2)
    net.send(1, b"plain line\n")
    net.hub.post("fifo", "from the fifo", net.now)
    net.say(2, "no id")  # a msg without an id is not acknowledged
    assert [m.text for m in net.hub.take_posted()] == ["plain line", "from the fifo", "no id"]
    net.settle()
    net.hub.confirm(True)
    assert net.read(1) == b"" and net.read(2) == b""


def test_a_connection_gone_before_the_confirm_is_skipped():
    net = durable_net()
    net.hello(1)
    net.say(1, "bye soon", "a")
    net.hub.gone(1, "connection reset")
    net.hub.take_posted()
    net.hub.confirm(True)  # nothing to send it to, and no error
    assert 1 not in net.hub.peers


def test_without_a_store_acks_go_at_once_and_nothing_is_kept():
    net = ResumeNet()
    net.hello(1)
    net.say(1, "hi", "a")
    assert net.frames(1) == [{"type": "ack", "id": "a", "seq": 1}]
    assert net.hub.take_posted() == []


def test_history_from_disk_continues_numbering_and_recognises_its_senders():
    stored = [
        Message(1, T0, "alice", "mine 1", "tok-a", "1"),
        Message(2, T0 + 1, "bob", "his", "tok-b", "1"),
        Message(3, T0 + 2, "alice", "mine 2", "tok-a", "2"),
        Message(4, T0 + 3, "fifo", "from the fifo"),
    ]
    net = durable_net(stored)
    assert set(net.hub.sessions) >= {"tok-a", "tok-b"}
    frames = net.hello(1, session="tok-a", resume={"history_id": "h1", "seq": 0})
    assert frames[0]["seq"] == 4 and frames[0]["session"] == "tok-a"
    # Its own messages are not replayed to it; the others are, once, in order.
    assert chat(frames[1:]) == [(2, "bob", "his", True), (4, "fifo", "from the fifo", True)]
    assert not any(f["type"] == "gap" for f in frames)
    # A message resent after a lost ack is acknowledged with its seq, not posted again.
    net.say(1, "mine 2", "2")
    assert net.frames(1) == [{"type": "ack", "id": "2", "seq": 3}]
    assert net.hub.take_posted() == []
    # A new one is numbered after the stored history.
    net.say(1, "mine 3", "3")
    assert [(m.seq, m.origin, m.id) for m in net.hub.take_posted()] == [(5, "tok-a", "3")]
    net.hub.confirm(True)
    assert net.frames(1) == [{"type": "ack", "id": "3", "seq": 5}]


def test_sessions_from_disk_are_bounded_by_the_sessions_setting():
    stored = [Message(i, T0 + i, "x", "t", f"tok{i}", "1") for i in range(1, 11)]
    net = durable_net(stored, max_sessions=3)
    assert set(net.hub.sessions) == {"tok8", "tok9", "tok10"}  # the newest senders


def test_one_store_per_directory_until_it_is_closed(tmp_path):
    d = tmp_path / "d"
    first = new_store(d)
    commit(first, msgs(1, 2))
    second = Store(d, 100)
    with pytest.raises(store.StoreBusy, match="in use by another picchat-server"):
        second.load()
    assert segments(d) == ["history-000000000001.log"]  # the loser touched nothing
    first.close()
    assert second.load().messages == msgs(1, 2)
    second.close()
