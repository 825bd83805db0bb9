"""journald's native protocol for chat lines with structured fields."""

from __future__ import annotations

import socket

from picchat import logs


def parse(datagram: bytes) -> dict[str, str]:
    """A reader of the native protocol, as journald reads it."""
    fields, i = {}, 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = nl + 1
        else:
            key = line
            size = int.from_bytes(datagram[nl + 1 : nl + 9], "little")
            value = datagram[nl + 9 : nl + 9 + size]
            assert datagram[nl + 9 + size : nl + 10 + size] == b"\n"
            i = nl + 10 + size
        fields[key.decode()] = value.decode()
    return fields


def test_simple_and_multiline_values():
    data = logs.journal_datagram({"MESSAGE": "alice: hi", "X": "two\nlines", "E": ""})
    assert parse(data) == {"MESSAGE": "alice: hi", "X": "two\nlines", "E": ""}
    assert b"X\n" + (9).to_bytes(8, "little") + b"two\nlines\n" in data


def test_chat_records_go_to_the_journal_with_fields(tmp_path):
    path = str(tmp_path / "journal.sock")
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(path)
    journal.settimeout(2)
    native = logs.JournalNative(path)
    assert native.send(logs.INFO, "alice: hi", {"SENDER": "alice", "SEQ": "7", "ORIGIN": "unix"})
    got = parse(journal.recv(65536))
    assert got == {
        "MESSAGE": "alice: hi",
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "picchat-server",
        "PICCHAT_SENDER": "alice",
        "PICCHAT_SEQ": "7",
        "PICCHAT_ORIGIN": "unix",
    }
    native.close()
    journal.close()


def test_without_a_journal_the_line_goes_to_stderr(tmp_path):
    import os

    r, w = os.pipe()
    writer = logs.StderrWriter(w, 4096)
    handler = logs.WriterHandler(writer, True, logs.JournalNative(str(tmp_path / "absent")))
    fields = {"SENDER": "bob", "SEQ": "1", "ORIGIN": "tcp"}
    record = logs.Record("picchat.chat", logs.INFO, "bob: yo", fields)
    handler.emit(record)
    assert os.read(r, 4096) == b"<6>bob: yo\n"
    os.close(r)
    writer.close()
    os.close(w)
