"""Live feeds that poll the database: a websocket consumer base shared by the scheduler and trader feeds.

Nothing is pushed from other threads or processes (SPEC §2.5): each connection sends a first message,
then polls every `poll_interval` seconds through database_sync_to_async and sends what changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from abc import ABC, abstractmethod
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DatabaseError

logger = logging.getLogger(__name__)

# Application close code (4000-4999) mirroring HTTP 403. Sent after accept(): a close before
# accept makes the server refuse the handshake with HTTP 403, and a browser then only sees 1006.
CLOSE_FORBIDDEN = 4403
CLOSE_INTERNAL_ERROR = 1011


class PollingFeedConsumer(AsyncJsonWebsocketConsumer, ABC):
    """Accept, check the user, send `start()`'s message, then every `poll_interval` s send `poll()`'s.

    Subclasses implement, all synchronous (they run in the database thread): `allowed(user)`,
    `start(user) -> first message`, `poll() -> messages` and `still_allowed() -> bool`, which is
    asked every `user_recheck_every` seconds (a revoked user's feed is closed with 4403). A refused
    user is accepted and closed at once with 4403, so the client can tell why. A database error
    at connect closes with 1011; during polling it is logged and the next poll tries again.
    """

    name = "feed"
    poll_interval = 1.0
    user_recheck_every = 30.0

    @abstractmethod
    def allowed(self, user: Any) -> bool:
        """Whether `user` may open this feed."""

    @abstractmethod
    def start(self, user: Any) -> dict[str, Any]:
        """The first message, sent once the feed opens."""

    @abstractmethod
    def poll(self) -> list[dict[str, Any]]:
        """The messages of one poll (empty: nothing changed)."""

    @abstractmethod
    def still_allowed(self) -> bool:
        """Whether the feed's user may still see it (asked every `user_recheck_every` s)."""

    async def connect(self) -> None:
        user = self.scope.get("user")
        await self.accept()
        if user is None or not user.is_authenticated or not self.allowed(user):
            logger.info("%s: refused %s", self.name, getattr(user, "pk", None) or "anonymous")
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.user_id = user.pk
        try:
            first = await database_sync_to_async(self.start)(user)
        except DatabaseError as exc:
            logger.warning("%s: database unavailable at connect: %s", self.name, exc)
            await self.close(code=CLOSE_INTERNAL_ERROR)
            return
        await self.send_json(first)
        self.poll_task = asyncio.create_task(self._poll_forever())

    async def disconnect(self, code: int) -> None:
        task = getattr(self, "poll_task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """The feed is one-way; whatever a client sends is ignored."""

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        # Datetimes arrive aware in the display time zone; DjangoJSONEncoder keeps the offset.
        return json.dumps(content, cls=DjangoJSONEncoder)

    async def _poll_forever(self) -> None:
        poll = database_sync_to_async(self.poll)
        recheck_at = time.monotonic() + self.user_recheck_every
        try:
            while True:
                await asyncio.sleep(self.poll_interval)
                try:
                    if time.monotonic() >= recheck_at:
                        recheck_at = time.monotonic() + self.user_recheck_every
                        if not await database_sync_to_async(self.still_allowed)():
                            logger.info("%s: user %s may no longer read it; closing", self.name, self.user_id)
                            await self.close(code=CLOSE_FORBIDDEN)
                            return
                    messages = await poll()
                except DatabaseError as exc:
                    # A database restart or failover: keep the socket, try again next time.
                    logger.warning("%s: poll failed: %s", self.name, exc)
                    continue
                for message in messages:
                    await self.send_json(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("%s: poll loop crashed for user %s", self.name, self.user_id)
            await self.close(code=CLOSE_INTERNAL_ERROR)
