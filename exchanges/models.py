"""Exchange data (market rules, price quotes) and the simulated exchange's state tables."""

from __future__ import annotations

from decimal import Decimal

from django.db import models

from core.fields import MoneyField
from exchanges.gateway import MarketType, OrderStatus, OrderType, Side


def money(**kwargs) -> MoneyField:  # noqa: ANN003
    """Money and quantities: numeric(28, 12) on PostgreSQL, exact decimal text on SQLite (core.fields)."""
    return MoneyField(max_digits=28, decimal_places=12, **kwargs)


class MarketTypeChoices(models.TextChoices):
    SPOT = MarketType.SPOT.value
    FUTURES = MarketType.FUTURES.value


class MarketInfo(models.Model):
    """Trading rules of one symbol on one exchange and market type; delisted rows go inactive."""

    exchange = models.CharField(max_length=32)
    market_type = models.CharField(max_length=8, choices=MarketTypeChoices.choices)
    symbol = models.CharField(max_length=64)
    tick_size = money()
    step_size = money()
    min_qty = money()
    max_qty = money(null=True, blank=True)
    min_notional = money(null=True, blank=True)
    max_price = money(null=True, blank=True)
    price_precision = models.PositiveSmallIntegerField(default=8)
    amount_precision = models.PositiveSmallIntegerField(default=8)
    active = models.BooleanField(default=True)
    updated_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["exchange", "market_type", "symbol"], name="marketinfo_unique_symbol")
        ]
        indexes = [models.Index(fields=["exchange", "market_type", "active"], name="marketinfo_active_idx")]

    def __str__(self) -> str:
        return f"{self.exchange} {self.market_type} {self.symbol}"


class PriceQuote(models.Model):
    """The last price seen for one symbol, upserted in bulk every 31 s (SPEC §4.4)."""

    exchange = models.CharField(max_length=32)
    market_type = models.CharField(max_length=8, choices=MarketTypeChoices.choices)
    symbol = models.CharField(max_length=64)
    price = money()
    as_of = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["exchange", "market_type", "symbol"], name="pricequote_unique_symbol")
        ]

    def __str__(self) -> str:
        return f"{self.exchange} {self.market_type} {self.symbol} {self.price} @ {self.as_of}"


# --- Simulator state (exchanges.simulator.engine owns every write) -------------------


class SimExchange(models.Model):
    """One simulated exchange: its configuration and the matching clock.

    Order work reads this row without locking it; only configuration writes and the matching
    step's short claim of `last_match_at` lock it. Writers of one account lock its SimAccount.
    """

    exchange = models.CharField(max_length=32, unique=True)
    # No longer bumped: the change sequence is per account (SimAccount.seq). Kept for the admin's
    # list_display (exchanges/admin.py); drop both together.
    seq = models.BigIntegerField(default=0)
    last_match_at = models.DateTimeField(null=True, blank=True)
    open_order_cap = models.PositiveIntegerField(default=200)  # per (account, market type, symbol)
    maker_fee_rate = models.DecimalField(max_digits=12, decimal_places=8, default="0.001")
    taker_fee_rate = models.DecimalField(max_digits=12, decimal_places=8, default="0.001")
    seed = models.BigIntegerField(null=True, blank=True)  # None: settings.SIMULATOR_SEED
    delisted = models.JSONField(default=list, blank=True)  # ["SPOT:XRP/USDT", ...]

    def __str__(self) -> str:
        return self.exchange


class SimAccount(models.Model):
    """One account of one simulated exchange: the row its writers lock, and its change sequence.

    Every engine transaction that writes an account's orders, fills, balances or positions locks
    this row first (lock order: SimAccount → SimOrder → SimBalance/SimPosition), so the writers of
    one account are serialized and those of different accounts run in parallel. Created on first
    use by the engine (SimEngine._account_lock).
    """

    exchange = models.CharField(max_length=32)
    account = models.CharField(max_length=128)
    seq = models.BigIntegerField(default=0)  # bumped on every change of the account's orders; SimOrder.update_seq
    last_match_at = models.DateTimeField(null=True, blank=True)  # the account's last matching step that did work

    class Meta:
        constraints = [models.UniqueConstraint(fields=["exchange", "account"], name="simaccount_unique_account")]

    def __str__(self) -> str:
        return f"{self.exchange}/{self.account} seq {self.seq}"


class SimOrder(models.Model):
    """An order on the simulated exchange; conditional orders spawn a regular child when triggered."""

    # The ignores: django-stubs types only the class syntax of TextChoices, not this functional API.
    Status = models.TextChoices("Status", [(s.value, s.value) for s in OrderStatus])  # type: ignore[call-overload]
    Type = models.TextChoices("Type", [(t.value, t.value) for t in OrderType])  # type: ignore[call-overload]
    SideChoices = models.TextChoices("SideChoices", [(s.value, s.value) for s in Side])  # type: ignore[call-overload]

    exchange = models.CharField(max_length=32)
    account = models.CharField(max_length=128)
    market_type = models.CharField(max_length=8, choices=MarketTypeChoices.choices)
    symbol = models.CharField(max_length=64)
    side = models.CharField(max_length=4, choices=SideChoices.choices)
    order_type = models.CharField(max_length=16, choices=Type.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=OrderStatus.NEW.value)
    conditional = models.BooleanField(default=False)
    reduce_only = models.BooleanField(default=False)
    client_order_id = models.CharField(max_length=40)
    quantity = money()
    filled_quantity = money(default=Decimal(0))
    cost = money(default=Decimal(0))  # Σ fill qty × fill price; average = cost / filled
    price = money(null=True, blank=True)
    stop_price = money(null=True, blank=True)
    fee = money(default=Decimal(0))
    fee_currency = models.CharField(max_length=16, blank=True)
    reserved = money(default=Decimal(0))  # still held in SimBalance.used for this order
    reserved_currency = models.CharField(max_length=16, blank=True)
    parent = models.OneToOneField(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="spawned"
    )  # the conditional order this one was spawned from
    reject_reason = models.CharField(max_length=255, blank=True)
    # GTC | IOC | FOK | POST_ONLY (engine.TimeInForce): how long the order may rest, and whether it may take.
    time_in_force = models.CharField(max_length=16, default="GTC")
    # A spot MARKET order sized in the quote currency (Binance quoteOrderQty, Bybit marketUnit=quoteCoin):
    # the amount asked for; `quantity` is what it bought at the market price.
    quote_quantity = money(null=True, blank=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    update_seq = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["exchange", "account", "market_type", "client_order_id"], name="simorder_unique_client_id"
            )
        ]
        indexes = [
            models.Index(fields=["exchange", "status"], name="simorder_status_idx"),
            models.Index(fields=["exchange", "account", "update_seq"], name="simorder_seq_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.exchange}#{self.pk} {self.side} {self.quantity} {self.symbol} {self.status}"


class SimBalance(models.Model):
    """One currency of one account in one market type; `used` is reserved by open orders."""

    exchange = models.CharField(max_length=32)
    account = models.CharField(max_length=128)
    market_type = models.CharField(max_length=8, choices=MarketTypeChoices.choices)
    currency = models.CharField(max_length=16)
    free = money(default=Decimal(0))
    used = money(default=Decimal(0))

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["exchange", "account", "market_type", "currency"], name="simbalance_unique_currency"
            )
        ]

    def __str__(self) -> str:
        return f"{self.exchange}/{self.account} {self.market_type} {self.currency} {self.free}+{self.used}"


class SimPosition(models.Model):
    """A futures position (signed quantity) of one account; fills realize PnL into the quote balance."""

    exchange = models.CharField(max_length=32)
    account = models.CharField(max_length=128)
    symbol = models.CharField(max_length=64)
    quantity = money(default=Decimal(0))
    entry_price = money(default=Decimal(0))

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["exchange", "account", "symbol"], name="simposition_unique_symbol")
        ]

    def __str__(self) -> str:
        return f"{self.exchange}/{self.account} {self.symbol} {self.quantity}@{self.entry_price}"


class SimFill(models.Model):
    """One execution of a simulated order (append-only)."""

    order = models.ForeignKey(SimOrder, on_delete=models.CASCADE, related_name="fills")
    quantity = money()
    price = money()
    fee = money(default=Decimal(0))
    fee_currency = models.CharField(max_length=16, blank=True)
    is_maker = models.BooleanField(default=False)
    created_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"fill {self.quantity}@{self.price} of order {self.order_id}"


class SimFault(models.Model):
    """An injected fault. Blank scope fields match anything; consumed by count, or fired by probability."""

    class Kind(models.TextChoices):
        LATENCY = "latency"
        TIMEOUT = "timeout"
        HTTP_5XX = "http_5xx"
        HTTP_429 = "http_429"
        MAINTENANCE = "maintenance"
        WS_DROP = "ws_drop"
        WS_SILENT = "ws_silent"

    class Phase(models.TextChoices):
        # BEFORE: the call fails and changes nothing. AFTER: the engine did the work and
        # committed, then the reply is lost (a create that "timed out" but exists).
        BEFORE = "before"
        AFTER = "after"

    exchange = models.CharField(max_length=32, blank=True)
    endpoint = models.CharField(max_length=64, blank=True)
    account = models.CharField(max_length=128, blank=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    phase = models.CharField(max_length=8, choices=Phase.choices, default=Phase.BEFORE)
    remaining = models.IntegerField(null=True, blank=True)  # None: unlimited (use with probability)
    probability = models.DecimalField(max_digits=5, decimal_places=4, null=True, blank=True)  # None: always
    latency_ms = models.PositiveIntegerField(default=0)
    fired = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        scope = "/".join(part or "*" for part in (self.exchange, self.endpoint, self.account))
        return f"{self.kind} on {scope} ({self.remaining if self.remaining is not None else '∞'} left)"


class SimPricePath(models.Model):
    """A scripted price list for one symbol: prices[i] holds from start_at + i × step_seconds; the last holds on."""

    exchange = models.CharField(max_length=32)
    symbol = models.CharField(max_length=64)
    start_at = models.DateTimeField()
    step_seconds = models.PositiveIntegerField(default=60)
    prices = models.JSONField(default=list)  # decimal strings

    class Meta:
        constraints = [models.UniqueConstraint(fields=["exchange", "symbol"], name="simpricepath_unique_symbol")]

    def __str__(self) -> str:
        return f"{self.exchange} {self.symbol} ({len(self.prices)} prices)"


# --- User-data streams (exchanges.streams owns every write) ---------------------------


class StreamState(models.Model):
    """Health of one account's user-data stream, written by the leader's UserStreamManager (SPEC §4.6).

    Short single-row writes from the manager; read by check_websocket_health, which may set
    `reconnect_requested_at` on an open but stale row. The manager alone acts on that flag,
    through the account's one stream task, so a reconnect is never started twice.
    """

    class State(models.TextChoices):
        CONNECTING = "connecting"
        OPEN = "open"
        DEAD = "dead"  # torn down, waiting out its backoff before the next connect
        STOPPED = "stopped"

    account = models.OneToOneField("accounts.Account", on_delete=models.CASCADE, related_name="stream_state")
    exchange = models.CharField(max_length=32)
    state = models.CharField(max_length=12, choices=State.choices, default=State.CONNECTING)
    ping_interval = models.FloatField(default=20.0, help_text="seconds; alive = message or pong within twice this")
    connected_at = models.DateTimeField(null=True, blank=True)
    last_message_at = models.DateTimeField(null=True, blank=True)
    last_pong_at = models.DateTimeField(null=True, blank=True)
    listen_key_refreshed_at = models.DateTimeField(null=True, blank=True)
    consecutive_failures = models.PositiveIntegerField(default=0)
    next_reconnect_at = models.DateTimeField(null=True, blank=True)
    reconnects = models.PositiveIntegerField(default=0, help_text="reconnects started since the row was created")
    reconnect_requested_at = models.DateTimeField(
        null=True, blank=True, help_text="check_websocket_health found the open stream stale; cleared by the manager"
    )
    last_error = models.CharField(max_length=500, blank=True)
    updated_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"stream of account {self.account_id} ({self.exchange}): {self.state}"
