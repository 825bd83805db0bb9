"""Listening sockets: TCP and the local Unix socket.

Opening them is where foreseeable operating conditions show up (port in use,
address not available, a socket file left by a crash, a live server on the
same path); each becomes a ``StartupError`` with one line that says what to do.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import pwd
import socket
import stat
import struct
from pathlib import Path

BACKLOG = 512
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # linux/in.h
IPV6_FREEBIND = 78  # linux/in6.h


class StartupError(Exception):
    """A listener cannot be opened; exit 69 (EX_UNAVAILABLE)."""


def open_tcp(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if not ipaddress.ip_address(addr[0].split("%")[0]).is_loopback:
            # At boot the address may not be up yet (Wi-Fi, DHCP): bind anyway,
            # and serve it once it appears, instead of failing to start.
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        where = f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            hint = "another program (another picchat-server?) uses it; stop it or choose --port"
        elif exc.errno == errno.EADDRNOTAVAIL:
            hint = "this machine has no such address (yet); check --host"
        elif exc.errno == errno.EACCES:
            hint = "ports below 1024 need privileges; choose --port 1024 or above"
        else:
            hint = "check --host and --port"
        raise StartupError(f"cannot listen on {where}: {exc.strerror}: {hint}") from None
    sock.setblocking(False)
    return sock


def tcp_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _prepare_directory(path: Path) -> None:
    """Create the socket's directory; refuse a /tmp one that isn't ours alone."""
    parent = path.parent
    shared_tmp = parent.parent == Path("/tmp")
    try:
        parent.mkdir(mode=0o700 if shared_tmp else 0o755, parents=not shared_tmp, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create {parent} for the local socket: {exc.strerror}") from None
    if shared_tmp:
        # Anyone can create names in /tmp: make sure nobody planted this one.
        st = os.lstat(parent)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise StartupError(
                f"{parent} is not a private directory of this user; remove it, or choose --socket"
            )


def open_unix(path: Path) -> socket.socket:
    """Listen on ``path`` (mode 0660), replacing a stale socket file."""
    _prepare_directory(path)
    if path.exists() or path.is_symlink():
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"{path} exists and is not a socket; remove it or choose --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()  # left by a server that died: nobody listens on it
        except OSError as exc:
            raise StartupError(f"cannot check the existing socket {path}: {exc.strerror}") from None
        else:
            raise StartupError(
                f"another server is already listening on {path}; stop it or choose --socket"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # no window in which the socket is more open than 0660
    try:
        sock.bind(str(path))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o660)
    sock.setblocking(False)
    return sock


def unix_peer(sock: socket.socket) -> tuple[str, str | None]:
    """('local uid 1000 pid 4242', 'pi') from SO_PEERCRED: the address for the
    log, and the user name (None for root, or if the kernel would not say)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return "local", None
    pid, uid, _ = struct.unpack("3i", creds)
    if uid == 0:
        user = None  # root may post under any name
    else:
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = f"uid{uid}"
    return f"local uid {uid} pid {pid}", user


def set_keepalive(sock: socket.socket, idle: int, interval: int, count: int) -> None:
    """Let TCP find peers that vanished without a FIN (cable out, Wi-Fi gone)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
