"""Orders URLs, mounted under /api/."""

from django.urls import path

from orders.apis import OrderCollectionApi, SignalExecutionApi, SignalListApi
from orders.history_apis import OrderHistoryApi, OrderItemApi
from orders.webhook_apis import WebhookApi

urlpatterns = [
    path("orders/", OrderCollectionApi.as_view(), name="orders"),
    path("orders/history/", OrderHistoryApi.as_view(), name="order-history"),
    path("orders/<uuid:order_key>/", OrderItemApi.as_view(), name="order-cancel"),
    path("webhook/", WebhookApi.as_view(), name="webhook"),
    path("signals/", SignalListApi.as_view(), name="signals"),
    path("signals/<int:signal_id>/execution", SignalExecutionApi.as_view(), name="signal-execution"),
]
