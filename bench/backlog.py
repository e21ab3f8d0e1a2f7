"""Benchmarks that print figures (no pass/fail): how fast and how lean a run is, also after an outage.

    make bench                         # all three, default sizes
    .venv/bin/python bench/backlog.py --records 1000 --esb-latency 0.05

1. render: messages rendered and parse-checked per second (the pure path, in process).
2. fetch:  a dry run over a large backlog (10 pages of 1,000): duration and the program's peak memory.
3. backlog: a real run over a backlog against simulators that enforce Knack's 10 requests/second: records
   per second, Knack requests and 429 answers, duration, peak memory, and what the time budget deferred.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import tempfile
import time
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
APP_ID = "bench-app"
API_KEY = "bench-key"


def bench_render(count: int) -> None:
    activity = Activity("rec", "1", "EMI-1", "24-00000001", "open", "Dispatch Technician",
                        "2024-07-04T10:26:00-05:00", "Crew sent to Lamar & 5th; café ☕ <ok>\n" * 20)
    codes = CONFIG[APP]["activity_codes"]
    started = time.perf_counter()
    for _ in range(count):
        render_message(message_values(activity, codes), "2026-01-01T00:00:00-06:00")
    elapsed = time.perf_counter() - started
    print(f"render: {count} messages in {elapsed:.2f}s = {count / elapsed:,.0f} messages/s "
          f"({elapsed / count * 1e6:.0f} us each, with the lxml parse check)")


def seed(knack: KnackSimulator, count: int) -> None:
    config = CONFIG[APP]
    knack.add_records(config["obj"], [
        activity_record(config, app_name=APP, record_id=f"bench{n:019d}", atd_activity_id=n, emi_id=f"EMI-{n}",
                        sr_number=f"24-{n // 3:08d}", activity_name="Dispatch Technician",
                        activity_datetime=dt.datetime(2024, 7, 4, 10, 26), activity_details=f"backlog item {n}")
        for n in range(1, count + 1)])


def run_program(env: dict, *args: str) -> tuple[int, str, float, int]:
    """Run the real program; its exit code, stdout, wall time and peak RSS in KiB.

    The peak is the program's own VmHWM, sampled from /proc while it runs: getrusage would also count the
    memory of this (large) benchmark process, which the child inherits until it execs.
    """
    with tempfile.TemporaryFile("w+") as out:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "send_esb_message.py"), APP, *args], env=env,
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


def summary_of(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if " summary" in line]
    return lines[-1].split(" ", 2)[-1] if lines else "(no summary line)"


def bench_fetch(count: int, tmp: Path) -> None:
    with KnackSimulator(app_id=APP_ID, api_key=API_KEY, rate_limit=10.0,
                        metadata=app_metadata(APP, CONFIG[APP], app_id=APP_ID)) as knack:
        seed(knack, count)
        env = {"KNACK_APP_ID": APP_ID, "KNACK_API_KEY": API_KEY, "KNACK_API_URL": knack.url,
               "ESB_ENDPOINT": "https://127.0.0.1:9/unused", "STATE_DIR": str(tmp / "state-fetch")}
        code, stdout, elapsed, peak = run_program(env, "--dry-run")
    print(f"fetch: dry run over {count} records: exit {code}, {elapsed:.1f}s, peak RSS {peak / 1024:.0f} MiB; "
          f"{summary_of(stdout)}")


def bench_backlog(count: int, esb_latency: float, max_runtime: float, tmp: Path) -> None:
    pki = make_pki(tmp / "pki")
    with KnackSimulator(app_id=APP_ID, api_key=API_KEY, rate_limit=10.0,
                        metadata=app_metadata(APP, CONFIG[APP], app_id=APP_ID)) as knack, \
            ESBSimulator(server_cert=pki.server_cert, server_key=pki.server_key,
                         client_ca_bundle=pki.client_ca_bundle) as esb:
        esb.latency = esb_latency
        seed(knack, count)
        env = {"KNACK_APP_ID": APP_ID, "KNACK_API_KEY": API_KEY, "KNACK_API_URL": knack.url,
               "ESB_ENDPOINT": esb.url, "ESB_CERT": str(pki.client_cert), "ESB_KEY": str(pki.client_key),
               "ESB_CA_BUNDLE": str(pki.ca_bundle), "STATE_DIR": str(tmp / "state-backlog")}
        code, stdout, elapsed, peak = run_program(env, "--max-runtime", str(max_runtime))
        log = knack.request_log
        throttled = sum(1 for r in log if r.status == 429)
        sent = len(esb.accepted)
    print(f"backlog: {count} records, ESB latency {esb_latency * 1000:.0f} ms, budget {max_runtime:g}s: exit {code}, "
          f"{elapsed:.1f}s, {sent} sent = {sent / elapsed:.1f} records/s; Knack requests {len(log)}, "
          f"429 answers {throttled}; peak RSS {peak / 1024:.0f} MiB")
    print(f"         {summary_of(stdout)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", type=int, default=5000, help="messages to render (default 5000)")
    parser.add_argument("--fetch", type=int, default=10000, help="records in the dry-run backlog (default 10000)")
    parser.add_argument("--records", type=int, default=400, help="records in the real-run backlog (default 400)")
    parser.add_argument("--esb-latency", type=float, default=0.05, help="ESB answer delay in seconds (default 0.05)")
    parser.add_argument("--max-runtime", type=float, default=240, help="the program's time budget (default 240)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="knack311-bench-") as tmp:
        bench_render(args.render)
        bench_fetch(args.fetch, Path(tmp))
        bench_backlog(args.records, args.esb_latency, args.max_runtime, Path(tmp))


if __name__ == "__main__":
    main()
