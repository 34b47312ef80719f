"""Orders URLs, mounted under /api/."""

from django.urls import path

from orders.apis import OrderCollectionApi
from orders.history_apis import OrderHistoryApi, OrderItemApi
from orders.webhook_apis import WebhookApi

urlpatterns = [
    path("orders/", OrderCollectionApi.as_view(), name="orders"),
    path("orders/history/", OrderHistoryApi.as_view(), name="order-history"),
    path("orders/<uuid:order_key>/", OrderItemApi.as_view(), name="order-cancel"),
    path("webhook/", WebhookApi.as_view(), name="webhook"),
]
