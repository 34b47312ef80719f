"""User-data streams (SPEC §4.6): the leader's UserStreamManager, message parsing, and their database side."""

from exchanges.streams.manager import StreamClock, StreamConfig, UserStreamManager

__all__ = ["StreamClock", "StreamConfig", "UserStreamManager"]
