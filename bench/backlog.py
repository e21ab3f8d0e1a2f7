"""Benchmarks that print figures (no pass/fail): how fast and how lean a run is, and what an idle run costs.

    make bench                                    # everything, default sizes (several minutes)
    .venv/bin/python bench/backlog.py --records 300 --sizes 100,1000 --skip-render

The real command (send_esb_message.py, a subprocess) runs against the loopback simulators:
1. render:     messages rendered and parse-checked per second (the pure path, in process).
2. throughput: a backlog of N records over N/3 service requests, 200 ms latency on Knack and on the ESB, Knack's
               10 requests/second limit on; `--workers 1` and the default in the same invocation (when the
               program has --workers; otherwise its one mode). One line per mode.
3. ESB pace:   a backlog of N records, 4 per service request, Knack answering in 200 ms with its 10/s limit on,
               against ESBs answering in 0.2, 1.0, 1.5 and 3.0 s and one that works on 4 messages at once (1.0 s
               each) and queues the rest: records/s, peak POSTs in flight, the limits the run used, duplicates,
               Knack's 429s and the ESB's 90th-percentile queue wait; with the default settings and `--workers 8`.
4. scaling:    the default mode over growing backlogs (100, 1,000, 10,000), no latency: time and memory per
               record. Knack's rate limit is off here (and KNACK_MAX_RPS at its maximum, 50) so the figures show the
               program's own cost; --scale-with-rate-limit keeps it on.
5. idle:       runs with nothing to send, the second with the metadata cache warm: Knack requests per run.
6. fetch:      a dry run over a large backlog: duration and peak memory.
Every backlog run also checks what the ESB and Knack ended with (each record accepted once and SENT, 311's order
per service request), so a figure never comes from a run that went wrong unnoticed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from config import CONFIG  # noqa: E402
from knack311.message import Activity, message_values, render_message  # noqa: E402
from simulators.activities import activity_record, app_metadata  # noqa: E402
from simulators.certs import make_pki  # noqa: E402
from simulators.esb import ESBSimulator  # noqa: E402
from simulators.knack_api import KnackSimulator  # noqa: E402

APP = "data-tracker"
APP_ID = "6a1b2c3d4e5f60718293a4b5"
API_KEY = "bench-key"
KNACK_CEILING = 10.0  # records/second: one Knack update per record, 10 requests/second per app
BUDGET = 3600.0       # --max-runtime for the benchmark runs: the time budget must never cut a measured run short
PLAN = 10_000_000     # a daily plan the benchmark never nears (the reserve would stop a run otherwise)


@dataclass
class Measured:
    label: str
    records: int
    exit_code: int
    wall: float
    sent: int
    knack_requests: int
    throttled: int
    peak_kib: int
    summary: str
    problems: list[str]
    peak_in_flight: int = 0
    duplicates: int = 0
    queue_wait_p90: float = 0.0

    @property
    def per_second(self) -> float:
        return self.sent / self.wall if self.wall else 0.0


def bench_render(count: int) -> None:
    activity = Activity("rec", "1", "EMI-1", "24-00000001", "open", "Dispatch Technician",
                        "2024-07-04T10:26:00-05:00", "Crew sent to Lamar & 5th; café ☕ <ok>\n" * 20)
    codes = CONFIG[APP]["activity_codes"]
    started = time.perf_counter()
    for _ in range(count):
        render_message(message_values(activity, codes), "2026-01-01T00:00:00-06:00")
    elapsed = time.perf_counter() - started
    print(f"render: {count} messages in {elapsed:.2f}s = {count / elapsed:,.0f} messages/s "
          f"({elapsed / count * 1e6:.0f} us each, with the lxml parse check)\n")


def seed(knack: KnackSimulator, count: int, per_sr: int = 3) -> dict[str, tuple[str, int]]:
    """`count` ready records over count/per_sr service requests, the activities of one SR spread over the backlog
    (as after an outage). Returns record id -> (SR number, atd_activity_id)."""
    config = CONFIG[APP]
    srs = [n // per_sr for n in range(count)]
    random.Random(311).shuffle(srs)
    plan = {f"bench{n:019d}": (f"24-{srs[n - 1]:08d}", n) for n in range(1, count + 1)}
    knack.add_records(config["obj"], [
        activity_record(config, app_name=APP, record_id=record_id, atd_activity_id=n, emi_id=f"EMI-{n}",
                        sr_number=sr, activity_name="Dispatch Technician",
                        activity_datetime=dt.datetime(2024, 7, 4, 10, 26), activity_details=f"backlog item {n}")
        for record_id, (sr, n) in plan.items()])
    return plan


def run_program(env: dict, *args: str) -> tuple[int, str, float, int]:
    """Run the real program; its exit code, stdout, wall time and peak RSS in KiB.

    The peak is the program's own VmHWM, sampled from /proc while it runs: getrusage would also count the
    memory of this (large) benchmark process, which the child inherits until it execs.
    """
    with tempfile.TemporaryFile("w+") as out:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "send_esb_message.py"), APP, *args],
                                env={"PATH": os.environ.get("PATH", ""), **env},
                                stdout=out, stderr=subprocess.STDOUT, text=True)
        peak = 0
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                hwm = next((line for line in status.read_text().splitlines() if line.startswith("VmHWM:")), "")
                peak = max(peak, int(hwm.split()[1])) if hwm else peak
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        out.seek(0)
        return proc.returncode, out.read(), elapsed, peak


def program_has_workers() -> bool:
    """Whether this version of the program takes --workers (the concurrent run); read from its --help."""
    help_text = subprocess.run([sys.executable, str(PROJECT_ROOT / "send_esb_message.py"), "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    return re.search(r"--workers\b", help_text) is not None


def summary_of(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if " summary" in line]
    return lines[-1].split(" ", 2)[-1] if lines else "(no summary line)"


def make_knack(*, rate_limit: float | None) -> KnackSimulator:
    return KnackSimulator(app_id=APP_ID, api_key=API_KEY, rate_limit=rate_limit, plan_limit=PLAN,
                          metadata=app_metadata(APP, CONFIG[APP], app_id=APP_ID))


def program_env(knack: KnackSimulator, esb: ESBSimulator, pki, state_dir: Path, **extra: str) -> dict[str, str]:
    return {"KNACK_APP_ID": APP_ID, "KNACK_API_KEY": API_KEY, "KNACK_API_URL": knack.url,
            "ESB_ENDPOINT": esb.url, "ESB_CERT": str(pki.client_cert), "ESB_KEY": str(pki.client_key),
            "ESB_CA_BUNDLE": str(pki.ca_bundle), "STATE_DIR": str(state_dir), **extra}


def check_outcome(plan: dict[str, tuple[str, int]], knack: KnackSimulator, esb: ESBSimulator) -> list[str]:
    """What went wrong, if anything: lost or duplicate messages, records not SENT, 311's order broken."""
    problems = []
    copies = esb.copies()
    if duplicates := [rid for rid, n in copies.items() if n > 1]:
        problems.append(f"{len(duplicates)} record(s) accepted more than once")
    status_key = CONFIG[APP]["fields"]["esb_status"]
    statuses = {r["id"]: r.get(f"{status_key}_raw") for r in knack.records(CONFIG[APP]["obj"])}
    if unsent := [rid for rid in plan if statuses.get(rid) != "SENT"]:
        problems.append(f"{len(unsent)} record(s) not SENT")
    if missing := [rid for rid in plan if statuses.get(rid) == "SENT" and rid not in copies]:
        problems.append(f"{len(missing)} record(s) SENT without reaching the ESB")
    last: dict[str, int] = {}
    out_of_order = 0
    for received in esb.accepted:
        sr, n = plan.get(received.record_id, ("", 0))
        if sr and last.get(sr, 0) > n:
            out_of_order += 1
        last[sr] = max(last.get(sr, 0), n)
    if out_of_order:
        problems.append(f"{out_of_order} activit(ies) reached the ESB before an earlier one of their SR")
    return problems


def backlog_run(label: str, count: int, latency: float, rate_limit: float | None, pki, tmp: Path, args: list[str],
                *, esb_latency: float | None = None, capacity: int | None = None, per_sr: int = 3,
                **env_extra: str) -> Measured:
    """One run of the real program over a fresh backlog; `latency` on Knack (and on the ESB unless `esb_latency`)."""
    with make_knack(rate_limit=rate_limit) as knack, \
            ESBSimulator(server_cert=pki.server_cert, server_key=pki.server_key,
                         client_ca_bundle=pki.client_ca_bundle) as esb:
        knack.latency = latency
        esb.latency = latency if esb_latency is None else esb_latency
        esb.capacity = capacity
        plan = seed(knack, count, per_sr)
        state = Path(tempfile.mkdtemp(prefix="state-", dir=tmp))
        code, stdout, elapsed, peak = run_program(program_env(knack, esb, pki, state, **env_extra),
                                                  "--max-runtime", f"{BUDGET:g}", *args)
        log = knack.request_log
        return Measured(label, count, code, elapsed, len(esb.copies()), len(log),
                        sum(1 for r in log if r.status == 429), peak, summary_of(stdout),
                        check_outcome(plan, knack, esb), peak_in_flight=esb.peak_in_flight,
                        duplicates=sum(n - 1 for n in esb.copies().values()), queue_wait_p90=esb.queue_wait_p90())


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                                enumerate(zip(row, widths, strict=True))) + " |")


def print_notes(runs: list[Measured]) -> None:
    for run in runs:
        note = f"  {run.label}, {run.records} records: exit {run.exit_code}; {run.summary}"
        if run.problems:
            note += "  PROBLEMS: " + "; ".join(run.problems)
        print(note)
    print()


def bench_throughput(count: int, latency: float, modes: list[tuple[str, list[str]]], pki, tmp: Path) -> None:
    print(f"throughput: {count} records over {count // 3} service requests, {latency * 1000:.0f} ms latency on "
          f"Knack and on the ESB, Knack's 10 requests/second limit on")
    runs = [backlog_run(label, count, latency, 10.0, pki, tmp, args) for label, args in modes]
    rows = [[run.label, str(run.records), f"{run.wall:.1f}", f"{run.per_second:.2f}",
             f"{run.per_second / KNACK_CEILING:.0%}", f"{run.knack_requests / max(run.sent, 1):.3f}",
             str(run.throttled), f"{run.peak_kib / 1024:.0f}"] for run in runs]
    print_table(["mode", "records", "wall s", "records/s", "of 10/s ceiling", "Knack requests/record", "429s",
                 "peak RSS MiB"], rows)
    if len(runs) == 2 and runs[0].per_second:
        print(f"  default / --workers 1: {runs[1].per_second / runs[0].per_second:.2f}x")
    print_notes(runs)


ESB_PACES = [("0.2 s", 0.2, None), ("1.0 s", 1.0, None), ("1.5 s", 1.5, None), ("3.0 s", 3.0, None),
             ("capacity 4, 1.0 s each", 1.0, 4)]


def in_flight_range(summary: str) -> str:
    found = re.search(r"esb_in_flight=(\S+)", summary)
    return found[1] if found else "-"


def bench_esb_pace(count: int, modes: list[tuple[str, list[str]]], pki, tmp: Path) -> None:
    print(f"ESB pace: {count} records, 4 per service request, Knack answering in 200 ms with its 10 requests/second "
          f"limit on; ESBs of several speeds")
    for label, args in modes:
        runs = [backlog_run(f"{label}, ESB {pace}", count, 0.2, 10.0, pki, tmp, args, esb_latency=esb_latency,
                            capacity=capacity, per_sr=4) for pace, esb_latency, capacity in ESB_PACES]
        print(f"{label}:")
        rows = [[pace, f"{run.wall:.1f}", f"{run.per_second:.2f}", f"{run.per_second / KNACK_CEILING:.0%}",
                 str(run.peak_in_flight), in_flight_range(run.summary), str(run.duplicates), str(run.throttled),
                 f"{run.queue_wait_p90:.2f}" if capacity else "-"]
                for (pace, _, capacity), run in zip(ESB_PACES, runs, strict=True)]
        print_table(["ESB answers in", "wall s", "records/s", "of 10/s ceiling", "peak POSTs in flight",
                     "esb_in_flight", "duplicates", "429s", "p90 queue wait s"], rows)
        print_notes(runs)


def bench_scaling(sizes: list[int], with_rate_limit: bool, default_args: list[str], pki, tmp: Path) -> None:
    # KNACK_MAX_RPS at its maximum, 50: the program's own cost per record shows, not Knack's limit
    limit_text = "Knack's 10 requests/second limit on" if with_rate_limit else "no Knack rate limit, KNACK_MAX_RPS=50"
    print(f"scaling: default mode, no latency, {limit_text}")
    extra = {} if with_rate_limit else {"KNACK_MAX_RPS": "50"}
    runs = [backlog_run("default", n, 0.0, 10.0 if with_rate_limit else None, pki, tmp, default_args, **extra)
            for n in sizes]
    # The interpreter and libraries take most of the memory whatever the backlog: what matters is how the peak
    # grows with it, per record more than the smallest backlog.
    first = runs[0]
    rows = [[str(run.records), f"{run.wall:.1f}", f"{run.wall / run.records * 1000:.1f}",
             f"{run.knack_requests / max(run.sent, 1):.3f}", f"{run.peak_kib / 1024:.0f}",
             f"{(run.peak_kib - first.peak_kib) / (run.records - first.records):.2f}"
             if run.records > first.records else "-"] for run in runs]
    print_table(["records", "wall s", "ms/record", "Knack requests/record", "peak RSS MiB",
                 f"RSS growth KiB/record over {first.records}"], rows)
    print_notes(runs)


def bench_idle(pki, tmp: Path) -> None:
    with make_knack(rate_limit=10.0) as knack, \
            ESBSimulator(server_cert=pki.server_cert, server_key=pki.server_key,
                         client_ca_bundle=pki.client_ca_bundle) as esb:
        state = Path(tempfile.mkdtemp(prefix="state-idle-", dir=tmp))
        env = program_env(knack, esb, pki, state)
        counts = []
        for _ in range(2):
            before = len(knack.request_log)
            code, stdout, elapsed, _ = run_program(env)
            counts.append((len(knack.request_log) - before, code, elapsed))
    (cold, cold_code, _), (warm, warm_code, warm_elapsed) = counts
    print(f"idle: nothing to send: {cold} Knack request(s) with a cold metadata cache (exit {cold_code}), "
          f"{warm} with a warm one (exit {warm_code}, {warm_elapsed:.1f}s)\n")


def bench_fetch(count: int, tmp: Path) -> None:
    with make_knack(rate_limit=10.0) as knack:
        seed(knack, count)
        env = {"KNACK_APP_ID": APP_ID, "KNACK_API_KEY": API_KEY, "KNACK_API_URL": knack.url,
               "ESB_ENDPOINT": "https://127.0.0.1:9/unused", "STATE_DIR": str(tmp / "state-fetch")}
        code, stdout, elapsed, peak = run_program(env, "--dry-run")
    print(f"fetch: dry run over {count} records: exit {code}, {elapsed:.1f}s, peak RSS {peak / 1024:.0f} MiB; "
          f"{summary_of(stdout)}\n")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def sizes_list(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if any(n < 3 for n in sizes):
        raise argparse.ArgumentTypeError("sizes must be at least 3 records")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=300, help="backlog of the throughput table (default 300)")
    parser.add_argument("--latency", type=float, default=0.2,
                        help="Knack and ESB answer delay in the throughput table, seconds (default 0.2)")
    parser.add_argument("--sizes", type=sizes_list, default=[100, 1000, 10000],
                        help="backlogs of the scaling table (default 100,1000,10000)")
    parser.add_argument("--scale-with-rate-limit", action="store_true",
                        help="keep Knack's 10 requests/second limit in the scaling table")
    parser.add_argument("--render", type=int, default=5000, help="messages to render (default 5000; 0 skips)")
    parser.add_argument("--fetch", type=int, default=10000, help="records in the dry-run backlog (default 10000; "
                        "0 skips)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-esb-pace", action="store_true")
    parser.add_argument("--pace-records", type=int, default=300,
                        help="backlog of each ESB pace run (default 300)")
    parser.add_argument("--skip-idle", action="store_true")
    args = parser.parse_args()

    concurrent = program_has_workers()
    modes = [("--workers 1", ["--workers", "1"]), ("default", [])] if concurrent else \
        [("sequential (no --workers)", [])]
    print(f"machine: {machine()}")
    print(f"program: {'takes --workers' if concurrent else 'has no --workers option: one sequential mode'}\n")
    with tempfile.TemporaryDirectory(prefix="knack311-bench-") as tmp_name:
        tmp = Path(tmp_name)
        pki = make_pki(tmp / "pki")
        if args.render:
            bench_render(args.render)
        if not args.skip_throughput:
            bench_throughput(args.records, args.latency, modes, pki, tmp)
        if not args.skip_esb_pace:
            pace_modes = [("default", []), ("--workers 8", ["--workers", "8"])] if concurrent else modes
            bench_esb_pace(args.pace_records, pace_modes, pki, tmp)
        if not args.skip_scaling:
            bench_scaling(args.sizes, args.scale_with_rate_limit, modes[-1][1], pki, tmp)
        if not args.skip_idle:
            bench_idle(pki, tmp)
        if args.fetch:
            bench_fetch(args.fetch, tmp)


if __name__ == "__main__":
    main()
