"""Intake throttles (issue 13): orders per user, webhooks per strategy and per IP, wrong webhook tokens per IP."""

from __future__ import annotations

from rest_framework.request import Request

from core.throttling import IpFailureThrottle, IpThrottle, SharedRateThrottle, UserWriteThrottle, throttle_check


class OrderWriteThrottle(UserWriteThrottle):
    """POST /api/orders/ and DELETE /api/orders/{key}/ share one budget per user (THROTTLE_ORDERS_RATE)."""

    scope = "orders"


class WebhookIpThrottle(IpThrottle):
    """Every webhook request per source IP (THROTTLE_WEBHOOK_IP_RATE). TradingView sends every
    customer's alerts from a few shared addresses, so the default is generous."""

    scope = "webhook_ip"


class WebhookBadTokenThrottle(IpFailureThrottle):
    """Wrong group_name/token pairs per source IP (THROTTLE_WEBHOOK_BAD_TOKEN_RATE)."""

    scope = "webhook_bad_token"


class WebhookStrategyThrottle(SharedRateThrottle):
    """Authenticated webhooks per strategy (THROTTLE_WEBHOOK_STRATEGY_RATE). Counted after the token
    check, so wrong tokens naming a strategy cannot spend that strategy's budget."""

    scope = "webhook_strategy"


def webhook_bad_token_record(request: Request) -> None:
    WebhookBadTokenThrottle().failure_record(request)


def webhook_strategy_throttle(*, strategy_id: int) -> None:
    """Raise Throttled (429 + Retry-After) when the strategy's webhook budget is spent."""
    throttle_check(WebhookStrategyThrottle(), ident=strategy_id)
