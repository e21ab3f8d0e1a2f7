"""argv + environment + config.py -> Settings, validated once, before any network call."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from urllib3.util import parse_url

from . import pacing
from .access import access_fix, is_permission_error
from .errors import ConfigError
from .esb import tls_context
from .esb_proxy import esb_proxy_setting

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# template variable -> required?  (the csr_* fields are optional: a record without them sends "")
TEMPLATE_FIELDS = {
    "id": True,
    "atd_activity_id": True,
    "emi_id": True,
    "sr_number": True,
    "issue_status_code_snapshot": True,
    "esb_status": True,
    "activity_datetime": True,
    "activity_details": True,
    "activity_name": True,
    "csr_activity_id": False,
    "csr_activity_code": False,
}

DEFAULT_MAX_RUNTIME = 240.0  # seconds: finish inside a 5-minute scheduler timeout
MAX_PLAN_RESERVE = 999_999_999  # daily calls: Knack's largest plan has 25,000; more digits is a typo
KNACK_RPS_RANGE = (0.1, 50.0)  # Knack allows an app 10 requests a second; beyond 50 is a typo, below 0.1 a stall
MAX_WORKERS = 32
# ESB POSTs at once at most (ESB_MAX_IN_FLIGHT). Without --workers the number in flight adapts to the ESB's answers
# (limiter.py) up to this; 32 is what Knack's 10 records/s need from an ESB answering in 3 s (Little's law: 10 x 3
# plus a little headroom), and the most a SIGKILL can then leave in doubt.
DEFAULT_ESB_MAX_IN_FLIGHT = MAX_WORKERS


@dataclass(frozen=True)
class AppConfig:
    name: str
    obj: str
    view: str
    fields: dict[str, str]
    activity_codes: dict[str, str | None]
    timezone: str | None = None


@dataclass(frozen=True)
class Settings:
    app: AppConfig
    knack_app_id: str
    knack_api_key: str = field(repr=False)
    knack_api_url: str
    knack_max_rps: float
    esb_endpoint: str
    esb_cert: Path
    esb_key: Path
    esb_verify: bool | str  # True (system store), a CA bundle path, or False on explicit request
    esb_timeout: float
    state_dir: Path
    dry_run: bool = False
    max_runtime: float = DEFAULT_MAX_RUNTIME
    esb_key_password: str = field(default="", repr=False)  # decrypts an encrypted ESB_KEY; never printed
    workers: int | None = None  # --workers N: a fixed number of records at once; None: adaptive (limiter.py)
    esb_max_in_flight: int | None = None  # ESB_MAX_IN_FLIGHT; None: DEFAULT_ESB_MAX_IN_FLIGHT
    knack_plan_reserve: int | None = None  # KNACK_PLAN_RESERVE; None: 10% of Knack's daily plan limit
    knack_timeout: float = 30.0  # KNACK_TIMEOUT; load_settings defaults it to ESB_TIMEOUT's value
    esb_proxy: str = field(default="", repr=False)  # ESB_PROXY, "" for none; may hold credentials: never printed

    @property
    def adaptive(self) -> bool:
        """Whether the ESB POSTs in flight follow the ESB's answers (no --workers)."""
        return self.workers is None

    @property
    def esb_in_flight(self) -> int:
        """ESB POSTs allowed at once at most: ESB_MAX_IN_FLIGHT, never more than --workers."""
        return min(self.esb_max_in_flight or DEFAULT_ESB_MAX_IN_FLIGHT, self.workers or MAX_WORKERS)

    @property
    def pool_size(self) -> int:
        """Records delivered at once: --workers, else as many as POSTs may be in flight (a worker waiting for its
        POST's turn costs a thread; the limit decides how many POST)."""
        return self.workers or self.esb_in_flight


def load_app(name: str, config: dict) -> AppConfig:
    if not isinstance(config, dict) or not config:
        raise ConfigError("config.py: CONFIG must be a non-empty dict of app name -> settings")
    if name not in config:
        raise ConfigError(f"unknown app {name!r}; known apps: {', '.join(sorted(config))}")
    entry = config[name]
    where = f"config.py {name!r}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: entry must be a dict")
    unknown = set(entry) - {"obj", "view", "fields", "activity_codes", "timezone"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    obj, view = entry.get("obj"), entry.get("view")
    if not isinstance(obj, str) or not re.fullmatch(r"object_\d+", obj):
        raise ConfigError(f"{where}: 'obj' must be a Knack object key such as 'object_75', not {obj!r}")
    if not isinstance(view, str) or not re.fullmatch(r"view_\d+", view):
        raise ConfigError(f"{where}: 'view' must be a Knack view key such as 'view_1653', not {view!r}")
    fields = entry.get("fields")
    if not isinstance(fields, dict):
        raise ConfigError(f"{where}: 'fields' must be a dict of template variable -> Knack field key")
    for variable, required in TEMPLATE_FIELDS.items():
        if required and variable not in fields:
            raise ConfigError(f"{where}: 'fields' lacks {variable!r}")
    for variable, key in fields.items():
        if variable not in TEMPLATE_FIELDS:
            raise ConfigError(f"{where}: 'fields' has unknown template variable {variable!r}")
        expected = r"id" if variable == "id" else r"field_\d+"
        if not isinstance(key, str) or not re.fullmatch(expected, key):
            wanted = "'id'" if variable == "id" else "a key such as field_1051"
            raise ConfigError(f"{where}: fields[{variable!r}] must be {wanted}, not {key!r}")
    codes = entry.get("activity_codes", {})
    if not isinstance(codes, dict) or not all(
            isinstance(k, str) and (v is None or (isinstance(v, str) and v.strip())) for k, v in codes.items()):
        raise ConfigError(f"{where}: 'activity_codes' must map activity names to a 311 code or None")
    timezone = entry.get("timezone")
    if timezone is not None:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ConfigError(
                f"{where}: 'timezone' {timezone!r} is not an IANA name such as 'America/Chicago'") from None
    return AppConfig(name=name, obj=obj, view=view, fields=dict(fields), activity_codes=dict(codes), timezone=timezone)


def load_settings(app_name: str, env: dict[str, str], config: dict, *, dry_run: bool = False,
                  max_runtime: float = DEFAULT_MAX_RUNTIME, workers: int | None = None) -> Settings:
    app = load_app(app_name, config)

    missing = [name for name in ("KNACK_APP_ID", "KNACK_API_KEY", "ESB_ENDPOINT") if not env.get(name, "").strip()]
    if missing:
        raise ConfigError(f"missing environment variable(s): {', '.join(missing)}")

    knack_api_url = _knack_api_url(env)
    for name in ("KNACK_APP_ID", "KNACK_API_KEY"):
        _header_safe(env[name].strip(), name)
    esb_endpoint = _esb_endpoint(env["ESB_ENDPOINT"].strip())
    esb_proxy = esb_proxy_setting(env.get("ESB_PROXY", ""))

    esb_timeout = _positive_number(env, "ESB_TIMEOUT", 30.0)
    # Knack and the ESB answer at their own pace; one timeout used to serve both, so a setup tuned with
    # ESB_TIMEOUT alone keeps working when KNACK_TIMEOUT is left unset.
    knack_timeout = _positive_number(env, "KNACK_TIMEOUT", esb_timeout)
    knack_max_rps = _positive_number(env, "KNACK_MAX_RPS", pacing.DEFAULT_MAX_RPS)
    if not KNACK_RPS_RANGE[0] <= knack_max_rps <= KNACK_RPS_RANGE[1]:
        raise ConfigError(f"KNACK_MAX_RPS must be between {KNACK_RPS_RANGE[0]:g} and {KNACK_RPS_RANGE[1]:g} requests "
                          f"a second (Knack allows an app 10), not {env['KNACK_MAX_RPS'].strip()!r}")
    knack_plan_reserve = _plan_reserve(env)

    verify_flag = env.get("ESB_VERIFY_TLS", "").strip().lower()
    if verify_flag not in ("", "true", "1", "yes", "false", "0", "no"):
        raise ConfigError(f"ESB_VERIFY_TLS must be true or false, not {verify_flag!r}")
    esb_verify: bool | str = system_trust_store()
    ca_bundle = env.get("ESB_CA_BUNDLE", "").strip()
    if verify_flag in ("false", "0", "no"):
        esb_verify = False
    elif ca_bundle:
        ca_bundle = str(Path(ca_bundle).expanduser().absolute())
        _readable(Path(ca_bundle), "ESB_CA_BUNDLE")
        try:
            ssl.create_default_context(cafile=ca_bundle)
        except (ssl.SSLError, ValueError):
            raise ConfigError(f"ESB_CA_BUNDLE {ca_bundle} holds no usable CA certificate") from None
        esb_verify = ca_bundle

    esb_cert = _path(env, "ESB_CERT", "esb.cert")
    esb_key = _path(env, "ESB_KEY", "esb.pem")
    esb_key_password = env.get("ESB_KEY_PASSWORD", "")  # as given: a passphrase may begin or end with a space
    if not dry_run:  # a dry run sends nothing, so it can be tried without the certificates
        _readable(esb_cert, "ESB_CERT (client certificate)")
        _readable(esb_key, "ESB_KEY (client key)")
        # the context the ESB client will build: an encrypted key without its password fails here, never prompts
        tls_context(str(esb_cert), str(esb_key), esb_key_password, esb_verify)

    state_dir = _path(env, "STATE_DIR", "state")
    if max_runtime <= 0:
        raise ConfigError("--max-runtime must be a positive number of seconds")
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be a whole number from 1 to {MAX_WORKERS}, not {workers!r}")
    esb_max_in_flight = _count_setting(env, "ESB_MAX_IN_FLIGHT", MAX_WORKERS)

    return Settings(
        app=app, knack_app_id=env["KNACK_APP_ID"].strip(), knack_api_key=env["KNACK_API_KEY"].strip(),
        knack_api_url=knack_api_url, knack_max_rps=knack_max_rps, esb_endpoint=esb_endpoint,
        esb_cert=esb_cert, esb_key=esb_key, esb_verify=esb_verify, esb_timeout=esb_timeout,
        state_dir=state_dir, dry_run=dry_run, max_runtime=max_runtime, esb_key_password=esb_key_password,
        workers=workers, esb_max_in_flight=esb_max_in_flight, knack_plan_reserve=knack_plan_reserve,
        knack_timeout=knack_timeout, esb_proxy=esb_proxy,
    )


def _knack_api_url(env: dict[str, str]) -> str:
    """KNACK_API_URL, refused here if requests could not use it (it would fail later with a traceback)."""
    url = env.get("KNACK_API_URL", "").strip() or "https://api.knack.com/v1"
    wanted = "an http(s) URL such as https://api.knack.com/v1"
    if any(not c.isprintable() or c.isspace() for c in url):
        raise ConfigError(f"KNACK_API_URL must be {wanted}, without spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number or out of range
        parse_url(url)  # what requests will make of it
    except ValueError as exc:
        raise ConfigError(f"KNACK_API_URL must be {wanted}, not {url!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise ConfigError(f"KNACK_API_URL must be {wanted}, not {url!r}")
    return url


def _esb_endpoint(url: str) -> str:
    """ESB_ENDPOINT, refused here if requests could not use it (it would fail later with a traceback)."""
    wanted = "ESB_ENDPOINT must be an https:// URL (messages go over mutual TLS)"
    if any(not c.isprintable() or c.isspace() for c in url):
        raise ConfigError(f"{wanted}, without spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number or out of range
        parse_url(url)
    except ValueError as exc:
        raise ConfigError(f"{wanted}, not {url!r} ({exc})") from None
    if parts.scheme != "https" or not parts.hostname or port == 0:
        raise ConfigError(f"{wanted}, not {url!r}")
    return url


def _header_safe(value: str, name: str) -> None:
    """The value travels in an HTTP header, which cannot carry line breaks, other control characters or
    characters beyond Latin-1. The value itself is never printed: it may be a secret."""
    if any(ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 or ord(c) > 0xff for c in value):
        raise ConfigError(f"{name} holds a character an HTTP header cannot carry (a line break, a control "
                          "character or a non-Latin-1 character); copy it again from Knack's settings")


def _path(env: dict[str, str], name: str, default: str) -> Path:
    """A path from the environment (as given), or the default in the project root, whatever the working directory."""
    value = env.get(name, "").strip()
    return Path(value).expanduser().absolute() if value else PROJECT_ROOT / default


def system_trust_store() -> bool | str:
    """The operating system's CA certificates (OpenSSL's default file or directory), for requests' verify.

    requests would otherwise trust only its own certifi bundle; an ESB signed by a CA that the machine's
    administrators installed must verify too. True (certifi) when the system has none.
    """
    paths = ssl.get_default_verify_paths()
    if paths.cafile and Path(paths.cafile).is_file():
        return paths.cafile
    if paths.capath and Path(paths.capath).is_dir():
        return paths.capath
    return True


def _readable(path: Path, what: str) -> None:
    if not path.is_file():
        raise ConfigError(f"{what}: {path} does not exist or is not a file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        if is_permission_error(exc):  # the container's uid meets a file made by another user
            raise ConfigError(f"{what}: {path} cannot be read {access_fix(path)}") from None
        raise ConfigError(f"{what}: {path} cannot be read ({exc.strerror})") from None


def _count_setting(env: dict[str, str], name: str, most: int) -> int | None:
    """A whole number from 1 to `most` from the environment; None when unset."""
    text = env.get(name, "").strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= most:
        raise ConfigError(f"{name} must be a whole number from 1 to {most}, not {text!r}")
    return int(text)


def _plan_reserve(env: dict[str, str]) -> int | None:
    """KNACK_PLAN_RESERVE: the daily Knack calls to leave for the app's other users (a whole number, 0 allowed);
    None when unset, for the pacer's default share of the plan's limit."""
    text = env.get("KNACK_PLAN_RESERVE", "").strip()
    if not text:
        return None
    # the length first: int() of thousands of digits raises instead of answering
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(MAX_PLAN_RESERVE)) \
            or int(text) > MAX_PLAN_RESERVE:
        raise ConfigError("KNACK_PLAN_RESERVE must be a whole number of daily Knack calls (0 or more) to leave for "
                          f"the app's other users, or empty for 10% of the plan's daily limit, not {text[:40]!r}")
    return int(text)


def _positive_number(env: dict[str, str], name: str, default: float) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {text!r}") from None
    if not 0 < value < 1e6:  # also refuses nan and inf, which sockets cannot take as a timeout
        raise ConfigError(f"{name} must be a positive number below 1000000, not {text!r}")
    return value
