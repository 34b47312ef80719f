"""Scheduler URLs: status API, health, metrics."""

from django.urls import path

from scheduler.apis import SchedulerStatusApi
from scheduler.metrics import metrics_view
from scheduler.views import healthz

urlpatterns = [
    path("api/system/scheduler/status", SchedulerStatusApi.as_view(), name="scheduler-status"),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics_view, name="metrics"),
]
