"""Websocket routes of the scheduler app."""

from django.urls import path

from scheduler.consumers import SchedulerFeedConsumer

websocket_urlpatterns = [
    path("ws/scheduler/", SchedulerFeedConsumer.as_asgi()),
]
