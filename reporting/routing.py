"""Websocket routes of the reporting app."""

from django.urls import path

from reporting.consumers import TraderFeedConsumer

websocket_urlpatterns = [
    path("ws/trader/", TraderFeedConsumer.as_asgi()),
]
