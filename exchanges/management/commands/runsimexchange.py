"""runsimexchange: serve the simulated exchange over HTTP/WS under Binance's and Bybit's real API paths (SPEC §2.6)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from core.scrub import secret_register
from exchanges.simulator.engine import default_engine
from exchanges.simulator.server import (
    DEFAULT_DB_THREADS,
    RateLimitConfig,
    ServerConfig,
    commits_unflushed,
    serve_forever,
)
from exchanges.simulator.wire import KeysFileError, keys_parse

logger = logging.getLogger(__name__)


def rate_limit_config(*, enabled: bool, overrides: list[str]) -> RateLimitConfig:
    """RateLimitConfig from NAME=VALUE pairs naming its fields (e.g. binance_futures_weight_per_minute=100)."""
    fields = {f.name: f for f in dataclasses.fields(RateLimitConfig) if f.name != "enabled"}
    values: dict[str, Any] = {"enabled": enabled}
    for item in overrides:
        name, sep, raw = item.partition("=")
        if not sep or name not in fields:
            raise CommandError(f"--rate-limit {item!r}: expected NAME=VALUE, NAME one of {', '.join(fields)}")
        if raw.lower() in ("none", "off") and name == "binance_ban_after":
            values[name] = None
            continue
        try:
            values[name] = float(raw) if name.endswith("_seconds") else int(raw)
        except ValueError:
            raise CommandError(f"--rate-limit {item!r}: {raw!r} is not a number")
    return RateLimitConfig(**values)


def keys_load(paths: list[str]) -> dict[str, str]:
    """The API key pairs of every keys file (see wire.keys_parse); CommandError naming the file."""
    keys: dict[str, str] = {}
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                found = keys_parse(handle.read())
        except OSError as exc:
            raise CommandError(f"--keys {path}: {exc.strerror or exc}") from None
        except KeysFileError as exc:
            raise CommandError(f"--keys {path}: {exc}") from None
        clash = next((k for k, secret in found.items() if keys.get(k, secret) != secret), None)
        if clash is not None:
            raise CommandError(f"--keys {path}: key {clash[:6]}… has another secret in an earlier file")
        keys.update(found)
    return keys


class Command(BaseCommand):
    help = "Serve the simulator as Binance (/api/v3, /fapi, /sapi) and Bybit (/v5) REST + WS on one port."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=8765)
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--api-key", default="sim-api-key", help="one account's API key (always served)")
        parser.add_argument("--api-secret", default="sim-api-secret")
        parser.add_argument(
            "--keys",
            action="append",
            default=[],
            metavar="FILE",
            help='more accounts, one per API key: a JSON list of {"key", "secret"} (or an object key → '
            "secret) or lines key:secret; repeatable",
        )
        parser.add_argument("--seed", type=int, default=None, help="price-walk seed of both simulated exchanges")
        parser.add_argument(
            "--db-threads",
            type=int,
            default=DEFAULT_DB_THREADS,
            help="engine calls served at once, one database connection each (default %(default)s)",
        )
        parser.add_argument(
            "--synchronous-commit",
            choices=["on", "off"],
            default="off",
            help="PostgreSQL synchronous_commit of the simulator's own connections (default %(default)s: "
            "see exchanges.simulator.server.commits_unflushed)",
        )
        parser.add_argument(
            "--no-rate-limits", action="store_true", help="serve without the exchanges' request and order limits"
        )
        parser.add_argument(
            "--rate-limit",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="override one limit, e.g. binance_futures_weight_per_minute=100 (repeatable; see RateLimitConfig)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if int(options["db_threads"]) < 1:
            raise CommandError("--db-threads must be at least 1")
        limits = rate_limit_config(enabled=not options["no_rate_limits"], overrides=list(options["rate_limit"]))
        keys = keys_load([str(path) for path in options["keys"]])
        config = ServerConfig(
            api_key=str(options["api_key"]), api_secret=str(options["api_secret"]), rate_limits=limits, keys=keys
        )
        for key, secret in [(config.api_key, config.api_secret), *keys.items()]:
            secret_register(key)
            secret_register(secret)
        if options["seed"] is not None:
            for exchange in (config.binance_exchange, config.bybit_exchange):
                default_engine.exchange_configure(exchange, seed=int(options["seed"]))
        self.stdout.write(
            f"simulated exchange on http://{options['host']}:{options['port']} (Binance + Bybit dialects; "
            f"{1 + len(keys.keys() - {config.api_key})} API key(s); rate limits {'on' if limits.enabled else 'off'}; "
            f"{options['db_threads']} database threads)"
        )
        if options["synchronous_commit"] == "off":
            commits_unflushed()
        serve_forever(
            config, host=str(options["host"]), port=int(options["port"]), db_threads=int(options["db_threads"])
        )
