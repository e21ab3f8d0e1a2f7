#!/usr/bin/env python3
"""Send Knack 311 activity records to the city's Enterprise Service Bus (ESB).

    python send_esb_message.py APP_NAME [--dry-run] [--max-runtime SECONDS] [--workers N] [--log-format text|json]
                               [--progress]
    python send_esb_message.py APP_NAME --report
    python send_esb_message.py APP_NAME --resend RECORD_ID[,RECORD_ID...]
    python send_esb_message.py APP_NAME --check
    python send_esb_message.py --version

Exit codes: 0 all done (or deferred by the time budget), 1 a record failed or the run stopped early,
2 usage or configuration error, 75 another run for the app is active. See README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # runnable from any working directory

from knack311.stopping import PROCESS_SIGNALS  # noqa: E402  (the standard library only: quick to import)

if __name__ == "__main__":
    # First of all, before the imports that take time: python as PID 1 (a container) ignores SIGTERM and SIGINT
    # without a handler, and a signal during the start must still end the program with its own output (each
    # mode's Stop hears of it). The handlers stay until the process exits.
    PROCESS_SIGNALS.install()

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402

from knack311.check import check_command  # noqa: E402
from knack311.errors import ConfigError  # noqa: E402
from knack311.healthcheck import healthcheck_url  # noqa: E402
from knack311.journal_report import report  # noqa: E402
from knack311.logs import LOG_FORMATS, log_format_setting, progress_setting  # noqa: E402
from knack311.metrics import metrics_path  # noqa: E402
from knack311.resend import record_ids, resend  # noqa: E402
from knack311.run import EXIT_CONFIG, Reporting, run  # noqa: E402
from knack311.settings import (  # noqa: E402
    DEFAULT_MAX_RUNTIME,
    MAX_WORKERS,
    PROJECT_ROOT,
    load_app,
    load_settings,
)
from knack311.streams import guard_standard_streams  # noqa: E402
from knack311.version import VersionAction  # noqa: E402


def seconds(text: str) -> float:
    """--max-runtime: a positive, finite number of seconds (nan and inf would disable the budget silently)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, not {text!r}")
    return value


def workers(text: str) -> int:
    """--workers: a whole number from 1 to MAX_WORKERS."""
    if not (text.isascii() and text.strip().isdigit()) or not 1 <= int(text) <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_WORKERS}, not {text!r}")
    return int(text)


def reporting(args: argparse.Namespace, env: dict[str, str], app: str) -> Reporting:
    """How the run reports: log format, progress, METRICS_FILE, HEALTHCHECK_URL (ConfigError when unusable)."""
    metrics = env.get("METRICS_FILE", "").strip()
    ping = env.get("HEALTHCHECK_URL", "").strip()
    return Reporting(log_format=log_format_setting(args.log_format, env),
                     progress_bar=progress_setting(args.progress, env),
                     metrics_file=metrics_path(metrics, app) if metrics else None,
                     healthcheck_url=healthcheck_url(ping) if ping else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Send Knack 311 activity records to the ESB.")
    parser.add_argument("app_name", metavar="APP_NAME", help="a Knack app configured in config.py")
    parser.add_argument("--version", action=VersionAction, project_root=PROJECT_ROOT,
                        help="print knack-311's version and git revision and exit")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="fetch and render, print each message; send nothing and change nothing in Knack")
    mode.add_argument("--report", action="store_true",
                      help="print what the delivery journal knows (deliveries not yet marked SENT or in doubt, "
                           "records that keep failing, the last runs); contacts neither Knack nor the ESB and "
                           "needs only STATE_DIR")
    mode.add_argument("--resend", action="append", metavar="RECORD_ID",
                      help="release a parked record (posted twice without an answer from the ESB) so that the next "
                           "run posts it once more; repeatable or comma-separated. First ask the ESB team whether "
                           "311 has it: if it has, set the record SENT in Knack instead. Needs only STATE_DIR")
    mode.add_argument("--check", action="store_true",
                      help="pre-flight: check the environment, config.py against the Knack app, the certificates, a "
                           "TLS handshake with the ESB, STATE_DIR, the daily Knack calls left and the records "
                           "waiting; sends no message and changes nothing. Exit 0 when nothing FAILs, else 2")
    parser.add_argument("--max-runtime", type=seconds, default=DEFAULT_MAX_RUNTIME, metavar="SECONDS",
                        help=f"start no new record after this many seconds (default {DEFAULT_MAX_RUNTIME:g})")
    parser.add_argument("--workers", type=workers, default=None, metavar="N",
                        help="a fixed number of records delivered at once, each service request's activities still "
                             "one after another in order (1 sends one record at a time). Default: the ESB POSTs in "
                             "flight follow the ESB's answers, up to ESB_MAX_IN_FLIGHT")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                        help="text (default) or json: one JSON object per line (or LOG_FORMAT=json)")
    parser.add_argument("--progress", action="store_true",
                        help="a live progress bar on stderr (or PROGRESS=1); without it, a progress line in the "
                             "log every 10 s while a backlog drains")
    args = parser.parse_args(argv)
    try:
        try:
            from config import CONFIG
        except Exception as exc:  # a broken config.py is a configuration error, not a crash
            raise ConfigError(f"config.py cannot be loaded: {type(exc).__name__}: {exc}") from None
        if args.report or args.resend:
            app = load_app(args.app_name, CONFIG)
            # the same STATE_DIR rule as load_settings, without asking for the Knack and ESB settings
            state_dir = os.environ.get("STATE_DIR", "").strip()
            state = Path(state_dir).expanduser().absolute() if state_dir else PROJECT_ROOT / "state"
            if args.resend:
                return resend(app.name, state, record_ids(args.resend))
            return report(app.name, state, out=sys.stdout)
        env = dict(os.environ)
        if args.check:
            return check_command(args.app_name, env, CONFIG, out=sys.stdout,
                                 log=lambda line: print(line, file=sys.stderr, flush=True))
        settings = load_settings(args.app_name, env, CONFIG, dry_run=args.dry_run, max_runtime=args.max_runtime,
                                 workers=args.workers)
        return run(settings, out=sys.stdout, reporting=reporting(args, env, settings.app.name))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG


if __name__ == "__main__":
    # A closed pipe (`--dry-run | head`) or a full disk under stdout: the rest of the output is dropped, never a
    # traceback or an exit code of its own (see knack311/streams.py)
    guard_standard_streams()
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    PROCESS_SIGNALS.ignore_from_now()  # the exit code is decided: a signal now would only turn it into 143
    sys.exit(exit_code)
