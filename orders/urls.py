"""Orders URLs, mounted under /api/."""

from django.urls import path

from orders.apis import OrderCancelApi, OrderCollectionApi, SignalExecutionApi, SignalListApi
from orders.webhook_apis import WebhookApi

urlpatterns = [
    path("orders/", OrderCollectionApi.as_view(), name="orders"),
    path("orders/<uuid:order_key>/", OrderCancelApi.as_view(), name="order-cancel"),
    path("webhook/", WebhookApi.as_view(), name="webhook"),
    path("signals/", SignalListApi.as_view(), name="signals"),
    path("signals/<int:signal_id>/execution", SignalExecutionApi.as_view(), name="signal-execution"),
]
