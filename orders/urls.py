"""Orders URLs, mounted under /api/."""

from django.urls import path

from orders.apis import OrderCancelApi, OrderCollectionApi

urlpatterns = [
    path("orders/", OrderCollectionApi.as_view(), name="orders"),
    path("orders/<uuid:order_key>/", OrderCancelApi.as_view(), name="order-cancel"),
]
