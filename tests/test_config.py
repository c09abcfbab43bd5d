"""proxy/config/__init__.py: YAML -> Config; every error names the file, the key path and the problem."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.config import Config, load_config, parse_config
from proxy.config.prices import load_price_table
from proxy.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "example.yaml"
PRICES = REPO / "config" / "prices.yaml"
PRICED_MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
DIGEST = hashlib.sha256(b"tm-some-key").hexdigest()

BASE: dict[str, Any] = {
    "listen": {"host": "127.0.0.1", "port": 8787},
    "admin": {"host": "127.0.0.1", "port": 9787},
    "upstream": {
        "url": "https://api.together.xyz/v1",
        "timeouts": {"connect": 10, "first_byte": 120, "idle": 60, "total": 900},
        "max_connections": 256,
        "client_abort_grace": 5,
    },
    "ledger": {"backend": "sqlite", "path": "data/meter.db", "synchronous": "normal"},
    "limits": {"max_body_bytes": 4194304, "drain_timeout": 30},
    "prices": "prices.yaml",
    "unpriced_models": "reject",
    "attribution": {"features": ["chat"], "environments": ["prod"]},
    "tenants": {"acme": {"keys_sha256": [DIGEST]}, "globex": {"models": [PRICED_MODEL]}},
}


def write_config(directory: Path, data: Any, *, prices: bool = True, name: str = "meter.yaml") -> Path:
    """Write `data` as a config file (and a copy of the project's prices next to it)."""
    if prices:
        (directory / "prices.yaml").write_text(PRICES.read_text(encoding="utf-8"), encoding="utf-8")
    path = directory / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def with_value(path: str, value: Any) -> dict[str, Any]:
    """BASE with the dotted key `path` set to `value`."""
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return data


def config_error(tmp_path: Path, data: Any, **kw: Any) -> ConfigError:
    path = write_config(tmp_path, data, **kw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def assert_names(err: ConfigError, file: Path | str, key: str, *words: str) -> None:
    """The error names the file, the key path and the problem, in its fields and its message."""
    assert err.file == str(file)
    assert err.key == key
    message = str(err)
    assert str(file) in message
    assert key in message
    for word in words:
        assert word in err.problem


# -- valid configs ------------------------------------------------------------------------------


def test_example_config_loads() -> None:
    """config/example.yaml loads, with its prices resolved next to it."""
    config = load_config(EXAMPLE)
    assert isinstance(config, Config)
    assert set(config.tenants) == {"acme", "globex"}
    assert config.prices_file == str(EXAMPLE.parent / "prices.yaml")
    assert len(config.prices) == len(load_price_table(PRICES))
    assert config.tenants["globex"].models is not None
    assert all(m in config.prices for m in config.tenants["globex"].models)


def test_full_config_values_are_read(tmp_path: Path) -> None:
    """Every section's values land in the typed Config."""
    config = load_config(write_config(tmp_path, with_value("upstream.url", "http://127.0.0.1:9/v1/")))
    assert config.upstream.url == "http://127.0.0.1:9/v1"
    assert config.upstream.idle_timeout == 60.0
    assert config.listen.port == 8787 and config.admin.port == 9787
    assert config.limits.max_body_bytes == 4194304
    assert config.attribution.features == ("chat",)
    assert config.key_index() == {DIGEST: "acme"}
    assert config.tenants["globex"].models == (PRICED_MODEL,)


def test_upstream_defaults_to_together_ai_without_an_inference_host(tmp_path: Path) -> None:
    """No upstream section: together's current API host, every route to it."""
    data = copy.deepcopy(BASE)
    del data["upstream"]
    config = load_config(write_config(tmp_path, data))
    assert config.upstream.url == "https://api.together.ai/v1"
    assert config.upstream.inference_url is None


def test_upstream_inference_url_is_read(tmp_path: Path) -> None:
    """upstream.inference_url is read (trailing '/' removed) next to url; the .xyz host still loads."""
    data = with_value("upstream.inference_url", "https://api-inference.together.ai/v1/")
    config = load_config(write_config(tmp_path, data))
    assert config.upstream.url == "https://api.together.xyz/v1"
    assert config.upstream.inference_url == "https://api-inference.together.ai/v1"


def test_keys_file_digests_are_merged(tmp_path: Path) -> None:
    """Digests from keys_file are added to their tenants (duplicates once)."""
    other = hashlib.sha256(b"tm-other").hexdigest()
    (tmp_path / "keys.yaml").write_text(
        yaml.safe_dump(
            {"keys": [{"tenant": "globex", "sha256": other}, {"tenant": "acme", "sha256": DIGEST}]}
        )
    )
    config = load_config(write_config(tmp_path, {**BASE, "keys_file": "keys.yaml"}))
    assert config.key_index() == {DIGEST: "acme", other: "globex"}
    assert config.tenants["acme"].key_digests == (DIGEST,)


def test_forward_policy_allows_unpriced_models_in_allow_lists(tmp_path: Path) -> None:
    """With unpriced_models: forward, an allow-list may name a model without a price."""
    data = with_value("tenants.globex.models", ["vendor/unpriced-model"])
    data["unpriced_models"] = "forward"
    assert load_config(write_config(tmp_path, data)).unpriced_models == "forward"


# -- errors name file, key path and problem -----------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    """An unknown top-level key is named."""
    err = config_error(tmp_path, {**BASE, "listn": {"port": 1}})
    assert_names(err, tmp_path / "meter.yaml", "listn", "unknown key")


def test_unknown_nested_key(tmp_path: Path) -> None:
    """An unknown nested key is named with its full path."""
    err = config_error(tmp_path, with_value("upstream.timeouts.idel", 5))
    assert_names(err, tmp_path / "meter.yaml", "upstream.timeouts.idel", "unknown key")


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("listen.port", 70000, ("integer",)),
        ("listen.port", -1, ("integer",)),
        ("listen.port", "8787", ("integer",)),
        ("admin.port", True, ("integer",)),
        ("listen.host", 127, ("string",)),
        ("listen", [8787], ("mapping",)),
        ("upstream.url", "ftp://example.com", ("URL",)),
        ("upstream.url", "https://api.together.ai/v1?x=1", ("URL",)),
        ("upstream.url", "https://user:pw@api.together.ai/v1", ("URL",)),
        ("upstream.inference_url", "api-inference.together.ai", ("URL",)),
        ("upstream.inference_url", 7, ("string",)),
        ("upstream.timeouts.idle", 0, ("number",)),
        ("upstream.timeouts.total", "long", ("number",)),
        ("upstream.timeouts.connect", float("nan"), ("number",)),
        ("upstream.max_connections", 0, ("integer",)),
        ("upstream.client_abort_grace", "soon", ()),
        ("upstream.client_abort_grace", -5, ()),
        ("ledger.backend", "mysql", ("sqlite",)),
        ("ledger.synchronous", "off", ("normal",)),
        ("limits.max_body_bytes", "4MB", ("integer",)),
        ("limits.drain_timeout", -1, ("number",)),
        ("limits.header_timeout", 0, ("number",)),
        ("limits.header_timeout", "10s", ("number",)),
        ("attribution.features", "chat", ("list",)),
        ("attribution.features", ["chat", 7], ("list",)),
        ("attribution.environments", ["has space"], ("invalid value",)),
        ("unpriced_models", "ignore", ("reject",)),
        ("prices", ["prices.yaml"], ("string",)),
        ("tenants.acme.models", PRICED_MODEL, ("list",)),
        ("tenants.acme.keys_sha256", "abc", ("list",)),
    ],
)
def test_wrong_values_are_named(tmp_path: Path, key: str, value: Any, words: tuple[str, ...]) -> None:
    """A value of the wrong type or range names its key path and what was expected."""
    err = config_error(tmp_path, with_value(key, value))
    assert_names(err, tmp_path / "meter.yaml", key, *words)


@pytest.mark.parametrize("bad", ["ABCDEF" * 10 + "ABCD", "0" * 63, "g" * 64, DIGEST + "0"])
def test_bad_digest_in_keys_sha256(tmp_path: Path, bad: str) -> None:
    """keys_sha256 entries must be lower-case 64-hex SHA-256 digests."""
    err = config_error(tmp_path, with_value("tenants.acme.keys_sha256", [DIGEST, bad]))
    assert_names(err, tmp_path / "meter.yaml", "tenants.acme.keys_sha256", "SHA-256")


def test_bad_tenant_name(tmp_path: Path) -> None:
    """Tenant names are limited to a label-safe charset."""
    err = config_error(tmp_path, with_value("tenants", {"has space": {}}))
    assert_names(err, tmp_path / "meter.yaml", "tenants.has space", "letters")


def test_no_tenants(tmp_path: Path) -> None:
    """A config without tenants is rejected at `tenants`."""
    err = config_error(tmp_path, with_value("tenants", {}))
    assert_names(err, tmp_path / "meter.yaml", "tenants", "tenant")


def test_unknown_tenant_in_keys_file(tmp_path: Path) -> None:
    """A keys file entry for a tenant the config lacks names the keys file and entry."""
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {"keys": [{"tenant": "acme", "sha256": DIGEST}, {"tenant": "initech", "sha256": DIGEST}]}
        )
    )
    err = config_error(tmp_path, {**BASE, "keys_file": "keys.yaml"})
    assert_names(err, keys, "keys[1].tenant", "initech")


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ({"keys": "none"}, "keys"),
        ([1, 2], "keys"),
        ({"keys": [{"tenant": "acme", "sha256": "nothex"}]}, "keys[0].sha256"),
        ({"keys": ["acme"]}, "keys[0].sha256"),
        ({"keys": [{"tenant": ["acme"], "sha256": DIGEST}]}, "keys[0].tenant"),
    ],
)
def test_malformed_keys_file(tmp_path: Path, content: Any, key: str) -> None:
    """A malformed keys file names the keys file and the offending entry."""
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump(content))
    err = config_error(tmp_path, {**BASE, "keys_file": "keys.yaml"})
    assert_names(err, keys, key)


def test_allow_list_naming_an_unpriced_model(tmp_path: Path) -> None:
    """A tenant allow-list naming a model without a price is rejected under the reject policy."""
    err = config_error(tmp_path, with_value("tenants.globex.models", [PRICED_MODEL, "vendor/nope"]))
    assert_names(err, tmp_path / "meter.yaml", "tenants.globex.models", "vendor/nope")


def test_missing_prices_file(tmp_path: Path) -> None:
    """A prices file that does not exist is named in the error."""
    err = config_error(tmp_path, {**BASE, "prices": "nowhere.yaml"}, prices=False)
    assert err.file == str(tmp_path / "nowhere.yaml")
    assert "cannot read" in err.problem


def test_invalid_yaml(tmp_path: Path) -> None:
    """A config that is not YAML names the file and says so."""
    path = tmp_path / "meter.yaml"
    path.write_text("tenants: {acme: [\nlisten: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path)
    assert "invalid YAML" in info.value.problem


def test_missing_config_file(tmp_path: Path) -> None:
    """A config file that does not exist is a ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert info.value.file == str(tmp_path / "absent.yaml")


@pytest.mark.parametrize("doc", ["", "- a\n- b\n", "just a string\n", "42\n"])
def test_config_must_be_a_mapping(tmp_path: Path, doc: str) -> None:
    """An empty or non-mapping document is rejected."""
    path = tmp_path / "meter.yaml"
    path.write_text(doc, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path)


# -- junk never escapes as another exception ----------------------------------------------------

junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10) | st.integers(), inner, max_size=4)
    ),
    max_leaves=15,
)
top_level = st.dictionaries(st.sampled_from(sorted(BASE)) | st.text(max_size=8), junk, max_size=6)


def key_paths(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            paths.extend(key_paths(v, (*prefix, k)))
    return paths


BASE_PATHS = key_paths(BASE)


@pytest.fixture(scope="module")
def prices_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("junk")
    (directory / "prices.yaml").write_text(PRICES.read_text(encoding="utf-8"), encoding="utf-8")
    return directory


def parse_or_config_error(data: Any, directory: Path) -> None:
    try:
        parse_config(data, "junk.yaml", directory)
    except ConfigError as exc:
        assert exc.file and exc.problem


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(junk, top_level))
def test_random_junk_raises_only_config_error(prices_dir: Path, data: Any) -> None:
    """Random dicts, lists and scalars give a Config or a ConfigError, never another exception."""
    parse_or_config_error(data, prices_dir)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(BASE_PATHS), junk)
@example(("prices",), "bad\x00name.yaml")  # a double-quoted YAML "\0" is a NUL
@example(("upstream", "client_abort_grace"), None)
def test_junk_at_any_key_raises_only_config_error(
    prices_dir: Path, path: tuple[str, ...], value: Any
) -> None:
    """Junk at any key of a valid config gives a Config or a ConfigError, never another exception."""
    parse_or_config_error(with_value(".".join(path), value), prices_dir)


def test_batches_poll_interval(tmp_path: Path) -> None:
    """`batches.poll_interval` defaults to 30 s, is read as given, and must be > 0."""
    assert load_config(write_config(tmp_path, BASE)).batches.poll_interval == 30.0
    config = load_config(write_config(tmp_path, with_value("batches.poll_interval", 2.5)))
    assert config.batches.poll_interval == 2.5
    err = config_error(tmp_path, with_value("batches.poll_interval", 0))
    assert_names(err, tmp_path / "meter.yaml", "batches.poll_interval", "greater than 0")


def _pg_ledger(**keys: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["ledger"] = {"backend": "postgres", **keys}
    return data


def test_postgres_ledger_settings_are_read(tmp_path: Path) -> None:
    """backend: postgres takes a dsn (or dsn_env), pool size, lease and commit timeout."""
    dsn = "postgresql://meter:pw@127.0.0.1:5432/ledger"
    config = load_config(
        write_config(tmp_path, _pg_ledger(dsn=dsn, pool_size=8, lease_seconds=20, commit_timeout=2.5))
    )
    ledger = config.ledger
    assert (ledger.backend, ledger.dsn, ledger.dsn_env) == ("postgres", dsn, None)
    assert (ledger.pool_size, ledger.lease_seconds, ledger.commit_timeout) == (8, 20.0, 2.5)
    assert "pw@" not in repr(config)  # the DSN is left out of reprs
    by_env = load_config(write_config(tmp_path, _pg_ledger(dsn_env="METER_DSN"))).ledger
    assert (by_env.dsn, by_env.dsn_env) == (None, "METER_DSN")


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        (_pg_ledger(), "ledger.dsn", ("exactly one of ledger.dsn and ledger.dsn_env",)),
        (_pg_ledger(dsn="postgresql://h/db", dsn_env="X"), "ledger.dsn", ("exactly one",)),
        (_pg_ledger(dsn="mysql://u:hunter2@h/db"), "ledger.dsn", ("postgresql://",)),
        (_pg_ledger(dsn_env="1BAD NAME"), "ledger.dsn_env", ("environment variable name",)),
        (_pg_ledger(dsn="postgresql://h/db", pool_size=0), "ledger.pool_size", ("integer",)),
        (_pg_ledger(dsn="postgresql://h/db", lease_seconds=0.5), "ledger.lease_seconds", ("number",)),
        (_pg_ledger(dsn="postgresql://h/db", commit_timeout=0), "ledger.commit_timeout", ("number",)),
        (with_value("ledger.dsn", "postgresql://h/db"), "ledger.dsn", ("only applies to backend: postgres",)),
    ],
)
def test_wrong_postgres_ledger_settings_are_named(
    tmp_path: Path, data: dict[str, Any], key: str, words: tuple[str, ...]
) -> None:
    """A wrong ledger setting names its key; a DSN in an error never shows its password."""
    err = config_error(tmp_path, data)
    assert_names(err, tmp_path / "meter.yaml", key, *words)
    assert "hunter2" not in str(err)


def test_files_settings(tmp_path: Path) -> None:
    """files.*: relaying is the default; public_url loses a trailing slash; all three are read."""
    default = load_config(write_config(tmp_path, BASE)).files
    assert (default.relay_uploads, default.public_url, default.upload_token_ttl) == (True, None, 900.0)
    data = with_value(
        "files", {"relay_uploads": False, "public_url": "https://m.example/tm/", "upload_token_ttl": 60}
    )
    files = load_config(write_config(tmp_path, data)).files
    assert (files.relay_uploads, files.public_url, files.upload_token_ttl) == (
        False,
        "https://m.example/tm",
        60.0,
    )
    assert load_config(
        write_config(tmp_path, with_value("files.public_url", "http://[::1]:8787"))
    ).files.public_url


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("files.relay_uploads", "yes", ("true or false",)),
        ("files.public_url", "ftp://m.example", ("URL",)),
        ("files.public_url", "https://m.example/x?y=1", ("URL",)),
        ("files.public_url", "https://m.example/a b", ("URL",)),
        ("files.upload_token_ttl", 0, ("number",)),
        ("files.upload_token_ttl", 100000, ("86400",)),
        ("files.relay", True, ("unknown key",)),
    ],
)
def test_files_settings_refused(tmp_path: Path, key: str, value: Any, words: tuple[str, ...]) -> None:
    err = config_error(tmp_path, with_value(key, value))
    assert_names(err, tmp_path / "meter.yaml", key, *words)


def test_a_config_of_tenants_only_takes_every_default_from_the_dataclasses(tmp_path: Path) -> None:
    """Defaults are written once, in the section dataclasses: a file that sets nothing but its
    tenants gets exactly those (a literal default in the parser that drifted would differ)."""
    from proxy import config as c

    cfg = load_config(write_config(tmp_path, {"tenants": {"acme": {"keys_sha256": [DIGEST]}}}))
    assert cfg.listen == c.Listen() and cfg.admin == c.Listen(port=c.ADMIN_PORT)
    assert cfg.upstream == c.Upstream() and cfg.ledger == c.LedgerSettings()
    assert cfg.limits == c.Limits() and cfg.attribution == c.Attribution()
    assert cfg.budgets == c.BudgetSettings() and cfg.notify == c.Notify()
    assert cfg.batches == c.BatchSettings() and cfg.files == c.FileSettings()
    assert cfg.dedicated == c.DedicatedSettings()
    defaults = {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}
    assert {k: getattr(cfg, k) for k in defaults} == defaults
