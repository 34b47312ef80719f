"""User-data stream transport (SPEC §4.6): the leader's UserStreamManager, message parsing, StreamState rows.

The manager is given its accounts and what to do with order updates by a StreamHandler
(orders.streams builds the manager with one).
"""

from exchanges.streams.manager import StreamClock, StreamConfig, StreamHandler, UserStreamManager

__all__ = ["StreamClock", "StreamConfig", "StreamHandler", "UserStreamManager"]
