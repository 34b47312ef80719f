"""Orders URLs, mounted under /api/."""

from django.urls import path

from orders.apis import OrderCancelApi, OrderCollectionApi
from orders.webhook_apis import WebhookApi

urlpatterns = [
    path("orders/", OrderCollectionApi.as_view(), name="orders"),
    path("orders/<uuid:order_key>/", OrderCancelApi.as_view(), name="order-cancel"),
    path("webhook/", WebhookApi.as_view(), name="webhook"),
]
