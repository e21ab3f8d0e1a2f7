"""argv + environment + config.py -> Settings: everything an operator can get wrong is a ConfigError."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import trustme

import config
from knack311 import settings as settings_module
from knack311.errors import ConfigError
from knack311.settings import load_app, load_settings, system_trust_store

PROJECT_ROOT = Path(__file__).resolve().parent.parent   # computed here, not taken from the module under test
API_KEY = "knack-api-key-7f3c9e1d-do-not-log"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A client certificate and key (trustme), and a second pair whose key does not match the first cert."""
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    first = ca.issue_cert("knack-311-client")
    second = ca.issue_cert("knack-311-client")
    paths = {
        "cert": root / "client.cert", "key": root / "client.pem",
        "other_key": root / "other.pem", "ca": root / "ca.pem",
    }
    paths["cert"].write_bytes(first.cert_chain_pems[0].bytes())
    paths["key"].write_bytes(first.private_key_pem.bytes())
    paths["other_key"].write_bytes(second.private_key_pem.bytes())
    paths["ca"].write_bytes(ca.cert_pem.bytes())
    return paths


@pytest.fixture
def env(pki) -> dict[str, str]:
    return {
        "KNACK_APP_ID": "5d79512148c4af00106d1507",
        "KNACK_API_KEY": API_KEY,
        "ESB_ENDPOINT": "https://esb.example.test/AcceptKnack",
        "ESB_CERT": str(pki["cert"]),
        "ESB_KEY": str(pki["key"]),
    }


# --- the shipped config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("app", sorted(config.CONFIG))
def test_shipped_config_loads(app, env):
    s = load_settings(app, env, config.CONFIG)
    entry = config.CONFIG[app]
    assert s.app.name == app
    assert s.app.obj == entry["obj"] and s.app.view == entry["view"]
    assert s.app.fields == entry["fields"]
    assert s.app.activity_codes == entry["activity_codes"]
    assert s.knack_app_id == "5d79512148c4af00106d1507"
    assert s.knack_api_key == API_KEY
    assert s.esb_endpoint == "https://esb.example.test/AcceptKnack"
    assert s.esb_verify == system_trust_store() and s.esb_verify is not False
    assert s.esb_timeout == 30.0
    assert s.knack_api_url == "https://api.knack.com/v1"
    assert s.dry_run is False


def test_both_apps_are_shipped():
    assert set(config.CONFIG) == {"data-tracker", "signs-markings"}


def test_unknown_app_lists_known_names(env):
    with pytest.raises(ConfigError) as err:
        load_settings("parking", env, config.CONFIG)
    message = str(err.value)
    assert "parking" in message
    assert "data-tracker" in message and "signs-markings" in message


@pytest.mark.parametrize("bad", [{}, None, []])
def test_empty_config_is_an_error(bad):
    with pytest.raises(ConfigError):
        load_app("data-tracker", bad)


# --- environment ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["KNACK_APP_ID", "KNACK_API_KEY", "ESB_ENDPOINT"])
@pytest.mark.parametrize("how", ["absent", "empty", "blank"])
def test_each_missing_env_var_is_named(env, name, how):
    if how == "absent":
        del env[name]
    else:
        env[name] = "" if how == "empty" else "   "
    with pytest.raises(ConfigError) as err:
        load_settings("data-tracker", env, config.CONFIG)
    assert name in str(err.value)
    others = {"KNACK_APP_ID", "KNACK_API_KEY", "ESB_ENDPOINT"} - {name}
    assert not any(other in str(err.value) for other in others)


def test_all_missing_env_vars_are_named_at_once():
    with pytest.raises(ConfigError) as err:
        load_settings("data-tracker", {}, config.CONFIG)
    for name in ("KNACK_APP_ID", "KNACK_API_KEY", "ESB_ENDPOINT"):
        assert name in str(err.value)


@pytest.mark.parametrize("endpoint", [
    "http://esb.example.test/AcceptKnack", "esb.example.test/AcceptKnack", "ftp://esb.example.test/", "https://",
    "https:///path-only", "https://[::1", "https://esb.example.test:99999/x", "https://esb example/x",
    "https://esb.example.test/a\nb", "https://esb.example.test:0/x",
])
def test_esb_endpoint_must_be_https(env, endpoint):
    env["ESB_ENDPOINT"] = endpoint
    with pytest.raises(ConfigError) as err:
        load_settings("data-tracker", env, config.CONFIG)
    assert "ESB_ENDPOINT" in str(err.value)


@pytest.mark.parametrize("value", ["abc", "-1", "0", "", "nan"])
def test_esb_timeout_must_be_a_positive_number(env, value):
    env["ESB_TIMEOUT"] = value
    if value == "":
        assert load_settings("data-tracker", env, config.CONFIG).esb_timeout == 30.0
        return
    with pytest.raises(ConfigError) as err:
        load_settings("data-tracker", env, config.CONFIG)
    assert "ESB_TIMEOUT" in str(err.value)


def test_esb_timeout_is_read(env):
    env["ESB_TIMEOUT"] = " 12.5 "
    assert load_settings("data-tracker", env, config.CONFIG).esb_timeout == 12.5


@pytest.mark.parametrize("value", ["inf", "1e400"])
def test_esb_timeout_infinite_is_rejected(env, value):
    env["ESB_TIMEOUT"] = value
    with pytest.raises(ConfigError):
        load_settings("data-tracker", env, config.CONFIG)


@pytest.mark.parametrize("value", ["abc", "-1"])
def test_knack_max_rps_must_be_a_positive_number(env, value):
    env["KNACK_MAX_RPS"] = value
    with pytest.raises(ConfigError) as err:
        load_settings("data-tracker", env, config.CONFIG)
    assert "KNACK_MAX_RPS" in str(err.value)


@pytest.mark.parametrize("url", ["ftp://api.knack.com/v1", "api.knack.com/v1", "http://"])
def test_knack_api_url_must_be_http(env, url):
    env["KNACK_API_URL"] = url
    with pytest.raises(ConfigError) as err:
        load_settings("data-tracker", env, config.CONFIG)
    assert "KNACK_API_URL" in str(err.value)


@pytest.mark.parametrize("url", ["http://[::1", "http://[::1/v1", "http://127.0.0.1:99999/v1", "http://host:port/v1",
                                 "http://knack host/v1", "https://api.knack.com/\nv1", "http://:80/v1",
                                 "http://host:0/v1"])
def test_knack_api_url_that_does_not_parse_is_a_config_error(env, url):
    env["KNACK_API_URL"] = url
    with pytest.raises(ConfigError) as err:
        load_settings("data-tracker", env, config.CONFIG)
    assert "KNACK_API_URL" in str(err.value)


@pytest.mark.parametrize("url", ["http://[::1]:8080/v1", "https://api.knack.com/v1", "http://localhost:65535"])
def test_knack_api_urls_that_parse_are_kept(env, url):
    env["KNACK_API_URL"] = url
    assert load_settings("data-tracker", env, config.CONFIG).knack_api_url == url


@pytest.mark.parametrize("name", ["KNACK_API_KEY", "KNACK_APP_ID"])
@pytest.mark.parametrize("value", ["abc\ndef", "abc\r\nX-Other: 1", "abc\x00def", "abc\x7fdef", "ключ-abc",
                                   "abc\u2028def", "abc\x85def"])
def test_knack_key_or_app_id_a_header_cannot_carry_is_a_config_error_that_never_shows_it(env, name, value):
    env[name] = value
    with pytest.raises(ConfigError) as err:
        load_settings("data-tracker", env, config.CONFIG)
    assert name in str(err.value)
    assert value.strip() not in str(err.value) and "abc" not in str(err.value)


def test_a_latin_1_api_key_is_carried(env):
    env["KNACK_API_KEY"] = "clé-api-1234"
    assert load_settings("data-tracker", env, config.CONFIG).knack_api_key == "clé-api-1234"


@pytest.mark.parametrize("value", ["0.09", "0.05", "50.5", "51", "200"])
def test_knack_max_rps_outside_0_1_to_50_is_a_config_error(env, value):
    env["KNACK_MAX_RPS"] = value
    with pytest.raises(ConfigError) as err:
        load_settings("data-tracker", env, config.CONFIG)
    assert "KNACK_MAX_RPS" in str(err.value) and "0.1" in str(err.value) and "50" in str(err.value)


@pytest.mark.parametrize("value, expected", [("0.1", 0.1), ("50", 50.0), ("8", 8.0), ("", 9.5)])
def test_knack_max_rps_within_bounds_is_kept(env, value, expected):
    env["KNACK_MAX_RPS"] = value
    assert load_settings("data-tracker", env, config.CONFIG).knack_max_rps == expected


def test_knack_api_url_override(env):
    env["KNACK_API_URL"] = "http://127.0.0.1:8765/v1"
    assert load_settings("data-tracker", env, config.CONFIG).knack_api_url == "http://127.0.0.1:8765/v1"


@pytest.mark.parametrize("flag", ["false", "FALSE", "0", "no", " False "])
def test_verify_tls_false(env, pki, flag):
    env["ESB_VERIFY_TLS"] = flag
    env["ESB_CA_BUNDLE"] = str(pki["ca"])   # an explicit "false" wins over a bundle
    assert load_settings("data-tracker", env, config.CONFIG).esb_verify is False


@pytest.mark.parametrize("flag", ["true", "1", "yes", ""])
def test_verify_tls_true(env, flag):
    env["ESB_VERIFY_TLS"] = flag
    # verification on, against the operating system's trust store (not requests' own bundle)
    assert load_settings("data-tracker", env, config.CONFIG).esb_verify == system_trust_store()


def test_system_trust_store_is_the_openssl_default(monkeypatch, tmp_path):
    cafile = tmp_path / "system-ca.pem"
    cafile.write_text("")
    paths = settings_module.ssl.DefaultVerifyPaths(str(cafile), str(tmp_path), "", "", "", "")
    monkeypatch.setattr(settings_module.ssl, "get_default_verify_paths", lambda: paths)
    assert system_trust_store() == str(cafile)
    paths = settings_module.ssl.DefaultVerifyPaths(None, str(tmp_path), "", "", "", "")
    assert system_trust_store() == str(tmp_path)
    paths = settings_module.ssl.DefaultVerifyPaths(None, None, "", "", "", "")
    assert system_trust_store() is True


def test_verify_tls_nonsense_is_an_error(env):
    env["ESB_VERIFY_TLS"] = "maybe"
    with pytest.raises(ConfigError) as err:
        load_settings("data-tracker", env, config.CONFIG)
    assert "ESB_VERIFY_TLS" in str(err.value)


def test_ca_bundle_is_used(env, pki):
    env["ESB_CA_BUNDLE"] = str(pki["ca"])
    assert load_settings("data-tracker", env, config.CONFIG).esb_verify == str(pki["ca"])


def test_ca_bundle_missing_is_an_error(env, tmp_path):
    env["ESB_CA_BUNDLE"] = str(tmp_path / "nope.pem")
    with pytest.raises(ConfigError) as err:
        load_settings("data-tracker", env, config.CONFIG)
    assert "ESB_CA_BUNDLE" in str(err.value)


def test_ca_bundle_without_a_certificate_is_an_error(env, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("this is not a certificate\n")
    env["ESB_CA_BUNDLE"] = str(junk)
    with pytest.raises(ConfigError) as err:
        load_settings("data-tracker", env, config.CONFIG)
    assert "ESB_CA_BUNDLE" in str(err.value)


# --- client certificate and key ------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["ESB_CERT", "ESB_KEY"])
def test_missing_cert_or_key(env, tmp_path, which):
    env[which] = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError) as err:
        load_settings("data-tracker", env, config.CONFIG)
    assert which in str(err.value)
    assert "missing.pem" in str(err.value)


@pytest.mark.parametrize("which", ["ESB_CERT", "ESB_KEY"])
def test_cert_or_key_that_is_a_directory(env, tmp_path, which):
    env[which] = str(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_settings("data-tracker", env, config.CONFIG)
    assert which in str(err.value)


def test_cert_and_key_that_do_not_match(env, pki):
    env["ESB_KEY"] = str(pki["other_key"])
    with pytest.raises(ConfigError) as err:
        load_settings("data-tracker", env, config.CONFIG)
    message = str(err.value)
    assert "ESB_CERT" in message and "ESB_KEY" in message
    assert "BEGIN" not in message and "PRIVATE" not in message
    for path in (pki["cert"], pki["other_key"]):
        for line in path.read_text().splitlines():
            if line and not line.startswith("-----"):
                assert line not in message
    # nothing chained either, so a traceback could not show it
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_key_in_place_of_cert(env, pki):
    env["ESB_CERT"] = str(pki["key"])
    with pytest.raises(ConfigError) as err:
        load_settings("data-tracker", env, config.CONFIG)
    assert "BEGIN" not in str(err.value) and "PRIVATE" not in str(err.value)


def test_dry_run_skips_the_cert_check(env, tmp_path):
    env["ESB_CERT"] = str(tmp_path / "missing.cert")
    env["ESB_KEY"] = str(tmp_path / "missing.pem")
    s = load_settings("data-tracker", env, config.CONFIG, dry_run=True)
    assert s.dry_run is True
    assert s.esb_cert == tmp_path / "missing.cert"


def test_defaults_resolve_to_the_project_root_whatever_the_cwd(env, tmp_path, monkeypatch):
    for name in ("ESB_CERT", "ESB_KEY", "STATE_DIR"):
        env.pop(name, None)
    monkeypatch.chdir(tmp_path)
    s = load_settings("data-tracker", env, config.CONFIG, dry_run=True)
    assert settings_module.PROJECT_ROOT == PROJECT_ROOT
    assert s.esb_cert == PROJECT_ROOT / "esb.cert"
    assert s.esb_key == PROJECT_ROOT / "esb.pem"
    assert s.state_dir == PROJECT_ROOT / "state"
    assert all(p.is_absolute() for p in (s.esb_cert, s.esb_key, s.state_dir))


def test_relative_paths_from_env_are_made_absolute(env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env.update({"ESB_CERT": "certs/c.pem", "ESB_KEY": "certs/k.pem", "STATE_DIR": "st"})
    s = load_settings("data-tracker", env, config.CONFIG, dry_run=True)
    assert s.esb_cert == tmp_path / "certs" / "c.pem"
    assert s.esb_key == tmp_path / "certs" / "k.pem"
    assert s.state_dir == tmp_path / "st"


def test_max_runtime_must_be_positive(env):
    with pytest.raises(ConfigError):
        load_settings("data-tracker", env, config.CONFIG, max_runtime=0)
    assert load_settings("data-tracker", env, config.CONFIG, max_runtime=60).max_runtime == 60


def test_workers_default_and_range(env):
    default = load_settings("data-tracker", env, config.CONFIG)
    assert default.workers is None and default.adaptive  # the POSTs in flight follow the ESB's answers
    assert default.esb_in_flight == default.pool_size == settings_module.DEFAULT_ESB_MAX_IN_FLIGHT == 32
    assert not load_settings("data-tracker", env, config.CONFIG, workers=8).adaptive
    assert load_settings("data-tracker", env, config.CONFIG, workers=1).workers == 1
    for bad in (0, settings_module.MAX_WORKERS + 1):
        with pytest.raises(ConfigError, match="--workers"):
            load_settings("data-tracker", env, config.CONFIG, workers=bad)


@pytest.mark.parametrize("value, workers, in_flight", [("", 8, 8), ("3", 8, 3), ("32", 4, 4), (" 2 ", 1, 1),
                                                       ("", None, 32), ("5", None, 5)])
def test_esb_max_in_flight_bounds_the_posts_never_beyond_the_workers(env, value, workers, in_flight):
    env["ESB_MAX_IN_FLIGHT"] = value
    assert load_settings("data-tracker", env, config.CONFIG, workers=workers).esb_in_flight == in_flight


@pytest.mark.parametrize("value", ["0", "33", "-1", "2.5", "two", "\u00b2"])
def test_esb_max_in_flight_must_be_a_whole_number_in_range(env, value):
    env["ESB_MAX_IN_FLIGHT"] = value
    with pytest.raises(ConfigError, match="ESB_MAX_IN_FLIGHT"):
        load_settings("data-tracker", env, config.CONFIG)


@pytest.mark.parametrize("value, expected", [("", None), ("  ", None), ("0", 0), ("250", 250), (" 1000 ", 1000),
                                             ("999999999", 999_999_999)])
def test_knack_plan_reserve_is_a_whole_number_of_calls_or_unset(env, value, expected):
    env["KNACK_PLAN_RESERVE"] = value
    assert load_settings("data-tracker", env, config.CONFIG).knack_plan_reserve == expected


def test_knack_plan_reserve_unset_leaves_the_share_to_the_pacer(env):
    env.pop("KNACK_PLAN_RESERVE", None)
    assert load_settings("data-tracker", env, config.CONFIG).knack_plan_reserve is None


@pytest.mark.parametrize("value", ["-1", "2.5", "10%", "ten", "1e3", "\u00b2", "1000000000", "9" * 5000])
def test_knack_plan_reserve_that_is_no_whole_number_of_calls_is_a_config_error(env, value):
    env["KNACK_PLAN_RESERVE"] = value
    with pytest.raises(ConfigError, match="KNACK_PLAN_RESERVE"):
        load_settings("data-tracker", env, config.CONFIG)


# --- malformed config entries ----------------------------------------------------------------------------------

def broken(mutate) -> dict:
    cfg = copy.deepcopy(config.CONFIG)
    mutate(cfg["data-tracker"])
    return cfg


@pytest.mark.parametrize("mutate, names", [
    (lambda e: e.update(obj="objects_x"), ["obj", "objects_x"]),
    (lambda e: e.update(obj=75), ["obj"]),
    (lambda e: e.pop("obj"), ["obj"]),
    (lambda e: e.pop("view"), ["view"]),
    (lambda e: e.update(view="view 1653"), ["view"]),
    (lambda e: e["fields"].pop("emi_id"), ["emi_id"]),
    (lambda e: e["fields"].pop("sr_number"), ["sr_number"]),
    (lambda e: e["fields"].update(sr_number="fld_1"), ["sr_number", "fld_1"]),
    (lambda e: e["fields"].update(id="field_1"), ["id"]),
    (lambda e: e["fields"].update(colour="field_12"), ["colour"]),
    (lambda e: e.update(fields=["field_1"]), ["fields"]),
    (lambda e: e["activity_codes"].update({"Adjust Timing": 5}), ["activity_codes"]),
    (lambda e: e["activity_codes"].update({"Adjust Timing": "  "}), ["activity_codes"]),
    (lambda e: e.update(activity_codes=["IDENASSE"]), ["activity_codes"]),
    (lambda e: e.update(colour="blue"), ["colour"]),
    (lambda e: e.update(timezone="Central Time (US & Canada)"), ["timezone", "Central Time (US & Canada)"]),
    (lambda e: e.update(timezone="Mars/Olympus_Mons"), ["timezone"]),
    (lambda e: e.update(timezone=5), ["timezone"]),
])
def test_malformed_config_names_the_problem(env, mutate, names):
    with pytest.raises(ConfigError) as err:
        load_settings("data-tracker", env, broken(mutate))
    message = str(err.value)
    assert "data-tracker" in message
    for name in names:
        assert name in message


def test_entry_that_is_not_a_dict(env):
    with pytest.raises(ConfigError) as err:
        load_app("data-tracker", {"data-tracker": "object_75"})
    assert "data-tracker" in str(err.value)


def test_optional_keys_may_be_left_out():
    cfg = broken(lambda e: (e.pop("activity_codes"), e["fields"].pop("csr_activity_id"),
                            e["fields"].pop("csr_activity_code")))
    app = load_app("data-tracker", cfg)
    assert app.activity_codes == {}
    assert "csr_activity_id" not in app.fields and app.timezone is None


def test_timezone_override_is_kept():
    app = load_app("data-tracker", broken(lambda e: e.update(timezone="America/Chicago")))
    assert app.timezone == "America/Chicago"


def test_load_app_does_not_share_the_config_dicts():
    cfg = copy.deepcopy(config.CONFIG)
    app = load_app("data-tracker", cfg)
    cfg["data-tracker"]["fields"]["sr_number"] = "field_9"
    assert app.fields["sr_number"] == config.CONFIG["data-tracker"]["fields"]["sr_number"]


# --- secrets ---------------------------------------------------------------------------------------------------

def test_api_key_never_in_repr(env):
    s = load_settings("data-tracker", env, config.CONFIG)
    assert s.knack_api_key == API_KEY
    assert API_KEY not in repr(s)
    assert API_KEY not in str(s)
    assert not re.search(r"7f3c9e1d", repr(s))


# --- KNACK_TIMEOUT: Knack's own request timeout, ESB_TIMEOUT's value unless set ----------------------------------

def test_knack_timeout_defaults_to_esb_timeout(env):
    assert load_settings("data-tracker", env, config.CONFIG).knack_timeout == 30.0
    env["ESB_TIMEOUT"] = "12.5"
    s = load_settings("data-tracker", env, config.CONFIG)
    assert s.knack_timeout == 12.5 and s.esb_timeout == 12.5


def test_knack_timeout_is_read_apart_from_esb_timeout(env):
    env["ESB_TIMEOUT"] = "40"
    env["KNACK_TIMEOUT"] = " 7 "
    s = load_settings("data-tracker", env, config.CONFIG)
    assert s.knack_timeout == 7.0 and s.esb_timeout == 40.0


@pytest.mark.parametrize("value", ["abc", "-1", "0", "nan", "inf", "1e400"])
def test_knack_timeout_is_validated_like_esb_timeout(env, value):
    env["KNACK_TIMEOUT"] = value
    with pytest.raises(ConfigError) as err:
        load_settings("data-tracker", env, config.CONFIG)
    assert "KNACK_TIMEOUT" in str(err.value) and "ESB_TIMEOUT" not in str(err.value)
