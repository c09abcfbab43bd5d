"""YAML config -> frozen dataclasses. Every error names the file, the key path and the problem.

Relative paths of config files (`prices`, `keys_file`) are resolved against the directory of the
config file; the ledger path (data, not config) against the working directory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from proxy.config.prices import load_price_table
from proxy.core.budgets import Budget, Periods
from proxy.core.calls import LABEL_VALUE_RE
from proxy.core.chargeback import DedicatedEndpoint
from proxy.core.pricing import PUSD_PER_USD, PriceTable
from proxy.core.routes import ID_RE, Grant
from proxy.errors import ConfigError

DEFAULT_UPSTREAM = "https://api.together.ai/v1"  # the host together's current SDKs use
UNPRICED_DEFAULT = "reject"
LISTEN_PORT, ADMIN_PORT = 8787, 9787  # the public API and the admin listener
ADMIN_TOKEN_ENV = "TOGETHER_METER_ADMIN_TOKEN"
DIGEST_RE = re.compile(r"^[0-9a-f]{64}\Z")
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = LISTEN_PORT


@dataclass(frozen=True, slots=True)
class Upstream:
    url: str = DEFAULT_UPSTREAM
    # where the metered inference routes go (routes.INFERENCE_HOST_PATHS), e.g. together's
    # https://api-inference.together.ai/v1; None: to `url` like everything else
    inference_url: str | None = None
    connect_timeout: float = 10.0
    first_byte_timeout: float = 120.0  # time to response headers (a silent upstream -> 504)
    idle_timeout: float = 60.0  # longest gap between stream chunks
    total_timeout: float = 900.0  # whole request, stream included
    max_connections: int = 256
    client_abort_grace: float = 5.0  # keep reading after the client left, to learn the usage


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    backend: str = "sqlite"
    path: str = "together-meter.db"
    synchronous: str = "normal"  # sqlite: normal (survives process crash) | full (power loss)
    # postgres: the DSN (repr=False: its password must never reach a log), or the name of the
    # environment variable holding it (read when the ledger opens, never stored in the file)
    dsn: str | None = field(default=None, repr=False)
    dsn_env: str | None = None
    pool_size: int = 4  # postgres: reader connections (the writer has its own)
    lease_seconds: float = 30.0  # postgres: a replica silent this long has its in-flight rows reaped
    commit_timeout: float = 5.0  # postgres: longest a request waits for a commit before giving up
    timezone: str = "UTC"  # not a key: budgets.timezone, which rollup days are cut in (set by parse_config)


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 4 * 1024 * 1024
    max_event_bytes: int = 8 * 1024 * 1024
    max_response_bytes: int = 64 * 1024 * 1024
    drain_timeout: float = 30.0
    auth_failures_per_minute: int = 30  # per client address; 0 turns the limit off
    body_timeout: float = 10.0  # the whole request body must arrive within this
    header_timeout: float = 10.0  # the request line and headers must arrive within this


@dataclass(frozen=True, slots=True)
class Attribution:
    """Which feature/environment values become metric labels; the ledger keeps exact values."""

    features: tuple[str, ...] | None = None  # None: the first `max_label_values` seen
    environments: tuple[str, ...] | None = None
    max_label_values: int = 50


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    key_digests: tuple[str, ...] = ()
    models: tuple[str, ...] | None = None  # allow-list; None = every priced model
    budget: Budget | None = None
    feature_budgets: Mapping[str, Budget] = field(default_factory=dict)
    routes: tuple[Grant, ...] = ()  # operator-account routes granted to this tenant (routes.py)
    cost_in_body: bool = False  # usage.cost in every answer unless X-Meter-Cost: none


@dataclass(frozen=True, slots=True)
class BudgetSettings:
    """How periods are cut and how big a reservation is when a request gives no max_tokens."""

    timezone: str = "UTC"
    default_max_output_tokens: int = 4096
    max_output_tokens: Mapping[str, int] = field(default_factory=dict)  # per model

    @property
    def periods(self) -> Periods:
        return Periods(self.timezone)


@dataclass(frozen=True, slots=True)
class Notify:
    """The built-in budget webhook (for teams without Alertmanager)."""

    webhook_url: str | None = None
    timeout: float = 5.0
    max_attempts: int = 6


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """How the proxy follows together.ai Batch jobs its tenants created (docs/batches.md)."""

    poll_interval: float = 30.0  # seconds between two looks at the unfinished batches


@dataclass(frozen=True, slots=True)
class FileSettings:
    """The together SDKs' presigned upload through the proxy (docs/batches.md#uploads)."""

    relay_uploads: bool = True  # rewrite the 302's Location to the proxy, which relays the PUT
    public_url: str | None = None  # how clients reach the proxy; None: from the request's Host
    upload_token_ttl: float = 900.0  # seconds an upload URL of the proxy stays valid


@dataclass(frozen=True, slots=True)
class DedicatedSettings:
    """Which dedicated endpoints the proxy follows by the minute, and how often (docs/configuration.md)."""

    follow: tuple[str, ...] = ()  # together endpoint ids (dedicated_endpoints' endpoint_id are added)
    discover: bool = False  # also every endpoint GET /v1/endpoints?type=dedicated lists
    poll_seconds: float = 15.0  # between two looks at every endpoint (several per minute)
    prices_refresh_seconds: float = 3600.0  # GET /v1/hardware again after this long
    max_endpoints: int = 100  # followed at most (the rest is logged, not followed)
    minute_seconds: float = 60.0  # TEST ONLY: the length of a billed minute (simulator tests)
    api: str = "v1"  # "v1" | "v2": which together API the follower reads ("auto" resolved at load)
    project_id: str | None = None  # the together project whose endpoints v2 reads

    @property
    def minute_us(self) -> int:
        return round(self.minute_seconds * 1_000_000)


@dataclass(frozen=True, slots=True)
class Config:
    file: str
    listen: Listen
    admin: Listen
    upstream: Upstream
    ledger: LedgerSettings
    limits: Limits
    attribution: Attribution
    tenants: Mapping[str, Tenant]
    prices: PriceTable
    prices_file: str
    keys_file: str | None
    unpriced_models: str = UNPRICED_DEFAULT  # reject (400 model_not_priced) | forward (cost unknown)
    admin_token_env: str = ADMIN_TOKEN_ENV
    budgets: BudgetSettings = field(default_factory=BudgetSettings)
    notify: Notify = field(default_factory=Notify)
    batches: BatchSettings = field(default_factory=BatchSettings)
    files: FileSettings = field(default_factory=FileSettings)
    dedicated_endpoints: tuple[DedicatedEndpoint, ...] = ()
    dedicated: DedicatedSettings = field(default_factory=DedicatedSettings)

    def followed_endpoints(self) -> tuple[str, ...]:
        """The endpoint ids to follow: `dedicated.follow` and every `dedicated_endpoints` endpoint_id."""
        linked = (e.endpoint_id for e in self.dedicated_endpoints if e.endpoint_id)
        return tuple(dict.fromkeys((*self.dedicated.follow, *linked)))

    def budget_map(self) -> dict[tuple[str, str | None], Budget]:
        """(tenant, None) for tenant budgets, (tenant, feature) for feature budgets."""
        out: dict[tuple[str, str | None], Budget] = {}
        for t in self.tenants.values():
            if t.budget is not None:
                out[(t.name, None)] = t.budget
            for feature, b in t.feature_budgets.items():
                out[(t.name, feature)] = b
        return out

    def key_index(self) -> dict[str, str]:
        """SHA-256 hex digest -> tenant name, for every configured key."""
        return {d: t.name for t in self.tenants.values() for d in t.key_digests}


# The defaults of every section, written once (in the dataclasses above): the parser below
# takes each missing key's value from these, never from a literal of its own.
_LISTEN, _UPSTREAM, _LEDGER, _LIMITS = Listen(), Upstream(), LedgerSettings(), Limits()
_ATTRIBUTION, _BUDGETS, _NOTIFY = Attribution(), BudgetSettings(), Notify()
_BATCHES, _FILES, _DEDICATED = BatchSettings(), FileSettings(), DedicatedSettings()


class _Reader:
    """Typed access to a YAML mapping that reports mistakes with file and key path."""

    def __init__(self, file: str, data: Mapping[str, Any], path: str = "") -> None:
        self.file, self.data, self.path = file, data, path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def err(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), problem)

    def check_keys(self, allowed: set[str]) -> None:
        for name in self.data:
            if name not in allowed:
                hint = f" (known: {', '.join(sorted(allowed))})"
                raise self.err(str(name), "unknown key" + hint)

    def section(self, name: str) -> _Reader:
        value = self.data.get(name, {})
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.err(name, f"must be a mapping, got {type(value).__name__}")
        return _Reader(self.file, value, self.key(name))

    def text(self, name: str, default: str | None) -> str | None:
        value = self.data.get(name, default)
        if value is not None and not isinstance(value, str):
            raise self.err(name, f"must be a string, got {value!r}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default)
        if value not in choices:
            raise self.err(name, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def int(self, name: str, default: int, lo: int = 0, hi: int = 2**31) -> int:
        value = self.data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.err(name, f"must be an integer between {lo} and {hi}, got {value!r}")
        return value

    def num(self, name: str, default: float, lo: float = 0.0, inclusive: bool = False) -> float:
        value = self.data.get(name, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < lo
            or (value == lo and not inclusive)
        ):
            bound = f"at least {lo}" if inclusive else f"greater than {lo}"
            raise self.err(name, f"must be a number {bound}, got {value!r}")
        return float(value)

    def str_list(self, name: str, pattern: re.Pattern[str] | None = None) -> tuple[str, ...] | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.err(name, "must be a list of strings")
        for v in value:
            if pattern is not None and not pattern.match(v):
                raise self.err(name, f"invalid value {v!r} (letters, digits, . _ : / -; <= 64)")
        return tuple(value)


def _listen(r: _Reader, default_port: int) -> Listen:
    r.check_keys({"host", "port"})
    return Listen(r.text("host", _LISTEN.host) or _LISTEN.host, r.int("port", default_port, 0, 65535))


def _upstream(r: _Reader) -> Upstream:
    r.check_keys({"url", "inference_url", "timeouts", "max_connections", "client_abort_grace"})
    url = _upstream_url(r, "url", DEFAULT_UPSTREAM)
    inference = _upstream_url(r, "inference_url", None) if r.data.get("inference_url") is not None else None
    t = r.section("timeouts")
    t.check_keys({"connect", "first_byte", "idle", "total"})
    return Upstream(
        url=url,
        inference_url=inference,
        connect_timeout=t.num("connect", _UPSTREAM.connect_timeout),
        first_byte_timeout=t.num("first_byte", _UPSTREAM.first_byte_timeout),
        idle_timeout=t.num("idle", _UPSTREAM.idle_timeout),
        total_timeout=t.num("total", _UPSTREAM.total_timeout),
        max_connections=r.int("max_connections", _UPSTREAM.max_connections, 1, 100_000),
        client_abort_grace=r.num("client_abort_grace", _UPSTREAM.client_abort_grace, lo=0.0, inclusive=True),
    )


def _upstream_url(r: _Reader, name: str, default: str | None) -> str:
    """An upstream base URL: `scheme://host[:port]` with an optional path (`/v1`); no query,
    fragment or credentials (they would travel nowhere, or leak in logs)."""
    url = r.text(name, default) or DEFAULT_UPSTREAM
    if not re.match(r"^https?://[^/\s?#@]+(/[^\s?#]*)?\Z", url):
        raise r.err(name, f"must be an http(s) URL (scheme://host[:port][/path]), got {url!r}")
    return url.rstrip("/")


def _tenants(r: _Reader) -> dict[str, Tenant]:
    tenants: dict[str, Tenant] = {}
    for name in r.data:
        if not isinstance(name, str) or not TENANT_RE.match(name):
            raise r.err(str(name), "tenant names use letters, digits, '.', '_', '-' (<= 64)")
        t = r.section(name)
        t.check_keys(
            {"keys_sha256", "models", "description", "budget", "feature_budgets", "routes", "cost_in_body"}
        )
        digests = t.str_list("keys_sha256") or ()
        for d in digests:
            if not DIGEST_RE.match(d):
                raise t.err(
                    "keys_sha256",
                    "each entry must be a lower-case SHA-256 hex digest "
                    "(together-meter keys create prints one)",
                )
        budget = _budget(t.section("budget")) if t.data.get("budget") is not None else None
        fb = t.section("feature_budgets")
        feature_budgets = {}
        for feature in fb.data:
            if not isinstance(feature, str) or not LABEL_VALUE_RE.match(feature):
                raise fb.err(str(feature), "feature names use letters, digits, . _ : / - (<= 64)")
            feature_budgets[feature] = _budget(fb.section(feature))
        tenants[name] = Tenant(name, digests, t.str_list("models"), budget, feature_budgets, _grants(t))
    return tenants


def _grants(t: _Reader) -> tuple[Grant, ...]:
    """`routes:` entries like `GET /v1/fine-tunes/*` (see routes.Grant)."""
    grants = []
    for i, text in enumerate(t.str_list("routes") or ()):
        try:
            grants.append(Grant.parse(text))
        except ValueError as exc:
            raise t.err(f"routes[{i}]", f"{exc} (entries look like 'GET /v1/fine-tunes/*')") from None
    return tuple(grants)


def _budget(r: _Reader) -> Budget:
    r.check_keys({"monthly_usd", "hard_limit", "alert_at"})
    raw = r.data.get("monthly_usd")
    if raw is None:
        raise r.err("monthly_usd", "missing (USD per calendar month)")
    try:
        if isinstance(raw, bool):
            raise InvalidOperation
        amount = Decimal(repr(raw)) if isinstance(raw, float) else Decimal(str(raw))
        pusd = amount * PUSD_PER_USD
        if not amount.is_finite() or amount < 0 or pusd != pusd.to_integral_value():
            raise InvalidOperation
    except InvalidOperation:
        raise r.err("monthly_usd", f"must be a number of USD >= 0, got {raw!r}") from None
    hard = r.data.get("hard_limit", False)
    if not isinstance(hard, bool):
        raise r.err("hard_limit", f"must be true or false, got {hard!r}")
    alert_raw = r.data.get("alert_at", [0.5, 0.8, 1.0])
    if not isinstance(alert_raw, list) or not all(
        isinstance(x, int | float) and not isinstance(x, bool) and 0 < x <= 10 for x in alert_raw
    ):
        raise r.err("alert_at", f"must be a list of budget fractions in (0, 10], got {alert_raw!r}")
    alert_at = tuple(sorted({Decimal(repr(float(x))) for x in alert_raw}))
    return Budget(int(pusd), hard, alert_at)


def _keys_file(path: Path, tenants: dict[str, Tenant]) -> dict[str, Tenant]:
    """Merge the digests of a keys file (written by `keys create`) into the tenants."""
    file = str(path)
    if not path.exists():
        return tenants
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(file, "", f"cannot read keys file: {exc}") from exc
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(file, "keys", "must be a list of {tenant, sha256}")
    merged = {n: list(t.key_digests) for n, t in tenants.items()}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not DIGEST_RE.match(str(entry.get("sha256", ""))):
            raise ConfigError(file, f"keys[{i}].sha256", "must be a SHA-256 hex digest")
        tenant = entry.get("tenant")
        if not isinstance(tenant, str) or tenant not in tenants:
            raise ConfigError(file, f"keys[{i}].tenant", f"unknown tenant {tenant!r}")
        merged[tenant].append(entry["sha256"])
    return {n: replace(t, key_digests=tuple(dict.fromkeys(merged[n]))) for n, t in tenants.items()}


TOP_KEYS = {
    "listen",
    "admin",
    "upstream",
    "ledger",
    "limits",
    "attribution",
    "tenants",
    "prices",
    "keys_file",
    "unpriced_models",
    "admin_token_env",
    "budgets",
    "notify",
    "batches",
    "files",
    "dedicated_endpoints",
    "dedicated",
}


def _budget_settings(r: _Reader, prices: PriceTable) -> BudgetSettings:
    r.check_keys({"timezone", "default_max_output_tokens", "max_output_tokens"})
    tz = r.text("timezone", _BUDGETS.timezone) or _BUDGETS.timezone
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise r.err("timezone", f"unknown time zone {tz!r} (an IANA name like Europe/Berlin)") from None
    caps = r.section("max_output_tokens")
    per_model = {}
    for model in caps.data:
        if model not in prices:
            raise caps.err(str(model), "model has no price")
        per_model[model] = caps.int(model, 0, 1, 10_000_000)
    return BudgetSettings(
        tz, r.int("default_max_output_tokens", _BUDGETS.default_max_output_tokens, 1, 10_000_000), per_model
    )


def _notify(r: _Reader) -> Notify:
    r.check_keys({"webhook_url", "timeout", "max_attempts"})
    url = r.text("webhook_url", None)
    if url is not None and not re.match(r"^https?://[^/\s]+", url):
        raise r.err("webhook_url", f"must be an http(s) URL, got {url!r}")
    return Notify(url, r.num("timeout", _NOTIFY.timeout), r.int("max_attempts", _NOTIFY.max_attempts, 1, 100))


def _usd_amount(r: _Reader, name: str) -> Decimal | None:
    """An exact decimal USD amount >= 0 (floats through their repr), or None if absent."""
    raw = r.data.get(name)
    if raw is None:
        return None
    try:
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise InvalidOperation
        amount = Decimal(repr(raw)) if isinstance(raw, float) else Decimal(str(raw))
        if not amount.is_finite() or amount < 0:
            raise InvalidOperation
    except InvalidOperation:
        raise r.err(name, f"must be a number >= 0, got {raw!r}") from None
    return amount


def _dedicated(r: _Reader, prices: PriceTable, forward_unpriced: bool) -> tuple[DedicatedEndpoint, ...]:
    out: list[DedicatedEndpoint] = []
    for name in r.data:
        if not isinstance(name, str) or not TENANT_RE.match(name):
            raise r.err(str(name), "endpoint names use letters, digits, '.', '_', '-' (<= 64)")
        e = r.section(name)
        e.check_keys({"model", "monthly_usd", "hourly_usd", "hours_per_month", "endpoint_id"})
        model = e.text("model", None)
        if not model:
            raise e.err("model", "missing (the together.ai model id the endpoint serves)")
        if model not in prices and not forward_unpriced:
            raise e.err("model", f"model {model!r} has no price (its Serverless equivalent is needed)")
        endpoint_id = e.text("endpoint_id", None)
        if endpoint_id is not None and not ID_RE.match(endpoint_id):
            raise e.err(
                "endpoint_id", f"must be a together endpoint id like endpoint-1234abcd, got {endpoint_id!r}"
            )
        if endpoint_id is not None and any(d.endpoint_id == endpoint_id for d in out):
            raise e.err("endpoint_id", f"endpoint {endpoint_id!r} is already linked to another entry")
        monthly, hourly = _usd_amount(e, "monthly_usd"), _usd_amount(e, "hourly_usd")
        hours = _usd_amount(e, "hours_per_month")
        if monthly is not None and hourly is not None:
            raise e.err("monthly_usd", "give exactly one of monthly_usd or hourly_usd")
        if monthly is None and hourly is None:
            if endpoint_id is None:
                raise e.err(
                    "monthly_usd", "give exactly one of monthly_usd or hourly_usd (or an endpoint_id)"
                )
            if hours is not None:
                raise e.err("hours_per_month", "only with hourly_usd")
            value, basis, key = Decimal(0), "measured only", "endpoint_id"
        elif monthly is not None:
            if hours is not None:
                raise e.err("hours_per_month", "only with hourly_usd")
            value, basis, key = monthly, f"monthly_usd {monthly}", "monthly_usd"
        else:
            assert hourly is not None
            hours = Decimal(730) if hours is None else hours
            if not 0 < hours <= 744:
                raise e.err("hours_per_month", f"must be in (0, 744], got {hours}")
            value, basis, key = hourly * hours, f"hourly_usd {hourly} x {hours} h", "hourly_usd"
        pusd = value * PUSD_PER_USD
        if pusd != pusd.to_integral_value():
            raise e.err(key, "must come to a whole number of pico-USD per month")
        if any(d.model == model for d in out):
            raise e.err("model", f"model {model!r} already has a dedicated endpoint (tokens cannot be split)")
        configured = monthly is not None or hourly is not None
        out.append(DedicatedEndpoint(name, model, int(pusd), basis, endpoint_id, configured))
    return tuple(out)


def _dedicated_settings(r: _Reader) -> DedicatedSettings:
    r.check_keys(
        {
            "follow",
            "discover",
            "poll_seconds",
            "prices_refresh_seconds",
            "max_endpoints",
            "minute_seconds",
            "api",
            "project_id",
        }
    )
    follow = r.str_list("follow") or ()
    for endpoint_id in follow:
        if not ID_RE.match(endpoint_id):
            raise r.err("follow", f"{endpoint_id!r} is not a together endpoint id (like endpoint-1234abcd)")
    discover = r.data.get("discover", _DEDICATED.discover)
    if not isinstance(discover, bool):
        raise r.err("discover", f"must be true or false, got {discover!r}")
    minute = r.num("minute_seconds", _DEDICATED.minute_seconds)
    if minute > 60:
        raise r.err("minute_seconds", f"must be at most 60 (together bills by the minute), got {minute!r}")
    poll = r.num("poll_seconds", min(_DEDICATED.poll_seconds, minute / 4))
    if poll > minute / 2:
        raise r.err(
            "poll_seconds", f"must be at most half a minute ({minute / 2:g} s) so no minute is missed"
        )
    return DedicatedSettings(
        follow=tuple(dict.fromkeys(follow)),
        discover=discover,
        poll_seconds=poll,
        prices_refresh_seconds=r.num("prices_refresh_seconds", _DEDICATED.prices_refresh_seconds),
        max_endpoints=r.int("max_endpoints", _DEDICATED.max_endpoints, 1, 10_000),
        minute_seconds=minute,
        **_dedicated_api(r),
    )


_PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")


def _dedicated_api(r: _Reader) -> dict[str, Any]:
    """`api` (v1 | v2 | auto: v2 when `project_id` is set) and `project_id` (needed by v2)."""
    project = r.data.get("project_id")
    if project is not None and not (isinstance(project, str) and _PROJECT_RE.match(project)):
        raise r.err("project_id", f"must be a together project id (letters, digits, -, _), got {project!r}")
    api = r.data.get("api", "auto")
    if api not in ("v1", "v2", "auto"):
        raise r.err("api", f"must be v1, v2 or auto, got {api!r}")
    if api == "auto":
        api = "v2" if project is not None else "v1"
    if api == "v2" and project is None:
        raise r.err("project_id", "is required with api: v2 (the v2 endpoints live under a project)")
    return {"api": api, "project_id": project}


def _batch_settings(r: _Reader) -> BatchSettings:
    r.check_keys({"poll_interval"})
    return BatchSettings(r.num("poll_interval", _BATCHES.poll_interval))


def _file_settings(r: _Reader) -> FileSettings:
    r.check_keys({"relay_uploads", "public_url", "upload_token_ttl"})
    relay = r.data.get("relay_uploads", _FILES.relay_uploads)
    if not isinstance(relay, bool):
        raise r.err("relay_uploads", f"must be true or false, got {relay!r}")
    url = r.text("public_url", _FILES.public_url)
    if url is not None:
        url = url.rstrip("/")
        if not re.match(r"^https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?\Z", url):
            raise r.err("public_url", f"must be an http(s) URL without query or fragment, got {url!r}")
    ttl = r.num("upload_token_ttl", _FILES.upload_token_ttl)
    if ttl > 86400:
        raise r.err("upload_token_ttl", f"must be at most 86400 (a day), got {ttl:g}")
    return FileSettings(relay, url, ttl)


def _ledger(r: _Reader) -> LedgerSettings:
    r.check_keys(
        {"backend", "path", "synchronous", "dsn", "dsn_env", "pool_size", "lease_seconds", "commit_timeout"}
    )
    backend = r.choice("backend", _LEDGER.backend, ("sqlite", "postgres"))
    dsn, dsn_env = r.data.get("dsn"), r.text("dsn_env", None)
    if dsn is not None and (not isinstance(dsn, str) or not re.match(r"^postgres(ql)?://", dsn)):
        # never echo the value: it may carry a password
        raise r.err("dsn", "must be a postgresql://user[:password]@host[:port]/database URL")
    if backend == "postgres" and (dsn is None) == (dsn_env is None):
        raise r.err("dsn", "give exactly one of ledger.dsn and ledger.dsn_env with backend: postgres")
    if backend == "sqlite" and (dsn is not None or dsn_env is not None):
        raise r.err("dsn" if dsn is not None else "dsn_env", "only applies to backend: postgres")
    if dsn_env is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*\Z", dsn_env):
        raise r.err("dsn_env", f"must be an environment variable name, got {dsn_env!r}")
    return LedgerSettings(
        backend=backend,
        path=r.text("path", _LEDGER.path) or _LEDGER.path,
        synchronous=r.choice("synchronous", _LEDGER.synchronous, ("normal", "full")),
        dsn=dsn,
        dsn_env=dsn_env,
        pool_size=r.int("pool_size", _LEDGER.pool_size, 1, 1000),
        lease_seconds=r.num("lease_seconds", _LEDGER.lease_seconds, lo=1.0, inclusive=True),
        commit_timeout=r.num("commit_timeout", _LEDGER.commit_timeout),
    )


def parse_config(data: Any, file: str, base_dir: Path | None = None) -> Config:
    """Validate a parsed YAML document into a Config."""
    if not isinstance(data, dict):
        raise ConfigError(file, "", "must be a YAML mapping")
    base = base_dir if base_dir is not None else Path(file).resolve().parent
    r = _Reader(file, data)
    r.check_keys(TOP_KEYS)
    ledger = _ledger(r.section("ledger"))
    lim = r.section("limits")
    lim.check_keys(
        {
            "max_body_bytes",
            "max_event_bytes",
            "max_response_bytes",
            "drain_timeout",
            "auth_failures_per_minute",
            "body_timeout",
            "header_timeout",
        }
    )
    limits = Limits(
        max_body_bytes=lim.int("max_body_bytes", _LIMITS.max_body_bytes, 1024, 1 << 30),
        max_event_bytes=lim.int("max_event_bytes", _LIMITS.max_event_bytes, 1024, 1 << 30),
        max_response_bytes=lim.int("max_response_bytes", _LIMITS.max_response_bytes, 1024, 1 << 31),
        drain_timeout=lim.num("drain_timeout", _LIMITS.drain_timeout),
        auth_failures_per_minute=lim.int(
            "auth_failures_per_minute", _LIMITS.auth_failures_per_minute, 0, 1_000_000
        ),
        body_timeout=lim.num("body_timeout", _LIMITS.body_timeout),
        header_timeout=lim.num("header_timeout", _LIMITS.header_timeout),
    )
    att = r.section("attribution")
    att.check_keys({"features", "environments", "max_label_values"})
    attribution = Attribution(
        att.str_list("features", LABEL_VALUE_RE),
        att.str_list("environments", LABEL_VALUE_RE),
        att.int("max_label_values", _ATTRIBUTION.max_label_values, 1, 10_000),
    )
    tenants = _tenants(r.section("tenants"))
    if not tenants:
        raise r.err("tenants", "at least one tenant is required")
    prices_name = r.text("prices", "prices.yaml") or "prices.yaml"
    prices_path = (base / prices_name) if not Path(prices_name).is_absolute() else Path(prices_name)
    prices = load_price_table(prices_path)
    keys_name = r.text("keys_file", None)
    keys_path = None
    if keys_name:
        keys_path = (base / keys_name) if not Path(keys_name).is_absolute() else Path(keys_name)
        tenants = _keys_file(keys_path, tenants)
    for t in tenants.values():
        for m in t.models or ():
            if m not in prices and r.data.get("unpriced_models", UNPRICED_DEFAULT) == "reject":
                raise ConfigError(
                    file, f"tenants.{t.name}.models", f"model {m!r} has no price in {prices_path}"
                )
    budgets = _budget_settings(r.section("budgets"), prices)
    return Config(
        file=file,
        listen=_listen(r.section("listen"), LISTEN_PORT),
        admin=_listen(r.section("admin"), ADMIN_PORT),
        upstream=_upstream(r.section("upstream")),
        ledger=replace(ledger, timezone=budgets.timezone),
        limits=limits,
        attribution=attribution,
        tenants=tenants,
        prices=prices,
        prices_file=str(prices_path),
        keys_file=str(keys_path) if keys_path else None,
        unpriced_models=r.choice("unpriced_models", UNPRICED_DEFAULT, ("reject", "forward")),
        admin_token_env=r.text("admin_token_env", ADMIN_TOKEN_ENV) or ADMIN_TOKEN_ENV,
        budgets=budgets,
        notify=_notify(r.section("notify")),
        batches=_batch_settings(r.section("batches")),
        files=_file_settings(r.section("files")),
        dedicated_endpoints=_dedicated(
            r.section("dedicated_endpoints"), prices, r.data.get("unpriced_models") == "forward"
        ),
        dedicated=_dedicated_settings(r.section("dedicated")),
    )


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a config file (and the prices/keys files it names)."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(file, "", f"invalid YAML: {exc}") from exc
    return parse_config(data, file)
