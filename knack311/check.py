"""`--check`: the pre-flight. Will a run work, with this environment, config.py entry, certificate and state?

Prints a table (item, OK / WARN / FAIL / SKIP, detail) and exits 0 when nothing FAILs, 2 otherwise. It sends
no message and changes nothing: no Knack update, no ESB POST, no journal or lock, not even STATE_DIR is
created. A FAIL names what to fix: the variable, the config.py key, the Knack field, "expired on DATE". SKIP
marks what could not be checked because something it depends on failed (or was not asked for).

The checks here are pure (values in, rows out) so each is tested on its own; the network parts come in as
callables (NetworkProbes builds them from the settings; check_command wires it all for the entry script):
    fetch_metadata()  -> the app metadata dict (GET /applications/{id}), or raises ConfigError/OutageError
    esb_handshake()   -> rows for a TLS handshake with the ESB presenting our certificate (no request at all)
    knack_usage()     -> rows for the app's daily Knack calls left and the records waiting (one one-record read)
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sqlite3
import stat
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from .access import FOLDER_FIX, access_fix, folder_creation_fix, is_permission_error
from .errors import ConfigError, OutageError
from .esb import ESBUnreachable, Handshake, handshake
from .esb_proxy import esb_proxy_setting, proxy_address
from .fields import TOLERATED_TYPES, resolve_timezone, type_problem
from .healthcheck import healthcheck_url, ping_host
from .journal import LAYOUT_VERSION, journal_path, read_layout
from .knack import DO_NOT_SEND, READY_TO_SEND, SENT, KnackClient, KnackHTTPError
from .logs import log_format_setting, printable, progress_setting
from .metrics import metrics_path
from .pacing import DEFAULT_RESERVE_SHARE, Pacer
from .settings import AppConfig, Settings, load_app, load_settings
from .stopping import CutShort, Stop

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
EXIT_READY, EXIT_NOT_READY = 0, 2
EXIT_STOPPED = 1  # SIGTERM/SIGINT ended the check early: as a run stopped early (README, exit codes)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REQUIRED_VARIABLES = ("KNACK_APP_ID", "KNACK_API_KEY", "ESB_ENDPOINT")
CERT_WARN_DAYS = 30          # time enough to have a certificate renewed by the city's PKI team
LOW_DISK_BYTES = 100 << 20   # the journal is small; this leaves room for it and SQLite's WAL

STATUSES = (READY_TO_SEND, SENT, DO_NOT_SEND)


@dataclass(frozen=True)
class Row:
    item: str
    status: str
    detail: str


Probe = Callable[[], "Row | list[Row]"]


# --- environment ---------------------------------------------------------------------------------------------

def check_environment(env: Mapping[str, str], app_name: str = "") -> list[Row]:
    """The variables: required ones present, optional ones well-formed. Secret values are never shown."""
    rows = []
    for name in REQUIRED_VARIABLES:
        value = env.get(name, "").strip()
        if not value:
            rows.append(Row(name, FAIL, "not set (required)"))
        elif name == "KNACK_API_KEY":
            rows.append(Row(name, OK, "set (not shown)"))
        elif name == "ESB_ENDPOINT":
            parts = urlsplit(value)
            try:
                port = parts.port
            except ValueError:
                rows.append(Row(name, FAIL, "the port is not a number from 1 to 65535"))
                continue
            shown = f"{parts.scheme}://{parts.hostname or ''}{f':{port}' if port else ''}{parts.path}"
            rows.append(Row(name, OK, shown) if parts.scheme == "https" and parts.hostname
                        else Row(name, FAIL, "must be an https:// URL (messages go over mutual TLS)"))
        else:
            rows.append(Row(name, OK, value))
    if env.get("ESB_VERIFY_TLS", "").strip().lower() in ("false", "0", "no"):
        rows.append(Row("ESB_VERIFY_TLS", WARN, "false: the ESB's certificate is NOT verified"))

    def optional(name: str, check: Callable[[str], str]) -> None:
        value = env.get(name, "").strip()
        if value:
            try:
                rows.append(Row(name, OK, check(value)))
            except ConfigError as exc:
                rows.append(Row(name, FAIL, str(exc)))

    optional("ESB_PROXY", _proxy_detail)
    optional("METRICS_FILE", lambda v: str(metrics_path(v, app_name or "{app}")))
    optional("HEALTHCHECK_URL", lambda v: f"pings {ping_host(healthcheck_url(v))} (path not shown: it is the key)")
    optional("LOG_FORMAT", lambda v: log_format_setting(None, env))
    optional("PROGRESS", lambda v: "bar on" if progress_setting(False, env) else "bar off")
    return rows


def _proxy_detail(value: str) -> str:
    proxy = esb_proxy_setting(value)
    credentials = ", with credentials (not shown)" if "@" in proxy else ""
    return (f"http://{proxy_address(proxy)}{credentials}: POSTs and the TLS handshake go through its CONNECT tunnel; "
            "TLS and ESB_CERT stay end to end")


# --- config.py against the Knack app metadata -----------------------------------------------------------------

def check_config_entry(app_name: str, config: Mapping) -> tuple[AppConfig | None, Row]:
    try:
        app = load_app(app_name, dict(config))
    except ConfigError as exc:
        return None, Row("config.py entry", FAIL, str(exc))
    return app, Row("config.py entry", OK, f"{app_name}: obj {app.obj}, view {app.view}, {len(app.fields)} fields, "
                                           f"{len(app.activity_codes)} activity codes")


def check_metadata(app: AppConfig, metadata: object) -> list[Row]:
    """config.py's entry against the app metadata (the reply of GET /applications/{app_id})."""
    application = metadata.get("application") if isinstance(metadata, dict) else None
    if not isinstance(application, dict):
        return [Row("Knack app metadata", FAIL, "the reply has no 'application' (is KNACK_API_URL the Knack API?)")]
    rows = []

    scene, view = _find_view(application, app.view)
    if view is None:
        rows.append(Row(f"view {app.view}", FAIL, f"{app.view} is not in the Knack app (config.py 'view')"))
    else:
        source = (view.get("source") or {}).get("object")
        if source and source != app.obj:
            rows.append(Row(f"view {app.view}", FAIL, f"{app.view} lists records of {source}, not {app.obj}: "
                                                      "config.py 'obj' and 'view' must name the same object"))
        else:
            rows.append(Row(f"view {app.view}", OK, f"{_name(view)} in scene {scene.get('key')} ({_name(scene)})"))

    objects = {o.get("key"): o for o in application.get("objects") or [] if isinstance(o, dict)}
    obj = objects.get(app.obj)
    if obj is None:
        rows.append(Row(f"object {app.obj}", FAIL, f"{app.obj} is not in the Knack app (config.py 'obj')"))
    else:
        rows.append(Row(f"object {app.obj}", OK, f"{_name(obj)}, {len(obj.get('fields') or [])} fields"))

    # A view-based read returns only the fields that are columns of the view.
    columns = None
    if view is not None and view.get("type") == "table" and view.get("columns"):
        columns = {(c.get("field") or {}).get("key") for c in view["columns"] if isinstance(c, dict)}
    for variable, key in app.fields.items():
        if variable != "id":
            rows.append(_check_field(app, variable, key, obj, columns))

    rows.append(_check_timezone(application, app))
    return rows


def _check_field(app: AppConfig, variable: str, key: str, obj: dict | None, columns: set | None) -> Row:
    item = f"field {variable}"
    if obj is None:
        return Row(item, SKIP, f"{key}: object {app.obj} not found")
    fields = {f.get("key"): f for f in obj.get("fields") or [] if isinstance(f, dict)}
    field = fields.get(key)
    if field is None:
        return Row(item, FAIL, f"{key} is not a field of {app.obj} (config.py fields[{variable!r}])")
    knack_type = field.get("type", "")
    tolerated, caveat = TOLERATED_TYPES.get(variable, (frozenset(), ""))
    problem = type_problem(variable, key, knack_type)
    if problem:
        return Row(item, FAIL, problem)
    if columns is not None and key not in columns:
        return Row(item, FAIL, f"{key} is not a column of view {app.view}: its records would come without it "
                               "(add the column in Knack)")
    detail = f"{key} {knack_type} ({_name(field)})"
    if variable == "esb_status":
        options = (field.get("format") or {}).get("options") or []
        missing = [status for status in STATUSES if status not in options]
        if missing:
            return Row(item, FAIL, f"{key} does not offer {', '.join(missing)} (add the option(s) in Knack)")
        return Row(item, OK, f"{detail} offers {', '.join(STATUSES)}")
    if variable == "activity_name" and knack_type == "multiple_choice":
        options = (field.get("format") or {}).get("options") or []
        uncoded = [option for option in options if option not in app.activity_codes]
        if uncoded:
            shown = ", ".join(repr(option) for option in uncoded[:5]) + (", ..." if len(uncoded) > 5 else "")
            return Row(item, WARN, f"{key}: {len(uncoded)} option(s) without a 311 code in config.py activity_codes "
                                   f"({shown}): such activities fail unless they carry a csr_activity_code")
    if knack_type in tolerated:
        return Row(item, WARN, f"{detail}: {caveat}")
    return Row(item, OK, detail)


def _check_timezone(application: dict, app: AppConfig) -> Row:
    knack_name = (application.get("settings") or {}).get("timezone")
    try:
        zone = resolve_timezone(knack_name, app.timezone)
    except ConfigError as exc:
        return Row("timezone", FAIL, str(exc))
    source = f"config.py timezone {app.timezone!r}" if app.timezone else f"Knack's {knack_name!r}"
    return Row("timezone", OK, f"{source} -> {zone.key}")


def _find_view(application: dict, view_key: str) -> tuple[dict, dict | None]:
    for scene in application.get("scenes") or []:
        if isinstance(scene, dict):
            for view in scene.get("views") or []:
                if isinstance(view, dict) and view.get("key") == view_key:
                    return scene, view
    return {}, None


def _name(thing: dict) -> str:
    return repr(thing.get("name") or thing.get("title") or thing.get("key") or "?")


# --- certificates --------------------------------------------------------------------------------------------

def check_client_certificate(cert_path: Path, key_path: Path, now: dt.datetime,
                             warn_days: int = CERT_WARN_DAYS, password: str = "") -> list[Row]:
    """ESB_CERT and ESB_KEY: readable, a certificate in date, and a matching key (unencrypted, or decrypted by
    `password`, ESB_KEY_PASSWORD)."""
    rows = []
    data, problem = _read(cert_path)
    leaf = None
    if problem:
        rows.append(Row("ESB_CERT", FAIL, f"{cert_path} {problem}"))
    else:
        try:
            leaf = x509.load_pem_x509_certificates(data)[0]
        except ValueError:
            rows.append(Row("ESB_CERT", FAIL, f"{cert_path} holds no PEM certificate"))
        else:
            rows.append(_validity("ESB_CERT", leaf, now, warn_days, f"{_common_name(leaf.subject)}, issued by "
                                                                   f"{_common_name(leaf.issuer)}"))

    data, problem = _read(key_path)
    if problem:
        rows.append(Row("ESB_KEY", FAIL, f"{key_path} {problem}"))
        return rows
    encrypted = False
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's way of saying "this key needs a password"
        encrypted = True
        if not password:
            rows.append(Row("ESB_KEY", FAIL, f"{key_path} is encrypted and ESB_KEY_PASSWORD is not set (set it, or "
                                             "decrypt the key: openssl pkey -in KEY -out esb.pem)"))
            return rows
        try:
            key = serialization.load_pem_private_key(data, password=password.encode())
        except (ValueError, TypeError, UnsupportedAlgorithm):
            rows.append(Row("ESB_KEY", FAIL, f"{key_path} is encrypted and ESB_KEY_PASSWORD does not decrypt it"))
            return rows
    except (ValueError, UnsupportedAlgorithm):
        rows.append(Row("ESB_KEY", FAIL, f"{key_path} holds no PEM private key"))
        return rows
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if leaf is None:
        rows.append(Row("ESB_KEY", SKIP, "readable; no certificate to match it against"))
    elif _public_bytes(key.public_key()) != _public_bytes(leaf.public_key()):
        rows.append(Row("ESB_KEY", FAIL, f"{key_path} is not the key of ESB_CERT {cert_path} "
                                         "(a key of another certificate?)"))
    elif mode & stat.S_IROTH:
        rows.append(Row("ESB_KEY", WARN, f"matches ESB_CERT, but every user on this machine can read it "
                                         f"(mode {mode:04o}): chmod 0400 or 0440"))
    else:
        rows.append(Row("ESB_KEY", OK, f"matches ESB_CERT ({'encrypted, ' if encrypted else ''}mode {mode:04o})"))
    return rows


def check_ca_bundle(path: Path, now: dt.datetime, warn_days: int = CERT_WARN_DAYS) -> Row:
    """ESB_CA_BUNDLE: the CA certificates that verify the ESB; the first to expire decides."""
    data, problem = _read(path)
    if problem:
        return Row("ESB_CA_BUNDLE", FAIL, f"{path} {problem}")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        return Row("ESB_CA_BUNDLE", FAIL, f"{path} holds no PEM certificate")
    first = min(certificates, key=lambda c: c.not_valid_after_utc)
    return _validity("ESB_CA_BUNDLE", first, now, warn_days,
                     f"{len(certificates)} CA certificate(s); first to expire: {_common_name(first.subject)}")


def _validity(item: str, certificate: x509.Certificate, now: dt.datetime, warn_days: int, what: str) -> Row:
    ends, begins = certificate.not_valid_after_utc, certificate.not_valid_before_utc
    if now >= ends:
        return Row(item, FAIL, f"{what}: expired on {ends:%Y-%m-%d}: renew it and point {item} at the new file")
    if now < begins:
        return Row(item, FAIL, f"{what}: not valid before {begins:%Y-%m-%d %H:%M} UTC (is this machine's clock right?)")
    days = (ends - now).days
    if days < warn_days:
        return Row(item, WARN, f"{what}: expires on {ends:%Y-%m-%d}, {days} day(s) left: renew it soon")
    return Row(item, OK, f"{what}: expires on {ends:%Y-%m-%d}, {days} days left")


def _read(path: Path) -> tuple[bytes, str]:
    if not path.is_file():
        return b"", "does not exist or is not a file"
    try:
        return path.read_bytes(), ""
    except OSError as exc:
        if is_permission_error(exc):
            return b"", f"cannot be read {access_fix(path)}"
        return b"", f"cannot be read ({exc.strerror})"


def _common_name(name: x509.Name) -> str:
    names = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return f"CN={names[0].value}" if names else name.rfc4514_string() or "(no name)"


def _public_bytes(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- state ---------------------------------------------------------------------------------------------------

def check_state(state_dir: Path, journal: Path, *, in_container: bool | None = None) -> list[Row]:
    """STATE_DIR and the journal, without creating either: a missing journal is what a first run starts with."""
    if in_container is None:
        in_container = Path("/.dockerenv").exists()
    if state_dir.exists() and not state_dir.is_dir():
        return [Row("STATE_DIR", FAIL, f"{state_dir} is not a directory")]
    if not state_dir.exists():
        parent = next((p for p in state_dir.parents if p.exists()), Path("/"))
        if not os.access(parent, os.W_OK | os.X_OK):
            return [Row("STATE_DIR", FAIL, f"{state_dir} does not exist and cannot be created "
                                           f"{folder_creation_fix(state_dir)}")]
        return [Row("STATE_DIR", OK, f"{state_dir} does not exist yet; the first run creates it"),
                Row("journal", OK, "none yet; the first run creates it")]
    if not os.access(state_dir, os.W_OK | os.X_OK):
        return [Row("STATE_DIR", FAIL, f"{state_dir} is not writable {access_fix(state_dir, FOLDER_FIX)}")]
    rows = []
    free = shutil.disk_usage(state_dir).free
    if free < LOW_DISK_BYTES:
        rows.append(Row("STATE_DIR", WARN, f"{state_dir}: writable, but only {free >> 20} MiB free"))
    elif in_container and not os.path.ismount(state_dir):
        rows.append(Row("STATE_DIR", WARN, f"{state_dir} is not a mounted volume: the journal goes with the "
                                           "container, and with it the no-duplicate guarantee"))
    else:
        rows.append(Row("STATE_DIR", OK, f"{state_dir}: writable, {free >> 20} MiB free"))
    rows.append(_check_journal(journal))
    return rows


def _check_journal(path: Path) -> Row:
    if not path.exists():
        return Row("journal", OK, "none yet; the first run creates it")
    if not os.access(path, os.R_OK | os.W_OK):
        return Row("journal", FAIL, f"{path} is not readable and writable {access_fix(path)}")
    try:
        # immutable: read the file as it is, creating no -wal/-shm beside it and taking no lock a run would meet
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True, timeout=2)
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # proves it is a database
            layout, problem = read_layout(db)  # the run's own rule: a layout it would refuse fails here
        finally:
            db.close()
    except sqlite3.Error as exc:
        return Row("journal", FAIL, f"{path} is not a readable SQLite database ({exc}); move it aside only after "
                                    "reading the README on the journal")
    if problem:
        return Row("journal", FAIL, f"{path} has a table layout this version does not know ({problem}): a run "
                                    "refuses it. Run the version that wrote it, or move the file away only after "
                                    "reading the README on the journal")
    changed = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
    upgrade = f" (the next run upgrades it to {LAYOUT_VERSION})" if layout != LAYOUT_VERSION else ""
    return Row("journal", OK, f"{path}: writable, layout version {layout}{upgrade}, last changed "
                              f"{changed:%Y-%m-%d %H:%M} UTC")


# --- the network: the ESB handshake, Knack's usage ------------------------------------------------------------

HANDSHAKE = "ESB TLS handshake"


def handshake_row(result: Handshake, now: dt.datetime, warn_days: int = CERT_WARN_DAYS) -> Row:
    """A handshake the ESB completed: the TLS version and the certificate the ESB presented, with its days left."""
    via = f" through ESB_PROXY {result.proxy}" if result.proxy else ""
    accepted = f"{result.where}{via}: {result.tls_version}, ESB_CERT accepted"
    try:
        server = x509.load_der_x509_certificate(result.server_certificate)
    except ValueError:
        return Row(HANDSHAKE, OK, f"{accepted}; the ESB's certificate could not be read")
    ends = server.not_valid_after_utc
    what = f"{accepted}; the ESB's certificate {_common_name(server.subject)} expires on {ends:%Y-%m-%d}"
    if now >= ends:  # only seen with ESB_VERIFY_TLS=false: verification refuses an expired certificate
        return Row(HANDSHAKE, WARN, f"{accepted}; the ESB's certificate {_common_name(server.subject)} expired on "
                                    f"{ends:%Y-%m-%d}: tell the ESB team")
    days = (ends - now).days
    if days < warn_days:
        return Row(HANDSHAKE, WARN, f"{what}, {days} day(s) left: tell the ESB team")
    return Row(HANDSHAKE, OK, f"{what}, {days} days left")


def knack_usage_rows(view: str, waiting: int | None, headers: Mapping[str, str],
                     wall_clock: Callable[[], float] | None = None) -> list[Row]:
    """Knack's answer to one read of the records to send: how many wait, and the app's daily calls left."""
    # The plan headers read as the run's pacer reads them (X-PlanLimit-Reset comes as epoch seconds or as
    # milliseconds until the reset, depending on whom one believes).
    pacer = Pacer(wall_clock=wall_clock) if wall_clock is not None else Pacer()
    pacer.after_answer(200, headers)
    plan = pacer.plan()
    if plan.remaining is None:
        calls = Row("Knack daily calls", SKIP, "Knack's answer carried no X-PlanLimit-Remaining: calls left unknown")
    else:
        left = f"{plan.remaining:,}" + (f" of {plan.limit:,}" if plan.limit is not None else "") + " left today"
        if plan.resets_at is not None:
            left += f", resets at {dt.datetime.fromtimestamp(plan.resets_at, dt.UTC):%Y-%m-%d %H:%M} UTC"
        if plan.reserve is not None and plan.remaining < plan.reserve:
            calls = Row("Knack daily calls", WARN, f"{left}: under {DEFAULT_RESERVE_SHARE:.0%} of the app's daily "
                                                   "budget, which its other users share")
        else:
            calls = Row("Knack daily calls", OK, left)
    if waiting is None:
        records = Row("records waiting", WARN, f"Knack's count for view {view} (total_records) is not a number")
    else:
        records = Row("records waiting", OK, f"{waiting:,} {READY_TO_SEND} record(s) with an EMI id in view {view}")
    return [calls, records]


class NetworkProbes:
    """The check's requests to Knack and the ESB, made from loaded settings; none of them changes anything.

    Knack's metadata is fetched once: the usage read needs the scene of the view from it, and is not asked when
    the metadata could not be read (it would fail the same way, after the same retries).
    """

    def __init__(self, settings: Settings, *, now: dt.datetime | None = None,
                 log: Callable[[str], None] | None = None, stop: Stop | None = None):
        self._settings = settings
        self._now = now or dt.datetime.now(dt.UTC)
        self._stop = stop if stop is not None else Stop(request_timeout=settings.knack_timeout)
        self._knack = KnackClient(settings.knack_api_url, settings.knack_app_id, settings.knack_api_key,
                                  timeout=settings.knack_timeout, max_rps=settings.knack_max_rps, log=log,
                                  stop=self._stop)
        self._metadata: object = None

    def close(self) -> None:
        self._knack.close()

    def fetch_metadata(self) -> object:
        try:
            self._metadata = self._knack.app_metadata()
        except KnackHTTPError:
            raise  # Knack answered: its answer says what is wrong
        except OutageError as exc:
            raise OutageError(f"{exc}: is KNACK_API_URL right, and Knack reachable from here?") from None
        return self._metadata

    def esb_handshake(self) -> Row:
        s = self._settings
        try:
            # abandoned at once on SIGTERM/SIGINT, like the check's Knack reads (the handshake has its own limit)
            result = self._stop.call(lambda: handshake(s.esb_endpoint, cert=str(s.esb_cert), key=str(s.esb_key),
                                                       key_password=s.esb_key_password, verify=s.esb_verify,
                                                       timeout=s.esb_timeout, proxy=s.esb_proxy),
                                     timeout=s.esb_timeout + 1.0, what=HANDSHAKE)
        except ESBUnreachable as exc:
            return Row(HANDSHAKE, FAIL, str(exc))
        except CutShort as exc:
            return Row(HANDSHAKE, SKIP, f"not finished: {self._stop.signal_name} received" if exc.by_signal
                       else f"no answer within {s.esb_timeout:g}s (ESB_TIMEOUT)")
        return handshake_row(result, self._now)

    def knack_usage(self) -> list[Row]:
        app = self._settings.app
        if self._metadata is None:
            return [Row("Knack usage", SKIP, "not asked: the app metadata could not be read")]
        application = self._metadata.get("application") if isinstance(self._metadata, dict) else None
        scene, view = _find_view(application if isinstance(application, dict) else {}, app.view)
        if view is None or not scene.get("key"):
            return [Row("Knack usage", SKIP, f"not asked: view {app.view} is not in the app")]
        waiting, headers = self._knack.ready_count(scene["key"], app.view, app.fields["emi_id"],
                                                   app.fields["esb_status"])
        return knack_usage_rows(app.view, waiting, headers)


def check_command(app_name: str, env: Mapping[str, str], config: Mapping, *, out: TextIO | None = None,
                  log: Callable[[str], None] | None = None) -> int:
    """`send_esb_message.py APP --check`: load the settings as a dry run would (a missing certificate is a row of
    the table, not an error before it), build the network probes from them, run every check."""
    try:
        settings = load_settings(app_name, dict(env), dict(config), dry_run=True)
    except ConfigError as exc:
        try:
            load_app(app_name, dict(config))
        except ConfigError:
            error = None  # the config.py entry row says it
        else:
            error = str(exc)
        return run_check(app_name, env, config, settings_error=error, out=out)
    # SIGTERM/SIGINT end the check within moments, with the table of what was checked so far
    stop = Stop(request_timeout=settings.knack_timeout)
    stop.install()
    probes = NetworkProbes(settings, log=log, stop=stop)
    try:
        return run_check(app_name, env, config, fetch_metadata=probes.fetch_metadata,
                         esb_handshake=probes.esb_handshake, knack_usage=probes.knack_usage, out=out,
                         stopped=lambda: stop.signal_name if stop.stopped else "")
    finally:
        stop.restore()
        probes.close()


# --- the table -----------------------------------------------------------------------------------------------

def render_table(rows: Iterable[Row], stopped_by: str = "") -> str:
    rows = [Row(printable(r.item), r.status, printable(r.detail)) for r in rows]
    width = max([len("ITEM")] + [len(r.item) for r in rows])
    lines = [f"{'ITEM':<{width}}  STATUS  DETAIL"]
    lines += [f"{r.item:<{width}}  {r.status:<6}  {r.detail}" for r in rows]
    counts = {status: sum(r.status == status for r in rows) for status in (OK, WARN, FAIL, SKIP)}
    verdict = "not ready: fix the FAIL rows" if counts[FAIL] else "ready"
    if stopped_by:
        verdict = f"stopped by {stopped_by} before every item was checked"
    lines.append(f"check: {counts[OK]} OK, {counts[WARN]} WARN, {counts[FAIL]} FAIL, {counts[SKIP]} SKIP: {verdict}")
    return "\n".join(lines) + "\n"


def exit_code(rows: Iterable[Row], stopped_by: str = "") -> int:
    if stopped_by:
        return EXIT_STOPPED
    return EXIT_NOT_READY if any(r.status == FAIL for r in rows) else EXIT_READY


def _env_path(env: Mapping[str, str], name: str, default: str) -> Path:
    """As settings reads it: the variable's path, else the default in the project root."""
    value = env.get(name, "").strip()
    return Path(value).expanduser().absolute() if value else PROJECT_ROOT / default


# the rows whose FAIL keeps the settings from loading, and so the network probes from being built
_SETTINGS_ROWS = frozenset({*REQUIRED_VARIABLES, "settings", "config.py entry"})


def _fix(items: list[str]) -> str:
    """'fix KNACK_API_KEY and the config.py entry first', for a SKIP row."""
    if not items:
        return "the settings did not load"
    named = [f"the {item}" if item == "config.py entry" else f"the {item} row" if item == "settings" else item
             for item in items]
    return f"fix {' and '.join(named)} first"


def _probe(item: str, probe: Probe | None, why_not: str, stopped: Callable[[], str] = lambda: "") -> list[Row]:
    if probe is None:
        return [Row(item, SKIP, why_not)]
    if stopped():
        return [Row(item, SKIP, f"not asked: {stopped()} received")]
    try:
        result = probe()
    except (ConfigError, OutageError) as exc:
        if stopped():  # cut short by the signal: nothing is known either way
            return [Row(item, SKIP, f"not finished: {stopped()} received")]
        return [Row(item, FAIL, str(exc))]
    return result if isinstance(result, list) else [result]


def run_check(app_name: str, env: Mapping[str, str], config: Mapping, *,
              settings_error: str | None = None,
              fetch_metadata: Callable[[], object] | None = None,
              esb_handshake: Probe | None = None,
              knack_usage: Probe | None = None,
              now: dt.datetime | None = None,
              in_container: bool | None = None,
              out: TextIO | None = None,
              stopped: Callable[[], str] = lambda: "") -> int:
    """Run every check, print the table, return the exit code (0 ready, 2 not).

    `settings_error`: the ConfigError text of loading the settings (None when they loaded or were not tried).
    The network callables are None when they cannot run (no valid settings to build a client from): their
    rows are SKIPs, so the table always shows what was and was not checked. `stopped()` names the stop signal
    once one came: what was not checked by then is a SKIP, and the verdict says the check was stopped.
    """
    now = now or dt.datetime.now(dt.UTC)
    rows = check_environment(env, app_name)
    # One row per cause: a settings error about a variable whose row already FAILs (a missing KNACK_API_KEY)
    # would say the same thing twice.
    if settings_error is not None and not any(row.status == FAIL and row.item in settings_error for row in rows):
        rows.append(Row("settings", FAIL, settings_error))
    app, entry_row = check_config_entry(app_name, config)
    rows.append(entry_row)
    # The network probes exist only once the settings load (the required variables and the config.py entry):
    # a SKIP names the rows that stand in the way, not a guess.
    blocked_by = _fix([row.item for row in rows if row.status == FAIL and row.item in _SETTINGS_ROWS])

    if app is None:
        rows.append(Row("Knack app metadata", SKIP, "not fetched: fix the config.py entry first"))
    elif fetch_metadata is None:
        rows.append(Row("Knack app metadata", SKIP, f"not fetched: {blocked_by}"))
    else:
        metadata_rows = _probe("Knack app metadata", lambda: check_metadata(app, fetch_metadata()), "", stopped)
        rows += metadata_rows

    certificates = check_client_certificate(_env_path(env, "ESB_CERT", "esb.cert"),
                                            _env_path(env, "ESB_KEY", "esb.pem"), now,
                                            password=env.get("ESB_KEY_PASSWORD", ""))
    if env.get("ESB_CA_BUNDLE", "").strip():
        certificates.append(check_ca_bundle(_env_path(env, "ESB_CA_BUNDLE", ""), now))
    rows += certificates
    # A handshake with files that already fail would only fail again, less clearly.
    unusable = [row.item for row in certificates if row.status == FAIL]
    rows += _probe("ESB TLS handshake", None if unusable else esb_handshake,
                   f"not tried: {_fix(unusable) if unusable else blocked_by}", stopped)

    state_dir = _env_path(env, "STATE_DIR", "state")
    rows += check_state(state_dir, journal_path(state_dir, app_name), in_container=in_container)
    rows += _probe("Knack usage", knack_usage, f"not asked: {blocked_by}", stopped)

    stream = out if out is not None else sys.stdout
    stream.write(render_table(rows, stopped()))
    stream.flush()
    return exit_code(rows, stopped())
