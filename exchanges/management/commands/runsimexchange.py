"""runsimexchange: serve the simulated exchange over HTTP/WS under Binance's and Bybit's real API paths (SPEC §2.6)."""

from __future__ import annotations

import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from core.scrub import secret_register
from exchanges.simulator.engine import default_engine
from exchanges.simulator.server import ServerConfig, serve_forever

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Serve the simulator as Binance (/api/v3, /fapi) and Bybit (/v5) REST + WS on one port."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=8765)
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--api-key", default="sim-api-key")
        parser.add_argument("--api-secret", default="sim-api-secret")
        parser.add_argument("--seed", type=int, default=None, help="price-walk seed of both simulated exchanges")

    def handle(self, *args: Any, **options: Any) -> None:
        config = ServerConfig(api_key=str(options["api_key"]), api_secret=str(options["api_secret"]))
        secret_register(config.api_key)
        secret_register(config.api_secret)
        if options["seed"] is not None:
            for exchange in (config.binance_exchange, config.bybit_exchange):
                default_engine.exchange_configure(exchange, seed=int(options["seed"]))
        self.stdout.write(
            f"simulated exchange on http://{options['host']}:{options['port']} (Binance + Bybit dialects)"
        )
        serve_forever(config, host=str(options["host"]), port=int(options["port"]))
