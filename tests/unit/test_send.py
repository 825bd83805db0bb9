"""picchat-send's pieces that need no server."""

from __future__ import annotations

import socket

from picchat import send
from picchat.room import NAME_MAX, name_problem


def test_default_name_is_user_at_host(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "pi.local")
    monkeypatch.setattr(send.getpass, "getuser", lambda: "ann")
    assert send.default_name() == "ann@pi"


def test_default_name_fits_a_long_hostname(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "raspberrypi-kitchen-livingroom-2")
    monkeypatch.setattr(send.getpass, "getuser", lambda: "someone")
    name = send.default_name()
    assert len(name) == NAME_MAX
    assert name_problem(name) is None
