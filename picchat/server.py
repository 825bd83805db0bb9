"""The composition root: settings -> loop + hub + endpoints, and the socket I/O.

Everything here is I/O: accepting, recv/send, closing, signals, timers. The
decisions (who gets what, names, limits) are the hub's and the room's.

The path of a line: the loop reports a socket readable -> ``_readable``
recv()s up to 64 KiB -> ``hub.receive`` parses every complete line of it and
queues the encoded frames on the recipients' output buffers -> at the end of
the turn ``_flush`` does one send() per connection with new output; what the
kernel does not take waits for POLLOUT.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

from . import __version__, logs, systemd
from .auth import Gate, SecretError, is_loopback, load_tokens
from .config import SETTINGS, ConfigError, Settings, parse_serial_spec, socket_path, tls_host
from .endpoints.fifo import FifoReader
from .endpoints.listeners import (
    StartupError,
    open_tcp,
    open_unix,
    set_keepalive,
    tcp_address,
    unix_peer,
)
from .hub import Hub
from .loop import Loop, Timer
from .ratelimit import TokenBucket
from .room import CONSOLE_NAME
from .sanitize import clean_bytes

TYPE_CHECKING = False  # (typing itself is not imported: start-up time and memory)
if TYPE_CHECKING:  # ssl is imported only when there is a TLS listener (start-up time)
    import ssl

    from .endpoints.console import Console
    from .endpoints.serial import SerialBridge
    from .store import Store
    from .tls import TlsStream

log = logs.get(__name__)

# One recv() takes no more than one turn's budget of input, so a connection
# paused with a backlog holds at most this plus max-line bytes of input: 8 KiB
# by default, times max-clients in the worst case (docs/robustness.md).
RECV_SIZE = 4096
# One connection's input handled per loop turn, at most: a burst of thousands
# of short lines becomes slices with a flush of everyone's output between
# them, instead of one turn that queues megabytes for every reader.
LINES_PER_TURN = 100
BYTES_PER_TURN = RECV_SIZE
ACCEPT_BATCH = 64  # connections accepted per readiness event, so reads go on
EMFILE_PAUSE = 1.0  # seconds without accepting when even the spare fd is gone
STORE_RETRY = 5.0  # seconds between attempts to save what the disk refused
REFUSALS_REPORT = 10.0  # seconds: refused connections are logged once, then summed up
FD_RESERVE = 64  # fds beyond max-clients for listeners, the FIFO, serial lines, logs
# Settings a reload (SIGHUP) applies to a running server; the others need a restart.
LIVE_SETTINGS = (
    "fifo_name",
    "max_queue",
    "max_total_queue",
    "history",
    "sync",
    "sync_interval",
    "max_clients",
    "sessions",
    "dedupe_window",
    "presence_interval",
    "shutdown_timeout",
    "log_level",
    "log_chat",
    "token_file",
    "allow_anonymous",
    "auth_backoff",
    "login_timeout",
    "max_per_address",
    "max_tls_clients",
    "per_address_loopback",
    "rate_limit",
    "rate_burst",
)
FIFO_KEY = -1  # the FIFO's rate-limit bucket among the serial lines' (keyed by their cid)
CONSOLE_CID = 0  # the hub's id for the server's own terminal (sockets start at 1)


class Conn:
    """One accepted socket, as the I/O layer sees it."""

    __slots__ = (
        "sock",
        "address",
        "way",
        "user",
        "auth",
        "tls",
        "opened",
        "host",
        "bucket",
        "login_timer",
        "since",
        "writing",
    )

    def __init__(
        self, sock: socket.socket, address: str, way: str, user: str | None, auth: bool
    ) -> None:
        self.sock = sock
        self.address = address
        self.way = way  # tcp, unix or tls
        self.user = user  # the local user behind a Unix socket connection
        self.auth = auth  # must send a token before it is in the room
        self.tls: TlsStream | None = None
        self.opened = True  # known to the hub (a TLS peer: once its handshake is done)
        self.host: str | None = None  # its address, if counted for max-per-address
        self.bucket: TokenBucket | None = None  # its rate limit, from its first line on
        self.login_timer: Timer | None = None  # its login-timeout, cancelled when it goes
        self.since = 0.0  # when it was accepted (loop time), for login-timeout
        self.writing = False  # output waits: the loop watches for POLLOUT


class Server:
    def __init__(
        self,
        settings: Settings,
        loop: Loop | None = None,
        writer: logs.StderrWriter | None = None,
        reload: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        self._reload = reload  # reads the settings anew, for SIGHUP
        self.notifier = systemd.Notifier()
        self.loop = loop or Loop()
        self._writer = writer
        self._conns: dict[int, Conn] = {}
        self._on_readable = self._readable  # one bound method for every connection
        self._per_address: dict[str, int] = {}  # open connections per limited address
        self._tls_count = 0  # TLS connections open (max-tls-clients)
        self._refused: dict[str, int] = {}  # why -> connections refused since last reported
        self._spare_fd = -1  # closed to accept-and-close when out of fds
        self._store: Store | None = None  # the history on disk, if there is a state directory
        self._store_problem: str | None = None  # why the last commit failed, until one works
        self._sync_timer: Timer | None = None
        # Rate limits of the local inputs: the FIFO's (FIFO_KEY) and each serial line's (its cid).
        self._local_buckets: dict[int, TokenBucket] = {}
        self._listeners: list[tuple[socket.socket, str]] = []  # (sock, "tcp"/"unix"/"tls")
        self._tls_context: ssl.SSLContext | None = None
        self._unix_path: Path | None = None
        self._unix_ino: tuple[int, int] | None = None
        self._fifo: FifoReader | None = None
        self._console: Console | None = None
        self._serial: dict[int, SerialBridge] = {}  # cid -> bridge (kept across reopens)
        self._paused: set[int] = set()  # connections whose input waits for a later turn
        self._ended: set[int] = set()  # connections whose peer closed its end
        self._next_cid = 1
        self._flush_scheduled = False  # a when-quiet flush is asked for
        self._presence_timer: Timer | None = None
        self._stopping = False
        self._stop_timer: Timer | None = None
        self.addresses: list[str] = []
        self.gate = Gate((), settings.auth_backoff)
        self.hub = Hub(
            history_id=os.urandom(8).hex(),
            max_line=settings.max_line,
            gate=self.gate,
            **self._hub_limits(),
        )

    # ---- start and stop ----------------------------------------------------

    def start(self) -> None:
        """Open every listener (raises StartupError) and install signal handlers."""
        s = self.settings
        _raise_fd_limit(s.max_clients)
        if not s.host and socket_path(s) is None and not s.fifo:
            raise ConfigError("nothing to listen on: set host, socket or fifo")
        self.gate.tokens = _tokens(s)
        if s.tls_port:
            try:
                from .tls import server_context

                self._tls_context = server_context(s.tls_cert, s.tls_key)
            except SecretError as exc:
                raise ConfigError(str(exc)) from None
        self._store = self._open_store()
        try:
            passed = systemd.listen_fds()
            if passed:
                self._adopt(passed)
            else:
                self._open_listeners()
            self._check_exposure(s, self.gate.tokens)
            if s.serial:  # imported only when needed, like the store and the console
                from .endpoints.serial import SerialBridge
            for text in s.serial:
                spec = parse_serial_spec(text)
                bridge = SerialBridge(
                    spec,
                    self.loop,
                    retry=s.serial_retry,
                    force=s.serial_force,
                    max_line=s.max_line,
                    on_open=self._serial_open,
                    on_line=self._serial_line,
                    on_close=self._serial_close,
                    on_drained=self._serial_output,
                )
                bridge.check()
                bridge.cid = self._next_cid
                self._next_cid += 1
                self._serial[bridge.cid] = bridge
                self.addresses.append(f"serial {spec.device}")
        except BaseException:
            self.close()
            raise
        self._spare_fd = _open_spare()
        if self._writer is not None:
            self._writer.on_blocked = self._log_blocked
            writer = self._writer
            self._writer.on_pending = lambda: self.loop.call_soon(writer.flush)
        logs.hold_chat(self._schedule_flush)  # chat is logged after it is sent
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.stop)
        if self._reload is not None:
            self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        if s.console == "on" or (s.console == "auto" and os.isatty(0)):
            from .endpoints import console  # only with a terminal (start-up memory)

            if console.wanted(s.console):
                self.hub.open_local(CONSOLE_CID, CONSOLE_NAME, "console", announce=False)
                self._console = console.Console(
                    self.loop, CONSOLE_NAME, self._console_line, self.stop
                )
                logs.divert(self._console.show)
        if self._store is None:
            log.warning(
                "History is kept in memory only, and starts afresh at every restart: set "
                "state-dir to keep it (the systemd service does, with StateDirectory=)"
            )
        log.info(
            "Server is running and waiting for connections on %s", " and ".join(self.addresses)
        )
        for bridge in self._serial.values():
            bridge.start()
        # Every listener is open: systemd may start what depends on us.
        self.notifier.ready(self._status())
        interval = systemd.watchdog_interval()
        if interval is not None:
            self._watchdog(interval)

    def _status(self) -> str:
        n, m = self.hub.members, self.hub.messages
        return f"{n} client{'s' if n != 1 else ''}, {m} message{'s' if m != 1 else ''}"

    def _watchdog(self, interval: float) -> None:
        # The only wake-up of an idle loop, and only under a systemd watchdog:
        # a loop that stops turning stops pinging, and systemd restarts us.
        self.notifier.watchdog()
        self.loop.call_later(interval, lambda: self._watchdog(interval))

    def reload(self) -> None:
        """SIGHUP: read the settings again; apply what can change live."""
        assert self._reload is not None
        self.notifier.reloading()
        try:
            new = self._reload()
            tokens = _tokens(new)
            self._check_exposure(new, tokens)
        except ConfigError as exc:
            log.error("Reload failed, keeping the running settings: %s", exc)
            self.notifier.ready(self._status())
            return
        old = self.settings
        changed = [f for f in LIVE_SETTINGS if getattr(new, f) != getattr(old, f)]
        later = [
            name.replace("_", "-")
            for name in SETTINGS
            if name not in LIVE_SETTINGS and getattr(new, name) != getattr(old, name)
        ]
        self.settings = old.replace(**{f: getattr(new, f) for f in changed})
        self.hub.reconfigure(**self._hub_limits())
        if tokens != self.gate.tokens:  # the file may change while its name does not
            changed.append("tokens")
        self.gate.tokens = tokens
        self.gate.backoff_max = self.settings.auth_backoff
        if self._store is not None:
            self._store.segment_records = max(1, self.settings.history)
        self._local_buckets.clear()  # made afresh, with the new rate, at their next line
        for conn in self._conns.values():
            if conn.bucket is not None:
                if self.settings.rate_limit:
                    conn.bucket.reconfigure(self.settings.rate_limit, self.settings.rate_burst)
                else:
                    conn.bucket = None
        logs.set_level(self.settings.log_level)
        if changed:
            log.info("Reloaded: %s changed", ", ".join(f.replace("_", "-") for f in changed))
        else:
            log.info("Reloaded: no setting that can change while running has changed")
        if later:
            log.warning("These changed settings need a restart: %s", ", ".join(later))
        self.notifier.ready(self._status())

    def _hub_limits(self) -> dict[str, object]:
        """The hub's settings that a reload can change, as its keyword arguments."""
        s = self.settings
        return {
            "history_limit": s.history,
            "max_queue": s.max_queue,
            "log_chat": s.log_chat,
            "max_sessions": s.sessions,
            "dedupe_window": s.dedupe_window,
            "max_total": s.max_total_queue,
            "reserved_names": self._reserved_names(),
        }

    def _reserved_names(self) -> tuple[str, ...]:
        """Names no client may take: the FIFO's (ours or systemd's) and the serial lines'."""
        s = self.settings
        fifo = (s.fifo_name,) if s.fifo or self._fifo is not None else ()
        return fifo + tuple(parse_serial_spec(spec).name for spec in s.serial)

    def _open_store(self) -> Store | None:
        s = self.settings
        directory = s.state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        if not directory:
            return None  # said once the server runs (start-up errors come alone)
        path = Path(directory)
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the state directory {path}: {exc.strerror}") from None
        from .store import Store, StoreBusy, StoreError

        store = Store(path, s.history)
        try:
            loaded = store.load()
        except StoreBusy as exc:
            raise StartupError(str(exc)) from None
        except StoreError as exc:
            store.close()
            raise ConfigError(str(exc)) from None
        except OSError as exc:
            store.close()
            raise ConfigError(f"cannot repair the history in {path}: {exc.strerror}") from None
        if loaded.history_id is not None:
            self.hub.room.history_id = loaded.history_id
            log.info("History: %d messages kept in %s", len(loaded.messages), path)
        else:
            store.start(self.hub.room.history_id, 1)
            log.info("History: a new one, kept in %s", path)
        self.hub.keep_durably(loaded.messages)
        try:
            store.ready(self.hub.room.seq + 1)
        except OSError as exc:
            store.close()
            raise ConfigError(f"cannot write the history in {path}: {exc.strerror}") from None
        return store

    def _commit(self, retry: bool = False) -> None:
        """The group commit: the messages of this turn go to disk (one write,
        one fsync) before any of their acks is sent. What the disk refused is
        tried again with the next messages, or by a timer (``retry``)."""
        store = self._store
        # Called before every send: nothing to take is the common case.
        if store is None or not (self.hub.posted or (retry and store.pending)):
            return
        posted = self.hub.take_posted()
        for msg in posted:
            store.append(msg)
        try:
            store.commit(sync=self.settings.sync == "commit")
        except OSError as exc:
            problem = exc.strerror or str(exc)
            if self._store_problem is None:
                log.error(
                    "Cannot save the history in %s (%s): messages are delivered, and their "
                    "senders told they are not saved",
                    store.directory,
                    problem,
                )
            self._store_problem = problem
            self.hub.confirm(False, problem)
            if self._sync_timer is None:  # try again even if nobody posts meanwhile
                self._sync_timer = self.loop.call_later(STORE_RETRY, self._sync)
            self._schedule_flush()  # the not_stored errors
            return
        if self._store_problem is not None:
            log.warning("Saving the history to disk works again")
            self._store_problem = None
        self.hub.confirm(True)
        if store.unsynced and self._sync_timer is None:
            self._sync_timer = self.loop.call_later(self.settings.sync_interval, self._sync)
        if posted:
            self._schedule_flush()  # the acks

    def _sync(self) -> None:
        self._sync_timer = None
        if self._store is None:
            return
        if self._store.pending:  # the disk refused them: try again
            self._commit(retry=True)
            return
        try:
            self._store.sync()
        except OSError as exc:
            log.error("Cannot fsync the history: %s", exc.strerror)

    def _check_exposure(self, s: Settings, tokens: list[bytes]) -> None:
        """Refuse to serve anyone beyond this machine without a token, unless
        told to (allow-anonymous): mosquitto's lesson, with the fix spelled out."""
        if s.allow_anonymous or tokens:
            return
        for sock, kind in self._listeners:
            if kind != "unix" and not is_loopback(sock.getsockname()[0]):
                where = tcp_address(sock)
                raise ConfigError(
                    f"refusing to listen on {where} without authentication: anyone who can "
                    "reach it could read and post. Either add a token: token-file = "
                    '"/etc/picchat/token" (one token per line, e.g. from `openssl rand -hex '
                    "24`, readable only by the server's user) or PICCHAT_TOKEN in the "
                    "environment; or set allow-anonymous = true to accept the risk. "
                    "(docs/security.md)"
                )

    def _open_listeners(self) -> None:
        s = self.settings
        if s.host:
            sock = open_tcp(s.host, s.port)
            self._add_listener(sock, "tcp")
            self.addresses.append(tcp_address(sock))
        if s.tls_port and tls_host(s):
            sock = open_tcp(tls_host(s), s.tls_port)
            self._add_listener(sock, "tls")
            self.addresses.append(f"{tcp_address(sock)} (TLS)")
        path = socket_path(s)
        if path is not None:
            sock = open_unix(path)
            st = os.stat(path)
            self._unix_path, self._unix_ino = path, (st.st_dev, st.st_ino)
            self._add_listener(sock, "unix")
            self.addresses.append(str(path))
        if s.fifo:
            self._fifo = FifoReader(Path(s.fifo), self.loop, self._fifo_line, s.max_line)
            self.addresses.append(f"FIFO {s.fifo}")

    def _adopt(self, passed: list[tuple[int, str]]) -> None:
        """Serve on what systemd opened for us (socket activation). Each fd is
        matched by its FileDescriptorName= ("tcp", "tls", "unix", "fifo"), else by kind."""
        for fd, name in passed:
            mode = os.fstat(fd).st_mode
            if stat.S_ISFIFO(mode) or name == "fifo":
                path = Path(self.settings.fifo or os.readlink(f"/proc/self/fd/{fd}"))
                self._fifo = FifoReader(
                    path, self.loop, self._fifo_line, self.settings.max_line, fd
                )
                self.addresses.append(f"FIFO {path} (from systemd)")
                # Reserve its sender name, as --fifo does: nobody may pose as it.
                self.hub.room.reserved.add(self.settings.fifo_name.casefold())
                continue
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            if sock.family == socket.AF_UNIX or name == "unix":
                self._add_listener(sock, "unix")
                self.addresses.append(f"{sock.getsockname()} (from systemd)")
            elif name == "tls":
                if self._tls_context is None:
                    raise ConfigError(
                        "systemd passed a socket named tls: set tls-port, tls-cert and tls-key"
                    )
                self._add_listener(sock, "tls")
                self.addresses.append(f"{tcp_address(sock)} (TLS, from systemd)")
            else:
                self._add_listener(sock, "tcp")
                self.addresses.append(f"{tcp_address(sock)} (from systemd)")

    def run(self) -> None:
        try:
            self.loop.run()
        finally:
            self.close()

    def stop(self) -> None:
        """Stop accepting, tell everyone, flush within shutdown_timeout, then end."""
        if self._stopping:  # a second Ctrl-C: do not wait any longer
            log.warning("Stopping now, without waiting for slow clients")
            self._finish()
            return
        self._stopping = True
        self.notifier.stopping()
        for cid, conn in list(self._conns.items()):
            if not conn.opened:  # mid-handshake: nothing to tell it
                self._drop(cid, "server stopped")
        n = len(self._conns)
        log.info("Shutting down: telling %d connection%s", n, "" if n == 1 else "s")
        self._close_listeners()
        self.hub.shutdown("Server is shutting down. Bye!")
        # The goodbyes go out at the end of this turn (not once input is
        # quiet); then _flush_dirty calls _maybe_finished, which ends the loop
        # if no connection is left to wait for: the console and serial lines
        # have had theirs by then.
        self._schedule_flush()
        self.loop.hurry()
        self._stop_timer = self.loop.call_later(self.settings.shutdown_timeout, self._finish)

    def _maybe_finished(self) -> None:
        if self._stopping and not self._conns:
            self._finish()

    def _finish(self) -> None:
        for cid in list(self._conns):
            self._drop(cid, "server stopped")
        if self._stop_timer is not None:
            self._stop_timer.cancel()
        self.loop.stop()

    def close(self) -> None:
        """Release every fd (idempotent)."""
        logs.stop_holding_chat(self._schedule_flush)  # the console still shows them
        if self._console is not None:
            logs.divert(None)
            self._console.close()
            self._console = None
        self._close_listeners()
        for cid in list(self._conns):
            self._drop(cid, "server stopped")
        if self._fifo is not None:
            self._fifo.close()
            self._fifo = None
        for bridge in self._serial.values():
            bridge.close()
        self._serial.clear()
        if self._spare_fd >= 0:
            os.close(self._spare_fd)
            self._spare_fd = -1
        if self._store is not None:
            self._commit(retry=True)
            if self._store.pending:
                log.error(
                    "Stopping with messages the disk refused (%s): they are not saved",
                    self._store_problem,
                )
            self._store.close()
            log.info(
                "History saved: %d messages written, %d fsyncs since start",
                self._store.written,
                self._store.fsyncs,
            )
            self._store = None
        if self._writer is not None:
            self.loop.forget(self._writer.fd)
            self._writer.on_blocked = None
            self._writer.on_pending = None
            self._writer.flush()

    def _close_listeners(self) -> None:
        for sock, _ in self._listeners:
            self.loop.forget(sock.fileno())
            sock.close()
        self._listeners.clear()
        if self._unix_path is not None:
            # Remove the socket file only if it is still ours (not a newer server's).
            try:
                st = os.stat(self._unix_path)
                if (st.st_dev, st.st_ino) == self._unix_ino:
                    self._unix_path.unlink()
            except OSError:
                pass
            self._unix_path = None

    # ---- accepting -------------------------------------------------------------

    def _add_listener(self, sock: socket.socket, kind: str) -> None:
        self._listeners.append((sock, kind))
        self.loop.add_reader(sock.fileno(), lambda: self._accept(sock, kind))

    def _accept(self, listener: socket.socket, kind: str) -> None:
        s = self.settings
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    if not self._out_of_fds(listener, kind, exc):
                        return
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                raise
            sock.setblocking(False)
            user = None
            if kind == "unix":
                address, user = unix_peer(sock)
                auth = False  # the socket file's permissions are its access control
            else:
                address = (
                    f"{addr[0]}:{addr[1]}"
                    if sock.family == socket.AF_INET
                    else (f"[{addr[0]}]:{addr[1]}")
                )
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                set_keepalive(sock, s.keepalive_idle, s.keepalive_interval, s.keepalive_count)
                auth = not s.allow_anonymous and not is_loopback(addr[0])
            if len(self._conns) >= s.max_clients:
                self._refuse(
                    sock,
                    kind,
                    f"{s.max_clients} connections already (max-clients)",
                    f"server full ({s.max_clients} connections); try later",
                )
                continue
            if kind == "tls" and self._tls_count >= s.max_tls_clients:
                self._refuse(
                    sock,
                    kind,
                    f"{s.max_tls_clients} TLS connections already (max-tls-clients)",
                    "",
                )
                continue
            host = addr[0] if kind != "unix" and self._limited(addr[0]) else None
            if host is not None and self._per_address.get(host, 0) >= s.max_per_address:
                self._refuse(
                    sock,
                    kind,
                    f"{s.max_per_address} connections from one address already (max-per-address)",
                    f"too many connections from your address ({s.max_per_address}); try later",
                )
                continue
            if host is not None:
                self._per_address[host] = self._per_address.get(host, 0) + 1
            cid = self._next_cid
            self._next_cid += 1
            conn = self._conns[cid] = Conn(sock, address, kind, user, auth)
            conn.host = host
            if kind == "tls":
                assert self._tls_context is not None
                self._tls_count += 1
                conn.tls = self._tls_stream(self._tls_context)
                conn.opened = False  # the hub hears of it once the handshake is done
            else:
                self.hub.open(cid, address, kind, user, auth)
            # Time to finish the handshake and /auth; for a plain anonymous
            # connection the clock starts now too, but the timer only once it
            # begins a first line (_arm_login): an idle listener costs no
            # timer and no wake-up. A silent peer delays no one meanwhile.
            conn.since = self.loop.time()
            if conn.tls is not None or auth:
                self._arm_login(cid, conn)
            self.loop.add_reader(sock.fileno(), self._on_readable, cid)
            self._after_hub()

    def _limited(self, host: str) -> bool:
        s = self.settings
        return s.max_per_address > 0 and (s.per_address_loopback or not is_loopback(host))

    def _out_of_fds(self, listener: socket.socket, kind: str, exc: OSError) -> bool:
        """accept() failed for want of fds: close the spare fd, accept the
        waiting connection, tell it, close it, take the spare back. True if
        accepting may go on (the backlog shrank); False if even that failed,
        and accepting pauses (never a busy loop on a readable listener)."""
        if self._spare_fd >= 0:
            os.close(self._spare_fd)
            self._spare_fd = -1
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                # Nobody is waiting: accept() wanted an fd before it looked.
                self._spare_fd = _open_spare()
                return False
            except OSError:
                sock = None
            if sock is not None:
                self._refuse(
                    sock,
                    kind,
                    f"out of file descriptors ({exc.strerror})",
                    "server busy (out of file descriptors); try later",
                )
            # Only now: the refused socket had the spare's fd until _refuse closed it.
            self._spare_fd = _open_spare()
            if sock is not None and self._spare_fd >= 0:
                return True
        log.error(
            "Out of file descriptors (%s); not accepting for %.0f s", exc.strerror, EMFILE_PAUSE
        )
        self.loop.remove_reader(listener.fileno())
        self.loop.call_later(EMFILE_PAUSE, lambda: self._resume_accept(listener, kind))
        return False

    def _refuse(self, sock: socket.socket, kind: str, why: str, told: str) -> None:
        """Close a connection we will not serve, with a one-line notice (not
        on TLS: plain text would only confuse its handshake). Logged once per
        burst: the first, then a count every REFUSALS_REPORT seconds."""
        if kind != "tls":
            try:
                sock.send(f"! {told}\n".encode())
            except OSError:
                pass
        sock.close()
        if not self._refused:
            self.loop.call_later(REFUSALS_REPORT, self._report_refused)
        if why not in self._refused:
            log.warning("Refusing new connections: %s", why)
            self._refused[why] = 0
        else:
            self._refused[why] += 1

    def _report_refused(self) -> None:
        refused, self._refused = self._refused, {}
        for why, count in refused.items():
            if count:
                log.warning("Refused %d more connection%s: %s", count, "s" * (count != 1), why)

    @staticmethod
    def _tls_stream(context: ssl.SSLContext) -> TlsStream:
        from .tls import TlsStream

        return TlsStream(context, server_side=True)

    def _resume_accept(self, listener: socket.socket, kind: str) -> None:
        if any(listener is sock for sock, _ in self._listeners):
            self.loop.add_reader(listener.fileno(), lambda: self._accept(listener, kind))

    def _arm_login(self, cid: int, conn: Conn) -> None:
        left = conn.since + self.settings.login_timeout - self.loop.time()
        conn.login_timer = self.loop.call_later(
            max(0.0, left), lambda: self._login_deadline(cid, conn)
        )

    def _login_deadline(self, cid: int, conn: Conn) -> None:
        if self._conns.get(cid) is not conn:
            return
        if not conn.opened:
            what = "finish its TLS handshake"
        elif self.hub.authenticating(cid):
            what = "authenticate"
        elif self.hub.first_line_pending(cid):
            what = "finish its first line"
        else:
            return
        log.info(
            "Dropped %s: it did not %s within %g s (login-timeout)",
            conn.address,
            what,
            self.settings.login_timeout,
        )
        self._drop(cid, "login timeout")
        self._after_hub()

    # ---- reading -----------------------------------------------------------------

    def _readable(self, cid: int) -> None:
        conn = self._conns[cid]
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:  # reset by peer and the like: foreseeable
            self._drop(cid, exc.strerror or "connection error")
            self._after_hub()
            return
        eof = not data
        if conn.tls is not None:
            plain = self._tls_input(cid, conn, data)
            if plain is None:
                return
            data, eof = plain, conn.tls.eof
        if eof:
            self._ended.add(cid)
            self.loop.remove_reader(conn.sock.fileno())
        now = time.time()
        before = self.hub.lines_read(cid)
        try:
            if data:
                self.hub.receive(cid, data, now, self._allowed(conn), BYTES_PER_TURN)
            if eof:
                self.hub.receive(cid, b"", now, self._allowed(conn), BYTES_PER_TURN)
        except Exception:
            self._internal_error(cid)
            return
        self._spent(conn, cid, before)
        if conn.login_timer is None and self.hub.first_line_pending(cid):
            self._arm_login(cid, conn)  # a first line begun: it has until the deadline
        self._input_done(cid)

    def _allowed(self, conn: Conn) -> int:
        """Lines this connection may send now: a turn's slice, or fewer if
        its rate limit says so (on the loop's monotonic clock)."""
        s = self.settings
        now = self.loop.time()
        if not s.rate_limit:
            return LINES_PER_TURN
        if conn.bucket is None:
            conn.bucket = TokenBucket(s.rate_limit, s.rate_burst, now)
        return min(LINES_PER_TURN, conn.bucket.available(now))

    def _spent(self, conn: Conn, cid: int, before: int) -> None:
        if conn.bucket is not None:
            conn.bucket.spend(self.hub.lines_read(cid) - before)

    def _tls_input(self, cid: int, conn: Conn, raw: bytes) -> bytes | None:
        """Raw bytes through TLS: the plaintext for the hub (b"" if none yet),
        or None if there is nothing more to do (still in the handshake, or
        the connection was dropped)."""
        tls = conn.tls
        assert tls is not None
        try:
            plain = tls.receive(raw)
        except (OSError, ConnectionError) as exc:  # ssl.SSLError is an OSError
            reason = getattr(exc, "reason", None) or str(exc)
            log.info("TLS with %s failed: %s", conn.address, reason)
            self._drop(cid, f"TLS failed: {reason}")
            self._after_hub()
            return None
        if tls.output_pending:  # handshake replies, session tickets
            self._flush(cid)
            if cid not in self._conns:
                self._after_hub()
                return None
        if not conn.opened:
            if not tls.handshaken:
                return None
            conn.opened = True
            log.debug("TLS from %s: %s", conn.address, tls.describe())
            self.hub.open(cid, conn.address, "tls", None, conn.auth)
        if not plain and not tls.eof:
            self._after_hub()
            return None
        return plain

    def _internal_error(self, cid: int) -> None:
        # A bug of ours, triggered by what this peer sent: the tests must find
        # it, but the other clients should not lose their chat over it.
        log.error(
            "Internal error while handling input from connection %d; closing it",
            cid,
            exc_info=True,
        )
        self._drop(cid, "internal error")
        self._after_hub()

    def _input_done(self, cid: int) -> None:
        conn = self._conns.get(cid)
        if conn is None:
            self._after_hub()
            return
        fd = conn.sock.fileno()
        wake_at = self.hub.wake_at(cid)
        if wake_at is not None:
            # Held by the auth back-off: read nothing from it until then (a
            # loop timer: nobody else waits).
            self._pause(cid, fd)
            self.loop.call_later(max(0.0, wake_at - time.time()), lambda: self._wake(cid))
        elif self.hub.backlogged(cid):
            # A burst: handle the rest a slice per turn, after this turn's
            # output has gone out, and read nothing more from it meanwhile
            # (TCP flow control slows the sender down). Over its rate limit,
            # the next slice waits for the bucket: back-pressure, no loss.
            self._pause(cid, fd)
            delay = 0.0
            if conn.bucket is not None and conn.bucket.available(self.loop.time()) < 1:
                delay = conn.bucket.wait(self.loop.time())
            self.loop.call_later(delay, lambda: self._continue_input(cid))
        elif cid in self._paused:
            self._paused.discard(cid)
            if cid not in self._ended:
                self.loop.add_reader(fd, self._on_readable, cid)
        self._after_hub()

    def _pause(self, cid: int, fd: int) -> None:
        if cid not in self._paused:
            self._paused.add(cid)
            self.loop.remove_reader(fd)

    def _wake(self, cid: int) -> None:
        if cid in self._conns:
            self.hub.wake(cid, time.time())
            self._input_done(cid)

    def _continue_input(self, cid: int) -> None:
        conn = self._conns.get(cid)
        if conn is not None:
            now = time.time()
            before = self.hub.lines_read(cid)
            try:
                self.hub.continue_input(cid, now, self._allowed(conn), BYTES_PER_TURN)
            except Exception:
                self._internal_error(cid)
                return
            self._spent(conn, cid, before)
            self._input_done(cid)

    def _console_line(self, text: str) -> None:
        if text.strip().lower() in ("/quit", "/exit"):
            self.stop()
            return
        self.hub.receive(CONSOLE_CID, (text + "\n").encode(), time.time())
        self._after_hub()
        if self._console is not None and CONSOLE_CID in self.hub.room:
            name = self.hub.room.name_of(CONSOLE_CID)
            if not self._console.editor.prompt.startswith(f"You ({name})"):
                self._console.set_name(name)

    # ---- serial lines ---------------------------------------------------------------

    def _serial_open(self, bridge: SerialBridge) -> None:
        self.hub.open_local(
            bridge.cid,
            bridge.name,
            f"serial {bridge.spec.device}",
            limit=self.settings.serial_queue,
        )
        self._after_hub()

    def _serial_line(self, bridge: SerialBridge, line: bytes) -> None:
        now = time.time()
        self.hub.receive(bridge.cid, line + b"\n", now)
        self._after_hub()
        self._throttle(bridge.cid, bridge.pause, bridge.resume)
        if bridge.cid in self.hub.room:  # after /nick, the prompt shows the new name
            bridge.set_name(self.hub.room.name_of(bridge.cid))

    def _serial_close(self, bridge: SerialBridge, reason: str) -> None:
        self.hub.gone(bridge.cid, reason)
        self._after_hub()

    def _serial_output(self, bridge: SerialBridge) -> None:
        """Hand the bridge the chat lines waiting for it, once it has written
        what it had (the hub's queue for it drops the oldest when too full)."""
        if not bridge.wants_output or bridge.cid not in self.hub.peers:
            return
        out = self.hub.output(bridge.cid)
        dropped = self.hub.take_dropped(bridge.cid)
        if not out and not dropped:
            return
        # Whole lines, each ending in LF: split there only (splitlines() would
        # also split at U+2028 and the like, making up lines without a sender).
        lines = out.decode("utf-8", "replace").split("\n")[:-1]
        out.clear()
        bridge.show(lines, dropped)

    def _fifo_line(self, line: bytes) -> None:
        text = clean_bytes(line).strip()
        if text:
            now = time.time()
            self.hub.post(self.settings.fifo_name, text, now)
            self._after_hub()
            fifo = self._fifo
            if fifo is not None:
                self._throttle(FIFO_KEY, fifo.pause, fifo.resume)

    def _throttle(self, key: int, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        """One line taken from a local input (the FIFO, a serial line): when its
        bucket is empty, stop reading it until a token is back (back-pressure;
        the line itself is in already)."""
        s = self.settings
        if not s.rate_limit:
            return
        now = self.loop.time()
        bucket = self._local_buckets.get(key)
        if bucket is None:
            bucket = self._local_buckets[key] = TokenBucket(s.rate_limit, s.rate_burst, now)
        bucket.spend(1)
        if bucket.available(now) < 1:
            pause()
            self.loop.call_later(bucket.wait(now), resume)

    # ---- writing -------------------------------------------------------------------

    def _after_hub(self) -> None:
        """After the hub acted: drop the doomed, flush at the end of the turn."""
        for cid, reason in self.hub.take_doomed():
            self._drop(cid, reason)
        self._schedule_flush()
        self._want_presence()

    def _want_presence(self) -> None:
        # A summary covers the presence_interval that starts with its first
        # event: at most one line per interval, and a sender that says hello
        # right after connecting is never announced at all.
        if self.hub.presence_pending and self._presence_timer is None and not self._stopping:
            self._presence_timer = self.loop.call_later(
                self.settings.presence_interval, self._presence
            )

    def _schedule_flush(self) -> None:
        """Send once input is quiet (bigger sends under load), but at the end
        of this turn if a queue is half full: gathering more could push a
        reader that keeps up past max-queue before it got its send."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_when_quiet(self._flush_dirty)
        if self.hub.full:
            self.loop.hurry()

    def _flush_dirty(self) -> None:
        self._flush_scheduled = False
        self._commit()
        if self.notifier.enabled:  # no string to build outside systemd
            self.notifier.status(self._status())  # sent only when it changed
        for cid in self.hub.take_dirty():
            if cid in self._conns:
                self._flush(cid)
            elif cid in self._serial:
                self._serial_output(self._serial[cid])
            elif cid == CONSOLE_CID and self._console is not None:
                out = self.hub.output(cid)
                self._console.deliver(bytes(out))
                out.clear()
        logs.release_chat()
        for cid, reason in self.hub.take_doomed():
            self._drop(cid, reason)
        if self._stopping:
            self._maybe_finished()

    def _flush(self, cid: int) -> None:
        """Send what waits, refill a replay, and watch for POLLOUT while
        output waits."""
        self._commit()  # nothing of this turn goes out before it is on disk
        conn = self._conns.get(cid)
        if conn is None:
            return
        out = self.hub.output(cid) if conn.opened else bytearray()
        while True:
            if not self._send(cid, conn, out):
                return  # dropped
            # A resuming client's replay is copied in as the queue drains.
            unsent = conn.tls is not None and conn.tls.unsent
            if out or unsent or not conn.opened or not self.hub.replaying(cid):
                break
            self.hub.refill(cid)
            if not out:
                break
        if out and self.hub.check_behind(cid):
            self._drop(cid, "too slow")
            return
        fd = conn.sock.fileno()
        if out or (conn.tls is not None and conn.tls.unsent):
            if not conn.writing:
                conn.writing = True
                self.loop.add_writer(fd, lambda: self._writable(cid))
        else:
            if conn.writing:
                conn.writing = False
                self.loop.remove_writer(fd)
            if conn.opened and self.hub.should_close(cid):
                self._drop(cid, "closed")

    def _send(self, cid: int, conn: Conn, out: bytearray) -> bool:
        """Send from ``out`` what the kernel takes (through TLS if any);
        False if the connection failed and was dropped."""
        sock = conn.sock
        try:
            if conn.tls is not None:
                conn.tls.send(sock.send, out)
            else:
                while out:
                    del out[: sock.send(out)]
        except BlockingIOError:
            pass
        except OSError as exc:
            self._drop(cid, exc.strerror or "send failed")
            return False
        return True

    def _writable(self, cid: int) -> None:
        if cid in self._conns:
            self._flush(cid)
            if self._stopping:
                self._maybe_finished()

    def _drop(self, cid: int, reason: str) -> None:
        conn = self._conns.pop(cid, None)
        if conn is None:
            return
        self._paused.discard(cid)
        self._ended.discard(cid)
        if conn.tls is not None:
            self._tls_count -= 1
        if conn.host is not None:
            left = self._per_address.pop(conn.host) - 1
            if left:
                self._per_address[conn.host] = left
        self.loop.forget(conn.sock.fileno())
        if conn.login_timer is not None:
            conn.login_timer.cancel()  # and with it the closure that holds conn
        if conn.tls is not None:
            try:  # close_notify, best effort: the peer learns the end was meant
                conn.sock.send(conn.tls.close())
            except OSError:
                pass
        conn.sock.close()
        if conn.opened:
            self.hub.gone(cid, reason)
        self._want_presence()

    # ---- timers ----------------------------------------------------------------------

    def _presence(self) -> None:
        self._presence_timer = None
        if self._stopping:
            return
        self.hub.take_presence()
        self._after_hub()  # schedules the next window if joins were held back

    def _log_blocked(self) -> None:
        writer = self._writer
        assert writer is not None

        def writable() -> None:
            writer.flush()
            if not writer.pending:
                self.loop.remove_writer(writer.fd)

        self.loop.add_writer(writer.fd, writable)


def _open_spare() -> int:
    try:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _raise_fd_limit(max_clients: int) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one (systemd's LimitNOFILE=,
    or the shell's ulimit -Hn), and say so if max-clients cannot fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        try:
            hard = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < max_clients + FD_RESERVE:
        log.warning(
            "max-clients is %d but only %d file descriptors are allowed (ulimit -n; "
            "LimitNOFILE= under systemd): connections beyond about %d are refused",
            max_clients,
            soft,
            max(0, soft - FD_RESERVE),
        )


def _tokens(s: Settings) -> list[bytes]:
    try:
        return load_tokens(s.token_file, os.environ.get("PICCHAT_TOKEN"))
    except SecretError as exc:
        raise ConfigError(str(exc)) from None


def serve(
    settings: Settings,
    writer: logs.StderrWriter | None = None,
    reload: Callable[[], Settings] | None = None,
) -> None:
    """Start and run a server until it is stopped (raises StartupError)."""
    log.debug("picchat %s starting", __version__)
    server = Server(settings, writer=writer, reload=reload)
    server.start()
    server.run()
