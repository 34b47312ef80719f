"""Scheduler URLs: status API, health, metrics, dashboard."""

from django.urls import path

from scheduler.apis import SchedulerStatusApi
from scheduler.metrics import metrics_view
from scheduler.views import dashboard, healthz, job_series

urlpatterns = [
    path("api/system/scheduler/status", SchedulerStatusApi.as_view(), name="scheduler-status"),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics_view, name="metrics"),
    path("dashboard/", dashboard, name="scheduler-dashboard"),
    path("dashboard/jobs/<str:job_id>/runs.json", job_series, name="scheduler-job-series"),
]
