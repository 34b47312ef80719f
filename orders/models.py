"""Orders from arrival to their end: queued and live orders, their event history, dirty marks, breakers, webhooks."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from accounts.models import Account, MarketType, StrategyAccount, money
from core.choices import text_choices
from exchanges import gateway

# Model choices of the gateway's enums (defined once, in exchanges.gateway): same values and labels.
Side = text_choices(gateway.Side)
OrderType = text_choices(gateway.OrderType)


class CancelRequestedBy(models.TextChoices):
    NONE = "NONE"
    USER = "USER"
    DEMOTION = "DEMOTION"


class OrderIdentity(models.Model):
    """Fields a logical order keeps as it moves between PendingOrder and OpenOrder (SPEC §3)."""

    order_key = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    placement_no = models.PositiveIntegerField(default=0)
    client_order_id = models.CharField(max_length=36, blank=True, db_index=True)
    strategy_account = models.ForeignKey(StrategyAccount, on_delete=models.PROTECT, related_name="+")
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="+")
    symbol = models.CharField(max_length=32)
    market_type = models.CharField(max_length=8, choices=MarketType.choices)
    side = models.CharField(max_length=4, choices=Side.choices)
    order_type = models.CharField(max_length=12, choices=OrderType.choices)
    price = money(null=True, blank=True)
    stop_price = money(null=True, blank=True)
    quantity = money()
    filled_quantity = money(default=0)
    priority = models.IntegerField(default=0, help_text="lower ranks first (LIMIT buckets only)")
    signal_at = models.DateTimeField()
    queue_seq = models.BigIntegerField(help_text="arrival order (ns clock at intake); never changes")
    cancel_requested_by = models.CharField(
        max_length=10, choices=CancelRequestedBy.choices, default=CancelRequestedBy.NONE
    )
    express = models.BooleanField(default=False, help_text="MARKET orders skip the slot logic")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True

    @property
    def remaining_quantity(self):  # noqa: ANN201
        return self.quantity - self.filled_quantity

    @property
    def conditional(self) -> bool:
        return self.order_type in (OrderType.STOP_LIMIT, OrderType.STOP_MARKET)

    def __str__(self) -> str:
        return f"{self.order_key} {self.side} {self.order_type} {self.quantity} {self.symbol}"


class PendingOrder(OrderIdentity):
    """An order waiting for a slot (QUEUED) or being placed (SUBMITTING, outcome not yet known)."""

    class Status(models.TextChoices):
        QUEUED = "QUEUED"
        SUBMITTING = "SUBMITTING"

    status = models.CharField(max_length=12, choices=Status.choices, default=Status.QUEUED)
    submitting_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0, help_text="failed placements with a temporary error")
    next_attempt_at = models.DateTimeField(null=True, blank=True, help_text="backoff after a temporary error")
    not_found_count = models.PositiveSmallIntegerField(default=0, help_text="lookups that found nothing")
    last_lookup_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True, help_text="the last placement error, scrubbed")
    last_error_kind = models.CharField(
        max_length=10,
        blank=True,
        help_text="how the last placement failed: unknown (look up twice), temporary or permanent (look up once)",
    )

    class Meta:
        indexes = [
            models.Index(fields=["account", "market_type", "symbol", "status"], name="pending_pair_idx"),
            models.Index(fields=["express", "status"], name="pending_express_idx"),
        ]


class OpenOrder(OrderIdentity):
    """An order live on the exchange, being cancelled, or a triggered stop tracked as its spawned order."""

    class Status(models.TextChoices):
        NEW = "NEW"
        PARTIALLY_FILLED = "PARTIALLY_FILLED"
        CANCELLING = "CANCELLING"
        TRIGGERED = "TRIGGERED"

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.NEW)
    exchange_order_id = models.CharField(max_length=64)
    conditional = models.BooleanField(default=False)
    status_before_cancel = models.CharField(max_length=16, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    cancel_failures = models.PositiveSmallIntegerField(default=0)
    next_cancel_at = models.DateTimeField(
        null=True, blank=True, help_text="when the queue may (re)send the cancel of a CANCELLING order; null: now"
    )
    spawned_order_id = models.CharField(max_length=64, blank=True)
    spawned_client_order_id = models.CharField(max_length=36, blank=True)
    missing_runs = models.PositiveSmallIntegerField(default=0, help_text="runs where open and history lookups missed")
    last_seen_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["account", "market_type", "symbol"], name="open_pair_idx"),
            models.Index(fields=["account", "market_type", "status"], name="open_account_status_idx"),
        ]


class OrderEvent(models.Model):
    """Append-only history of a logical order; the last event says where it is."""

    class Kind(models.TextChoices):
        QUEUED = "queued"
        SUBMITTING = "submitting"
        PLACED = "placed"
        DEMOTED = "demoted"
        REQUEUED = "requeued"
        TRIGGERED = "triggered"
        PARTIALLY_FILLED = "partially_filled"
        FILLED = "filled"
        CANCELLED = "cancelled"
        REJECTED = "rejected"
        LOST = "lost"
        FAILED = "failed"

    order_key = models.UUIDField(db_index=True)
    kind = models.CharField(max_length=20, choices=Kind.choices)
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="+")
    symbol = models.CharField(max_length=32)
    details = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["order_key", "id"], name="orderevent_key_id_idx")]

    def __str__(self) -> str:
        return f"{self.order_key} {self.kind}"


class QueueDirty(models.Model):
    """A (account, market type, symbol) pair whose orders changed; written in the same transaction."""

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="+")
    market_type = models.CharField(max_length=8, choices=MarketType.choices)
    symbol = models.CharField(max_length=32)
    marked_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["account", "market_type", "symbol"], name="queuedirty_unique_pair")
        ]
        # The 1 s pass reads `marked_at <= now`: marks deferred into the future (backoffs,
        # lookups due later) wait here without costing the steady state anything.
        indexes = [models.Index(fields=["marked_at"], name="queuedirty_marked_idx")]

    def __str__(self) -> str:
        return f"{self.account_id} {self.market_type} {self.symbol}"


class CircuitState(models.Model):
    """A circuit breaker over exchange calls: per (exchange, market type), or per account for auth failures."""

    scope = models.CharField(max_length=100, unique=True)
    failures = models.PositiveIntegerField(default=0)
    opened_until = models.DateTimeField(null=True, blank=True)
    cooldown_seconds = models.PositiveIntegerField(default=0)
    last_error = models.CharField(max_length=500, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.scope}: {self.failures} failures"


class WebhookDelivery(models.Model):
    """One accepted webhook delivery (SPEC §6) and the reply it got; written in the transaction of its orders.

    Deduplication: a delivery with an `id` is unique per strategy for good (partial unique index on
    delivery_id). One without is identified by `payload_hash` (sha256 of the canonical payload,
    token removed) for 60 s: the row whose window is open (`hash_window_open`) is unique per
    strategy and hash; the first identical delivery after the window closes it and takes its place.
    A concurrent identical insert waits on the unique index and then replays this row's `reply`.
    """

    strategy = models.ForeignKey("accounts.Strategy", on_delete=models.CASCADE, related_name="+")
    delivery_id = models.CharField(max_length=100, blank=True, help_text="the sender's `id`; empty when none")
    payload_hash = models.CharField(max_length=64)
    hash_window_open = models.BooleanField(
        default=False, help_text="without an id: this row dedupes its payload (for 60 s from received_at)"
    )
    received_at = models.DateTimeField()
    reply = models.JSONField(default=dict)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["strategy", "delivery_id"],
                condition=~models.Q(delivery_id=""),
                name="webhookdelivery_unique_id",
            ),
            models.UniqueConstraint(
                fields=["strategy", "payload_hash"],
                condition=models.Q(delivery_id="", hash_window_open=True),
                name="webhookdelivery_unique_open_hash",
            ),
        ]
        indexes = [models.Index(fields=["received_at"], name="webhookdelivery_received_idx")]
        verbose_name_plural = "webhook deliveries"

    def __str__(self) -> str:
        return f"webhook {self.delivery_id or self.payload_hash[:12]} of strategy {self.strategy_id}"


class Signal(models.Model):
    """One trading signal and the orders it fanned out to (a webhook delivery, or one API order).

    The execution report (orders.selectors.signal_execution) reads its followers' times from their
    OrderEvent history and their fills from the Trade ledger; only the membership and each order's
    reference price are stored here, in the transaction that queued the orders.
    """

    class Source(models.TextChoices):
        WEBHOOK = "webhook"
        API = "api"

    source = models.CharField(max_length=8, choices=Source.choices)
    strategy = models.ForeignKey("accounts.Strategy", on_delete=models.PROTECT, related_name="+")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    symbol = models.CharField(max_length=32)
    side = models.CharField(max_length=4, choices=Side.choices, blank=True)
    order_type = models.CharField(max_length=12, choices=OrderType.choices)
    price = money(null=True, blank=True, help_text="the signal's own price or stop price, if it had one")
    received_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"signal {self.pk} {self.source} {self.side} {self.order_type} {self.symbol}"


class SignalOrder(models.Model):
    """One follower's order of a signal, with the price it was judged against when queued."""

    signal = models.ForeignKey(Signal, on_delete=models.CASCADE, related_name="orders")
    order_key = models.UUIDField(unique=True)
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="+")
    strategy_account = models.ForeignKey(StrategyAccount, on_delete=models.PROTECT, related_name="+")
    side = models.CharField(max_length=4, choices=Side.choices)
    order_type = models.CharField(max_length=12, choices=OrderType.choices)
    quantity = money()
    reference_price = money(
        null=True, blank=True, help_text="limit or stop price, or the market price at intake (MARKET): slippage base"
    )

    def __str__(self) -> str:
        return f"{self.order_key} of signal {self.signal_id}"
