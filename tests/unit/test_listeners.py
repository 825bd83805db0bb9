"""Opening listeners: free bind for addresses not up yet, peer credentials."""

from __future__ import annotations

import os
import pwd
import socket

from picchat.endpoints import listeners


def test_a_loopback_listener_is_not_free_bound():
    sock = listeners.open_tcp("127.0.0.1", 0)
    try:
        assert sock.getsockopt(socket.IPPROTO_IP, listeners.IP_FREEBIND) == 0
    finally:
        sock.close()


def test_an_address_this_machine_lacks_can_be_bound_at_boot():
    # 192.0.2.1 (TEST-NET-1) is on no interface here: without IP_FREEBIND,
    # bind() fails with EADDRNOTAVAIL. Nothing is ever sent to it.
    sock = listeners.open_tcp("192.0.2.1", 0)
    try:
        assert sock.getsockopt(socket.IPPROTO_IP, listeners.IP_FREEBIND) == 1
    finally:
        sock.close()


def test_unix_peer_names_the_user_behind_a_local_connection():
    a, b = socket.socketpair()
    try:
        address, user = listeners.unix_peer(a)
        assert address == f"local uid {os.getuid()} pid {os.getpid()}"
        if os.getuid() == 0:
            assert user is None  # root may post under any name
        else:
            assert user == pwd.getpwuid(os.getuid()).pw_name
    finally:
        a.close()
        b.close()
