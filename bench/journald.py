"""What logging every chat line to journald costs, under systemd as deployed.

Boots the stand-in Pi (tests/system/pi.py: Debian bookworm with systemd as
PID 1 in systemd-nspawn), runs picchat-server from this checkout as a
transient service whose stdout and stderr go to journald (``--rate-limit 0``,
no state directory), and runs bench/loadgen.py's latency scenario (a) against
it inside the container: 10 receivers, 1 sender, 2,000 messages at 500/s.
Each run starts a fresh service, ``log-chat`` on and off in turn; figures are
medians over the runs. With ``--one-cpu`` the server, the generator and
journald share CPU 0, as on a single-core Pi Zero.

    python3 bench/journald.py [--runs 5] [--one-cpu]

Needs root, systemd-nspawn and debootstrap (as `make system` does); says why
and exits 0 where the stand-in Pi cannot boot. Prints a markdown table; the
figures are quoted in docs/benchmarks.md ("Findings").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.system.pi import Pi, why_not  # noqa: E402

PORT = 1234  # inside the container's own network namespace


def one_run(pi: Pi, unit: str, log_chat: bool, one_cpu: bool) -> dict[str, float]:
    pin = ["-p", "CPUAffinity=0"] if one_cpu else []
    pi.run(
        "systemd-run",
        f"--unit={unit}",
        "-p",
        "StandardOutput=journal",
        "-p",
        "StandardError=journal",
        *pin,
        "-E",
        "PYTHONPATH=/src",
        "python3",
        "-m",
        "picchat",
        "--port",
        str(PORT),
        "--socket",
        "off",
        "--rate-limit",
        "0",
        "--log-chat" if log_chat else "--no-log-chat",
    )
    probe = f"import socket; socket.create_connection(('127.0.0.1', {PORT}), 1).close()"
    try:
        pid = ""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until it accepts connections
            pid = pi.run("systemctl", "show", "-p", "MainPID", "--value", unit).stdout.strip()
            if pid not in ("", "0") and pi.run("python3", "-c", probe, check=False).returncode == 0:
                break
            time.sleep(0.1)
        gen = ["taskset", "-c", "0"] if one_cpu else []
        gen += ["python3", "/src/bench/loadgen.py", "--port", str(PORT), "--scenario", "latency"]
        out = pi.run(*gen, "--pid", pid, timeout=120).stdout
        return json.loads(out)
    finally:
        pi.run("systemctl", "stop", unit, check=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--one-cpu", action="store_true", help="server, generator, journald on CPU 0")
    a = ap.parse_args(argv)
    reason = why_not()
    if reason is not None:
        print(f"bench/journald.py: skipped: {reason}")
        return 0
    rows: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    with Pi("picchat-bench-journald", binds={str(ROOT): "/src"}) as pi:
        if a.one_cpu:
            journald = pi.run("pidof", "systemd-journald").stdout.split()[0]
            pi.run("taskset", "-a", "-p", "-c", "0", journald)
        for run in range(a.runs):
            for log_chat in (True, False):
                r = one_run(pi, f"picchat-bench-{run}-{int(log_chat)}", log_chat, a.one_cpu)
                rows[log_chat].append(r)
                print(
                    f"run {run + 1} log-chat {'on ' if log_chat else 'off'} "
                    f"p50 {r['lat_p50_ms']:.3f} ms p99 {r['lat_p99_ms']:.3f} ms "
                    f"server {r['srv_us_per_delivery']:.1f} µs/delivery",
                    file=sys.stderr,
                    flush=True,
                )
    cpus = "one CPU (server, generator, journald)" if a.one_cpu else "2 CPUs"
    print(f"\n(a) under systemd, chat logged to journald or not; {a.runs} runs, {cpus}\n")
    print("| log-chat | p50 ms | p99 ms | server µs/delivery | undelivered % |")
    print("|---|---|---|---|---|")
    for log_chat in (True, False):
        rs = rows[log_chat]

        def med(key: str, rs: list[dict[str, float]] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        print(
            f"| {'on' if log_chat else 'off'} | {med('lat_p50_ms'):.3f} | {med('lat_p99_ms'):.3f} "
            f"| {med('srv_us_per_delivery'):.1f} | {med('loss_pct'):.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
