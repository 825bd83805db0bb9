"""What an idle picchat costs: connections held, wake-ups, start-up.

Runs the real server as a user starts it (``python -m picchat --port P
--socket off --console off``, every other setting at its default) on loopback
and measures, RUNS times each (medians, with the range):

- (d) idle connections: a fresh server, 20 connections opened and closed to
  warm it up, then 1,000 and then 10,000 plain TCP connections held open from
  127.0.0.2-9, made with non-blocking connects through one selector, at most
  INFLIGHT not yet welcomed at a time (under the listen backlog of 512). Counts
  the connections that got the welcome line, the time to connect the first
  1,000 (first connect() to last welcome), and the server's RSS per client:
  (RSS at N - RSS at 0) / N, each RSS taken once the server has fallen quiet.
  The same for mosquitto (with an MQTT CONNECT per connection) if installed.
- (e) idle: 10 connected clients, then IDLE_SECONDS of silence: the server's
  CPU time (``/proc/PID/schedstat``) and context switches (``/proc/PID/status``),
  then on to 3 s past the default login-timeout (30 s) after the clients
  connected, under ``strace -c -f`` if strace is installed (else switches);
  and the server's RSS right after start beside that of the same interpreter
  running an empty ``time.sleep``, both measured in the same run.
- (g) start-up: time from exec to the first successful connect() (polled every
  1 ms) and to the welcome line; ``python -c pass`` for the interpreter's own
  floor; the server's imports (``-X importtime``, during a real start): the
  top 10 modules by cumulative time, and which of ssl, json, tomllib, serial,
  hmac and hashlib are imported.

The server runs with its bytecode cached (in a private PYTHONPYCACHEPREFIX);
start-up is also measured with PYTHONDONTWRITEBYTECODE=1 and no cache.

Loopback only; every process it starts is stopped by its pid; every wait is
bounded. Needs a hard RLIMIT_NOFILE above 10,100 (it raises its own soft limit).

    python3 bench/idle.py [--runs 3] [--only d,e,g] [--no-mosquitto]
"""

from __future__ import annotations

import argparse
import atexit
import errno
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COUNTS = (1000, 10000)
WARMUP = 20
INFLIGHT = 256  # connections begun and not yet welcomed, at most (backlog: 512)
SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]
IDLE_CLIENTS = 10
IDLE_SECONDS = 10.0
LOGIN_TIMEOUT = 30.0  # the default login-timeout
QUIET = 1.5  # seconds without a byte: the server has settled (presence-interval is 1 s)
SETTLE_MAX = 30.0
CONNECT_MAX = 60.0
# Children's environments: "cached" as after `pip install` or any earlier start
# (bytecode in __pycache__, here under a private PYTHONPYCACHEPREFIX so the
# checkout stays clean); "uncached" as under PYTHONDONTWRITEBYTECODE=1 with no
# picchat/__pycache__ (every start compiles picchat's modules; the standard
# library's bytecode is used). Filled in by main().
ENV: dict[str, dict[str, str]] = {}
TEMP_DIRS: list[str] = []  # removed at exit


def temp_dir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    if not TEMP_DIRS:
        atexit.register(lambda: [shutil.rmtree(p, ignore_errors=True) for p in TEMP_DIRS])
    TEMP_DIRS.append(path)
    return path


WATCHED = ("ssl", "json", "tomllib", "serial", "hmac", "hashlib")
# MQTT 3.1.1 CONNECT: clean session, keep-alive 0 (no pings), empty client id.
MQTT_CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x00\x00\x00"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


# -- processes and /proc ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def rss_kib(pid: int) -> int:
    return int(status(pid)["VmRSS"].split()[0])


def switches(pid: int) -> tuple[int, int]:
    st = status(pid)
    return int(st["voluntary_ctxt_switches"]), int(st["nonvoluntary_ctxt_switches"])


def cpu_seconds(pid: int) -> float:
    """Time on a CPU, in ns resolution where schedstat exists (else clock ticks)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except OSError:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_connectable(port: int, deadline: float, every: float = 0.001) -> float | None:
    """Poll connect() every `every` s; the monotonic time it first succeeded."""
    while time.monotonic() < deadline:
        s = socket.socket()
        try:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return time.monotonic()
        finally:
            s.close()
        time.sleep(every)
    return None


class Proc:
    """A process we started: stderr to a temporary file, stopped by its pid."""

    def __init__(self, args: list[str], **kw: object) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 -- closed in stop()
        env = kw.pop("env", ENV["cached"])
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=kw.pop("stdout", self.log),
            stderr=self.log,
            env=env,
            cwd=ROOT,
            **kw,
        )
        self.pid = self.proc.pid

    def text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        text = self.text()
        self.log.close()
        return text


def start_picchat(port: int, python_flags: tuple[str, ...] = (), mode: str = "cached") -> Proc:
    args = [sys.executable, *python_flags, "-m", "picchat", "--port", str(port)]
    return Proc([*args, "--socket", "off", "--console", "off"], env=ENV[mode])


def start_ready_picchat() -> tuple[Proc, int]:
    """Started, and ready by its own log line (no probe connection)."""
    port = free_port()
    server = start_picchat(port)
    end = time.monotonic() + 10
    while "waiting for connections" not in server.text():
        if time.monotonic() > end or server.proc.poll() is not None:
            raise RuntimeError("picchat did not start:\n" + server.stop())
        time.sleep(0.005)
    return server, port


# -- many connections through one selector ------------------------------------


def picchat_greeted(data: bytes) -> bool | None:
    """True: welcomed; False: refused; None: the first line is not complete yet."""
    if b"\n" not in data:
        return None
    return data.startswith(b"* Welcome")


def mqtt_greeted(data: bytes) -> bool | None:
    if len(data) < 4:
        return None
    return data[0] == 0x20 and data[3] == 0  # CONNACK, accepted


class Crowd:
    """Idle clients: each connects, sends `hello`, waits for its greeting, then
    reads and discards whatever comes, and never sends anything else."""

    def __init__(
        self, port: int, greeted: Callable[[bytes], bool | None], hello: bytes = b""
    ) -> None:
        self.port = port
        self.greeted = greeted
        self.hello = hello
        self.sel = selectors.DefaultSelector()
        self.socks: dict[int, socket.socket] = {}
        self.first: dict[int, bytes] = {}  # fd -> bytes before the greeting was complete
        self.accepted = 0
        self.refused = 0
        self.failed = 0
        self.started = 0

    def _drop(self, fd: int) -> None:
        self.sel.unregister(self.socks[fd])
        self.socks.pop(fd).close()
        self.first.pop(fd, None)

    def _begin(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((SOURCES[self.started % len(SOURCES)], 0))
        self.started += 1
        err = s.connect_ex(("127.0.0.1", self.port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self.failed += 1
            return
        self.socks[s.fileno()] = s
        self.first[s.fileno()] = b""
        self.sel.register(s, selectors.EVENT_WRITE if self.hello else selectors.EVENT_READ)

    def _serve(self, timeout: float) -> int:
        """One select(); the number of bytes read."""
        got = 0
        for key, mask in self.sel.select(timeout):
            fd = key.fd
            s = self.socks[fd]
            if mask & selectors.EVENT_WRITE:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    self.failed += 1
                    self._drop(fd)
                    continue
                s.send(self.hello)  # 14 bytes into an empty buffer: all of it goes
                self.sel.modify(s, selectors.EVENT_READ)
                continue
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            got += len(data)
            if fd in self.first:
                if not data:
                    self.failed += 1
                    self._drop(fd)
                    continue
                buf = self.first[fd] + data
                verdict = self.greeted(buf)
                if verdict is None:
                    self.first[fd] = buf
                    continue
                del self.first[fd]
                if verdict:
                    self.accepted += 1
                else:
                    self.refused += 1
                    self._drop(fd)
            elif not data:
                self.failed += 1  # closed by the server after its greeting
                self._drop(fd)
        return got

    def grow(self, n: int, limit: float = CONNECT_MAX) -> float:
        """Open n more connections; seconds from the first connect() to the last greeting."""
        start = time.monotonic()
        target = self.started + n
        while self.started < target or self.first:
            if time.monotonic() - start > limit:
                raise RuntimeError(f"connecting took over {limit} s")
            while self.started < target and len(self.first) < INFLIGHT:
                self._begin()
            self._serve(0.5)
        return time.monotonic() - start

    def settle(self, quiet: float = QUIET, limit: float = SETTLE_MAX) -> None:
        """Read until nothing has come for `quiet` seconds (at most `limit`)."""
        end = time.monotonic() + limit
        last = time.monotonic()
        while time.monotonic() < end and time.monotonic() - last < quiet:
            if self._serve(0.1):
                last = time.monotonic()

    def close(self) -> None:
        for fd in list(self.socks):
            self._drop(fd)
        self.sel.close()


# -- (d) idle connections -----------------------------------------------------


def idle_connections(
    start: Callable[[], tuple[Proc, int]], greeted, hello=b"", later=False
) -> dict:
    server, port = start()
    crowd = Crowd(port, greeted, hello)
    out: dict[str, float] = {}
    try:
        time.sleep(0.2)
        out["rss cold (KiB)"] = rss_kib(server.pid)
        crowd.grow(WARMUP)
        crowd.settle()
        crowd.close()
        crowd = Crowd(port, greeted, hello)
        time.sleep(QUIET)
        base = rss_kib(server.pid)
        out["rss at 0 (KiB)"] = base
        held = 0
        for n in COUNTS:
            seconds = crowd.grow(n - held)
            prev, held = held, n
            settled = time.monotonic()
            crowd.settle()
            rss = rss_kib(server.pid)
            out[f"{n}: accepted"] = crowd.accepted
            out[f"{n}: refused or failed"] = crowd.refused + crowd.failed
            out[f"{n}: time to connect these {n - prev} (s)"] = seconds
            out[f"{n}: rss (KiB)"] = rss
            out[f"{n}: rss per client (KiB)"] = (rss - base) / n
            out[f"{n}: server fds"] = fd_count(server.pid)
        if later:
            # Once every connection's login-timeout timer has run out.
            time.sleep(max(0.0, settled + LOGIN_TIMEOUT + 2 - time.monotonic()))
            rss = rss_kib(server.pid)
            out[f"{n}: rss {LOGIN_TIMEOUT + 2:.0f} s after the last connect (KiB)"] = rss
            out[f"{n}: rss per client then (KiB)"] = (rss - base) / n
    finally:
        crowd.close()
        server.stop()
    return out


def start_mosquitto() -> tuple[Proc, int]:
    port = free_port()
    conf = Path(temp_dir("idle-mosq-")) / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\n")
    proc = Proc([shutil.which("mosquitto") or "mosquitto", "-c", str(conf)])
    if wait_connectable(port, time.monotonic() + 10, 0.005) is None:
        raise RuntimeError("mosquitto did not start:\n" + proc.stop())
    return proc, port


# -- (e) idle -----------------------------------------------------------------


def strace_window(pid: int, seconds: float) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".strace") as out:
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-p", str(pid), "-o", out.name],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(seconds)
        tracer.send_signal(signal.SIGINT)
        try:
            tracer.wait(timeout=10)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait(timeout=10)
        text = Path(out.name).read_text()
    calls: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1] != "total" and parts[3].isdigit():
            calls[parts[-1]] = int(parts[3])
    return {
        "strace: syscalls": sum(calls.values()),
        "strace: epoll_wait": calls.get("epoll_wait", 0) + calls.get("epoll_pwait", 0),
    }


def idle(use_strace: bool) -> dict[str, float]:
    sleeper = Proc(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE,
    )
    server, port = start_ready_picchat()
    crowd = Crowd(port, picchat_greeted)
    out: dict[str, float] = {}
    try:
        out["rss right after start (KiB)"] = rss_kib(server.pid)
        assert sleeper.proc.stdout is not None
        sleeper.proc.stdout.readline()
        out["rss of python -c time.sleep (KiB)"] = rss_kib(sleeper.pid)
        out["rss ratio"] = (
            out["rss right after start (KiB)"] / out["rss of python -c time.sleep (KiB)"]
        )
        out["threads"] = int(status(server.pid)["Threads"])
        crowd.grow(IDLE_CLIENTS)
        connected = time.monotonic()
        crowd.settle(quiet=2.0)
        cpu0, (vol0, inv0) = cpu_seconds(server.pid), switches(server.pid)
        time.sleep(IDLE_SECONDS)
        cpu1, (vol1, inv1) = cpu_seconds(server.pid), switches(server.pid)
        out[f"{IDLE_SECONDS:.0f} s: cpu (ms)"] = (cpu1 - cpu0) * 1000
        out[f"{IDLE_SECONDS:.0f} s: voluntary switches"] = vol1 - vol0
        out[f"{IDLE_SECONDS:.0f} s: involuntary switches"] = inv1 - inv0
        # Then on to past the connections' login-timeout (30 s by default):
        # every accepted connection has a timer then, even where it does nothing.
        rest = connected + LOGIN_TIMEOUT + 3 - time.monotonic()
        label = f"to {LOGIN_TIMEOUT + 3:.0f} s after connecting"
        if use_strace:
            for k, v in strace_window(server.pid, rest).items():
                out[f"{label}: {k}"] = v
        else:
            vol1, _ = switches(server.pid)
            time.sleep(rest)
            out[f"{label}: voluntary switches"] = switches(server.pid)[0] - vol1
        out["rss after (KiB)"] = rss_kib(server.pid)
    finally:
        crowd.close()
        server.stop()
        sleeper.stop()
    return out


# -- (g) start-up -------------------------------------------------------------


def startup(mode: str) -> dict[str, float]:
    out: dict[str, float] = {}
    env = ENV[mode]
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=30, env=env)
    out["python -c pass (ms)"] = (time.monotonic() - t0) * 1000
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", "import picchat.cli, picchat.server"],
        check=True,
        timeout=30,
        cwd=ROOT,
        env=env,
    )
    out["python -c 'import picchat.cli, picchat.server' (ms)"] = (time.monotonic() - t0) * 1000
    port = free_port()
    server = start_picchat(port, mode=mode)
    try:
        ready = wait_connectable(port, server.started + 10)
        if ready is None:
            raise RuntimeError("picchat did not start:\n" + server.text())
        out["exec to connect() (ms)"] = (ready - server.started) * 1000
        out["rss then (KiB)"] = rss_kib(server.pid)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            buf = b""
            while b"\n" not in buf:
                data = s.recv(4096)
                if not data:
                    break
                buf += data
            out["exec to welcome line (ms)"] = (time.monotonic() - server.started) * 1000
    finally:
        server.stop()
    return out


def importtime() -> tuple[dict[str, tuple[int, int]], list[str]]:
    """{module: (self us, cumulative us)} during a real start, and the import order."""
    port = free_port()
    server = start_picchat(port, ("-X", "importtime"))
    try:
        if wait_connectable(port, server.started + 10) is None:
            raise RuntimeError("picchat did not start:\n" + server.text())
        time.sleep(0.2)
    finally:
        text = server.stop()
    times: dict[str, tuple[int, int]] = {}
    order = []
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)", line)
        if m:
            name = m.group(4)
            times[name] = (int(m.group(1)), int(m.group(2)))
            order.append(" " * (len(m.group(3)) // 2) + name)
    return times, order


# -- report ---------------------------------------------------------------------


def med(rows: list[dict[str, float]], key: str) -> str:
    values = [r[key] for r in rows if key in r]
    if not values:
        return "-"
    m = statistics.median(values)
    if all(float(v).is_integer() for v in values) and float(m).is_integer():
        cell = f"{m:.0f}"
        lo, hi = f"{min(values):.0f}", f"{max(values):.0f}"
    else:
        digits = 2 if abs(m) < 10 else 1 if abs(m) < 1000 else 0
        cell = f"{m:.{digits}f}"
        lo, hi = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return cell if lo == hi else f"{cell} ({lo}-{hi})"


def table(title: str, columns: dict[str, list[dict[str, float]]]) -> None:
    keys: list[str] = []
    for rows in columns.values():
        for r in rows:
            keys += [k for k in r if k not in keys]
    print(f"\n### {title}\n")
    print("| figure (median of runs, range) | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for k in keys:
        print(f"| {k} | " + " | ".join(med(rows, k) for rows in columns.values()) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", default="d,e,g", help="scenarios to run, comma-separated")
    p.add_argument("--no-mosquitto", action="store_true")
    args = p.parse_args()
    only = set(args.only.split(","))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < max(COUNTS) + 100:
        print(f"RLIMIT_NOFILE hard limit {hard} is too low for {max(COUNTS)}", file=sys.stderr)
        return 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pyc = temp_dir("idle-pyc-")
    base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    base["PYTHONPATH"] = str(ROOT)
    ENV["cached"] = dict(base, PYTHONPYCACHEPREFIX=pyc)
    # The standard library's own __pycache__ is used; picchat's is absent.
    ENV["uncached"] = {k: v for k, v in base.items() if k != "PYTHONPYCACHEPREFIX"}
    ENV["uncached"]["PYTHONDONTWRITEBYTECODE"] = "1"
    if (ROOT / "picchat" / "__pycache__").exists():
        print("note: picchat/__pycache__ exists: 'no bytecode cache' will use it", file=sys.stderr)
    server, _ = start_ready_picchat()  # fills the bytecode cache
    server.stop()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    print(
        f"picchat idle benchmark: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"commit {commit}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"{os.uname().sysname} {os.uname().release}, {args.runs} runs"
    )

    if "d" in only:
        cols: dict[str, list[dict[str, float]]] = {"picchat": []}
        mosquitto = None if args.no_mosquitto else shutil.which("mosquitto")
        if mosquitto:
            cols["mosquitto"] = []
        for i in range(args.runs):
            cols["picchat"].append(
                idle_connections(start_ready_picchat, picchat_greeted, later=True)
            )
            print(f"(d) run {i + 1} picchat: {cols['picchat'][-1]}", file=sys.stderr)
            if mosquitto:
                r = idle_connections(start_mosquitto, mqtt_greeted, MQTT_CONNECT)
                cols["mosquitto"].append(r)
                print(f"(d) run {i + 1} mosquitto: {r}", file=sys.stderr)
        table("(d) idle connections", cols)

    if "e" in only:
        use_strace = shutil.which("strace") is not None
        rows = []
        for i in range(args.runs):
            rows.append(idle(use_strace))
            print(f"(e) run {i + 1}: {rows[-1]}", file=sys.stderr)
        table(f"(e) idle: {IDLE_CLIENTS} clients, {IDLE_SECONDS:.0f} s", {"picchat": rows})

    if "g" in only:
        cols = {"bytecode cached": [], "no bytecode cache": []}
        for i in range(args.runs):
            for col, mode in zip(cols, ("cached", "uncached"), strict=True):
                cols[col].append(startup(mode))
                print(f"(g) run {i + 1} {mode}: {cols[col][-1]}", file=sys.stderr)
        table("(g) start-up", cols)
        runs = [importtime() for _ in range(args.runs)]
        names = set(runs[0][0])
        cum = {n: statistics.median(r[0].get(n, (0, 0))[1] for r in runs) for n in names}
        own = {n: statistics.median(r[0].get(n, (0, 0))[0] for r in runs) for n in names}
        print(
            "\nTop 10 imports during a start (bytecode cached), by cumulative time (median, ms):\n"
        )
        print("| module | cumulative (ms) | self (ms) |")
        print("|---|---|---|")
        for n in sorted(cum, key=cum.get, reverse=True)[:10]:
            print(f"| {n} | {cum[n] / 1000:.1f} | {own[n] / 1000:.1f} |")
        print("\nWatched modules imported during a start:\n")
        print("| module | imported | cumulative (ms) | first imported under |")
        print("|---|---|---|---|")
        order = runs[0][1]
        for w in WATCHED:
            parent = "-"
            for j, line in enumerate(order):
                if line.strip() == w:
                    depth = len(line) - len(line.lstrip())
                    # -X importtime prints children before their parent: the parent
                    # is the next line with a smaller indent.
                    for later in order[j + 1 :]:
                        if len(later) - len(later.lstrip()) < depth:
                            parent = later.strip()
                            break
                    break
            got = w in cum
            ms = f"{cum[w] / 1000:.1f}" if got else "-"
            print(f"| {w} | {'yes' if got else 'no'} | {ms} | {parent} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
