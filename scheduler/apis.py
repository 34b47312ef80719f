"""Scheduler HTTP API: the staff-only status endpoint (SPEC §2.5)."""

from __future__ import annotations

import logging
from zoneinfo import ZoneInfo

from django.conf import settings
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.authentication import SessionAuthentication
from rest_framework.permissions import IsAdminUser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from core.tokens import HashedTokenAuthentication
from scheduler.selectors import scheduler_status

logger = logging.getLogger(__name__)


class SchedulerDateTimeField(serializers.DateTimeField):
    """ISO-8601 in DISPLAY_TIMEZONE (by default SCHEDULER_TIMEZONE; e.g. 2026-11-24T08:34:30+09:00)."""

    def __init__(self, **kwargs):  # noqa: ANN003
        kwargs.setdefault("default_timezone", ZoneInfo(settings.DISPLAY_TIMEZONE))
        super().__init__(**kwargs)


class SchedulerStatusApi(APIView):
    """GET /api/system/scheduler/status: leader, standbys, account shard owners and every registry job. Staff only."""

    # Token authentication first: its authenticate_header makes an anonymous request a 401
    # (with WWW-Authenticate) instead of SessionAuthentication's 403.
    authentication_classes = [HashedTokenAuthentication, SessionAuthentication]
    permission_classes = [IsAdminUser]

    class OutputSerializer(serializers.Serializer):
        class LeaderSerializer(serializers.Serializer):
            class Meta:
                ref_name = "SchedulerStatusLeader"

            host = serializers.CharField()
            pid = serializers.IntegerField()
            term = serializers.IntegerField(allow_null=True)
            since = SchedulerDateTimeField(allow_null=True)
            last_heartbeat = SchedulerDateTimeField()

        class StandbySerializer(serializers.Serializer):
            class Meta:
                ref_name = "SchedulerStatusStandby"

            host = serializers.CharField()
            pid = serializers.IntegerField()
            last_heartbeat = SchedulerDateTimeField()

        class ShardSerializer(serializers.Serializer):
            class Meta:
                ref_name = "SchedulerStatusShard"

            shard = serializers.IntegerField()
            held = serializers.BooleanField(help_text="the holder's lock connection holds the shard's lock now")
            host = serializers.CharField(allow_null=True)
            pid = serializers.IntegerField(allow_null=True)
            term = serializers.IntegerField(allow_null=True)
            since = SchedulerDateTimeField(allow_null=True)

        class JobSerializer(serializers.Serializer):
            class Meta:
                ref_name = "SchedulerStatusJob"

            class LastRunSerializer(serializers.Serializer):
                class Meta:
                    ref_name = "SchedulerStatusLastRun"

                outcome = serializers.CharField()
                scheduled_at = SchedulerDateTimeField()
                duration_ms = serializers.IntegerField(allow_null=True)
                lateness_ms = serializers.IntegerField(allow_null=True)
                summary = serializers.CharField(allow_blank=True)

            id = serializers.CharField()
            name = serializers.CharField()
            trigger = serializers.CharField()
            next_run = SchedulerDateTimeField(allow_null=True)
            paused = serializers.BooleanField()
            pause_reason = serializers.CharField(allow_null=True)
            last_run = LastRunSerializer(allow_null=True)

        class Meta:
            # Component names in the OpenAPI schema; other APIs have nested Output serializers too.
            ref_name = "SchedulerStatus"

        running = serializers.BooleanField()
        leader = LeaderSerializer(allow_null=True)
        standbys = StandbySerializer(many=True)
        shards = ShardSerializer(many=True, help_text="account shard owners (empty when sharding is off)")
        jobs = JobSerializer(many=True)

    @extend_schema(responses=OutputSerializer)
    def get(self, request: Request) -> Response:
        data = scheduler_status(now=timezone.now())
        return Response(self.OutputSerializer(data).data)
