"""Command line: parses arguments, loads config, calls the core, turns errors into exit codes.

Exit codes: 0 ok, 1 failure (or price drift for `prices sync --check`), 2 usage or config error,
141 when stdout's reader went away (`report ... | head`), quietly, as for a filter killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from proxy.config import Config, load_config
from proxy.core.auth import digest, new_key
from proxy.core.report import ReportError
from proxy.errors import ConfigError
from proxy.ledger import LedgerUnavailable

if TYPE_CHECKING:
    from proxy.server.app import Proxy, Secrets

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_PIPE = 128 + 13  # stdout's reader went away (SIGPIPE), e.g. `report ... | head`
DEFAULT_CONFIG = "config/example.yaml"
log = logging.getLogger("together_meter")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional speed-up
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.server.app import Proxy, Secrets, with_overrides

    def load() -> Config:
        return with_overrides(
            load_config(args.config),
            upstream=args.upstream,
            port=args.port,
            admin_port=args.admin_port,
            ledger_path=args.ledger,
        )

    config = load()
    key = os.environ.get("TOGETHER_API_KEY", "")
    if not key:
        print(
            "error: TOGETHER_API_KEY is not set: the proxy needs the operator's together.ai "
            "key to forward requests (it never reads it from the config file)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.workers < 1:
        print(f"error: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return EXIT_USAGE
    if args.workers > 1 and config.ledger.backend != "postgres":
        print(
            "error: --workers > 1 needs ledger.backend: postgres: several processes cannot share a "
            "SQLite ledger's writer, reaper and budget book (see docs/deployment.md)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    secrets = Secrets(key, os.environ.get(config.admin_token_env) or None)
    _use_uvloop()
    if args.worker_fd is not None:  # started by a supervisor (`--workers N`), never by hand
        from proxy.server.workers import serve_worker, worker_log_format

        worker_log_format(args.worker_slot)
        asyncio.run(serve_worker(Proxy(config, secrets, loader=load, role="worker"), args.worker_fd))
    elif args.workers > 1:
        return _supervise(args, config, secrets, load)
    else:
        return _run_proxy(Proxy(config, secrets, loader=load))
    return EXIT_OK


def _run_proxy(proxy: Proxy) -> int:
    """Serve until SIGINT/SIGTERM; a listener that cannot bind (a port in use) is one line, exit 1."""
    try:
        asyncio.run(_serve(proxy))
    except OSError as exc:
        hint = " (another process listens there: --port / --admin-port choose others)"
        used = exc.errno == errno.EADDRINUSE
        print(f"error: cannot start: {exc.strerror or exc}{hint if used else ''}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


async def _serve(proxy: Proxy) -> None:
    """run_until_signalled, closing what a failed start opened before the error propagates."""
    try:
        await proxy.run_until_signalled()
    except OSError:
        await proxy.stop()  # what start() opened before the bind failed: ledger, client, notifier
        raise


def _supervise(args: argparse.Namespace, config: Config, secrets: Secrets, load: Callable[[], Config]) -> int:
    """`serve --workers N`: the supervisor (admin listener) of N workers on the public port."""
    from proxy.server.app import Proxy
    from proxy.server.workers import Supervisor, reserve_port

    try:
        reserved = reserve_port(config.listen.host, config.listen.port)
    except OSError as exc:
        print(f"error: cannot bind {config.listen.host}:{config.listen.port}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    worker = [sys.executable, "-m", "proxy.cli", "--log-level", args.log_level, "serve"]
    worker += ["--config", args.config]
    for flag, value in (("--upstream", args.upstream), ("--ledger", args.ledger)):
        if value is not None:
            worker += [flag, value]
    proxy = Proxy(config, secrets, loader=load, role="supervisor")
    Supervisor(proxy, worker, args.workers, reserved)
    return _run_proxy(proxy)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    print(
        f"{args.file}: ok ({len(config.tenants)} tenants, {len(config.prices)} priced models, "
        f"upstream {config.upstream.url}"
        + (f", inference {config.upstream.inference_url})" if config.upstream.inference_url else ")")
    )
    return EXIT_OK


def cmd_keys_create(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.tenant not in config.tenants:
        raise ConfigError(
            args.config,
            "tenants",
            f"no tenant named {args.tenant!r} (known: {', '.join(sorted(config.tenants))})",
        )
    if not config.keys_file:
        raise ConfigError(
            args.config,
            "keys_file",
            "not set: add `keys_file: keys.yaml` so `keys create` has somewhere to store key digests",
        )
    path = Path(config.keys_file)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None
    data = data or {"keys": []}
    key = new_key()
    data["keys"].append(
        {
            "tenant": args.tenant,
            "sha256": digest(key),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        "# Tenant key digests written by `together-meter keys create`. The keys\n"
        "# themselves are shown once and never stored.\n" + yaml.safe_dump(data, sort_keys=False),
        encoding="utf-8",
    )
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    print(key)
    print(
        f"created a key for tenant {args.tenant!r} (digest {digest(key)[:8]}... stored in "
        f"{path}); it is shown only this once. A running proxy takes it on SIGHUP or "
        "POST /admin/reload (no restart needed); a proxy started later has it from the start.",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_prices(args: argparse.Namespace) -> int:
    from proxy.cli import prices as prices_cli

    if args.prices_command == "list":
        return prices_cli.list_prices(load_config(args.config), args.format)
    return prices_cli.sync(
        load_config(args.config),
        upstream=args.upstream,
        check=args.check,
        include_all=args.all,
        dry_run=args.dry_run,
    )


def cmd_report(args: argparse.Namespace) -> int:
    from proxy.cli.report import run_chargeback, run_report

    if args.chargeback:
        return run_chargeback(load_config(args.config), args.ledger, args.month, args.tenant, args.format)
    return run_report(load_config(args.config), args.ledger, args.month, args.tenant, args.by, args.format)


def cmd_estimate(args: argparse.Namespace) -> int:
    from proxy.cli.report import params_from_args, run_estimate

    return run_estimate(load_config(args.config), args.ledger, params_from_args(args), args.format)


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.cli.demo import preflight, run_demo

    problem = preflight(args.keep)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    _use_uvloop()
    return asyncio.run(
        run_demo(args.config, keep_running=args.keep_running, requests=args.requests, keep=args.keep)
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="together-meter", description="Metering proxy for together.ai.")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--config", default=DEFAULT_CONFIG)
    s.add_argument("--upstream", help="upstream base URL (default from config: together.ai)")
    s.add_argument("--port", type=int)
    s.add_argument("--admin-port", type=int)
    s.add_argument("--ledger", help="ledger file (overrides ledger.path)")
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        help="N > 1: N worker processes share the public port, one admin listener (PostgreSQL ledger)",
    )
    s.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)  # set by the supervisor only
    s.add_argument("--worker-slot", type=int, default=0, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="proxy + simulator + a burst of SDK traffic, then a table")
    d.add_argument("--config", help="config file (default: the example config shipped in the package)")
    d.add_argument("--keep", metavar="DIR", help="keep the ledger (and config) in DIR, new or empty")
    d.add_argument("--requests", type=int, default=40)
    d.add_argument("--keep-running", action="store_true", help="keep serving after the burst until Ctrl-C")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("file")
    c.set_defaults(func=cmd_check_config)

    k = sub.add_parser("keys", help="tenant keys")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="create a key (printed once; only its digest is kept)")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--config", default=DEFAULT_CONFIG)
    kc.set_defaults(func=cmd_keys_create)

    pr = sub.add_parser("prices", help="the price table")
    psub = pr.add_subparsers(dest="prices_command", required=True)
    pl = psub.add_parser("list", help="print the configured rates")
    pl.add_argument("--config", default=DEFAULT_CONFIG)
    pl.add_argument("--format", choices=("table", "json"), default="table")
    pl.set_defaults(func=cmd_prices)
    ps = psub.add_parser("sync", help="refresh rates from the upstream's GET /v1/models")
    ps.add_argument("--config", default=DEFAULT_CONFIG)
    ps.add_argument("--upstream", help="upstream base URL (default from config)")
    ps.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 1 and print the differences if rates drifted",
    )
    ps.add_argument(
        "--all", action="store_true", help="also add every priced upstream model not in the table"
    )
    ps.add_argument("--dry-run", action="store_true", help="show the diff, write nothing")
    ps.set_defaults(func=cmd_prices)

    r = sub.add_parser("report", help="monthly cost report from the ledger, with a month-end forecast")
    r.add_argument("--config", default=DEFAULT_CONFIG)
    r.add_argument("--ledger", help="ledger file (default: the config's ledger.path)")
    r.add_argument("--month", required=True, help="period, like 2026-11")
    r.add_argument("--tenant")
    r.add_argument("--by", choices=("model", "tenant", "feature", "environment", "day"), default="model")
    r.add_argument("--format", choices=("table", "csv", "json"), default="table")
    r.add_argument(
        "--chargeback",
        action="store_true",
        help="spread each dedicated endpoint's cost (measured by the minute, else configured) over "
        "tenants by token share",
    )
    r.set_defaults(func=cmd_report)

    e = sub.add_parser("estimate", help="cost per request and per month: Serverless, Batch, Dedicated")
    e.add_argument("--config", default=DEFAULT_CONFIG)
    e.add_argument("--ledger", help="ledger file for --from-ledger (default: ledger.path)")
    e.add_argument("--model")
    e.add_argument("--requests-per-month", type=int)
    e.add_argument("--input-tokens", type=int, help="T_in: input tokens per request")
    e.add_argument("--output-tokens", type=int, help="T_out: output tokens per request")
    e.add_argument("--from-ledger", action="store_true", help="measure T_in, T_out and volume")
    e.add_argument("--window", default="7d", help="measuring window for --from-ledger: 7d, 24h")
    e.add_argument("--feature")
    e.add_argument("--tenant")
    e.add_argument("--dedicated-monthly-usd")
    e.add_argument("--gpu-hourly-usd")
    e.add_argument("--gpus", type=int)
    e.add_argument("--hours-per-month")
    e.add_argument("--compare", help="comma-separated models priced at the same traffic")
    e.add_argument(
        "--measured-month",
        metavar="YYYY-MM",
        help="compare each dedicated endpoint's cost in that month with its tokens on Serverless, Batch",
    )
    e.add_argument("--format", choices=("table", "json"), default="table")
    e.set_defaults(func=cmd_estimate)

    db = sub.add_parser("db", help="the ledger database: retention, exports, migrations")
    dsub = db.add_subparsers(dest="db_command", required=True)
    dp = dsub.add_parser(
        "prune", help="delete the rows of periods before a month; their rollups stay (reports keep working)"
    )
    dp.add_argument("--config", default=DEFAULT_CONFIG)
    dp.add_argument("--ledger", help="ledger file (default: the config's ledger.path)")
    dp.add_argument("--before", required=True, help="first month to keep, like 2026-01")
    dp.set_defaults(func=cmd_db_prune)
    dx = dsub.add_parser("export", help="ledger rows as JSON Lines (one flat object per row)")
    dx.add_argument("--config", default=DEFAULT_CONFIG)
    dx.add_argument("--ledger", help="ledger file (default: the config's ledger.path)")
    dx.add_argument("--month", help="only this period, like 2026-11")
    dx.add_argument("--since", help="only rows started at or after this ISO date/time (UTC if no zone)")
    dx.add_argument("--aggregates", action="store_true", help="the month's rollup lines instead of rows")
    dx.add_argument("--output", "-o", help="file to write (default: stdout)")
    dx.set_defaults(func=cmd_db_export)
    di = dsub.add_parser("import", help="load a `db export` JSON Lines file (idempotent, all or nothing)")
    di.add_argument("file", help="the JSON Lines file `db export` wrote")
    di.add_argument("--config", default=DEFAULT_CONFIG)
    di.add_argument("--ledger", help="ledger file (default: the config's ledger.path)")
    di.set_defaults(func=cmd_db_import)
    dm = dsub.add_parser("migrate", help="apply the PostgreSQL ledger's schema migrations (serve does too)")
    dm.add_argument("--config", default=DEFAULT_CONFIG)
    dm.set_defaults(func=cmd_db_migrate)
    return p


def cmd_db_prune(args: argparse.Namespace) -> int:
    from proxy.cli.db import run_prune

    return run_prune(load_config(args.config), args.ledger, args.before)


def cmd_db_export(args: argparse.Namespace) -> int:
    from proxy.cli.db import run_export

    return run_export(
        load_config(args.config), args.ledger, args.month, args.since, args.aggregates, args.output
    )


def cmd_db_import(args: argparse.Namespace) -> int:
    from proxy.cli.db import cmd_db_import as run_import

    return run_import(args)


def cmd_db_migrate(args: argparse.Namespace) -> int:
    from proxy.cli.db import run_migrate

    return run_migrate(load_config(args.config))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:
        return _reader_gone()
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LedgerUnavailable as exc:  # the database is down or has no schema (its DSN is masked)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


def _reader_gone() -> int:
    """stdout's reader left (`report ... | head`): exit quietly with 141, as a filter killed by
    SIGPIPE does, and point stdout at /dev/null so the exit's own flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_PIPE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
