"""Log timestamps in the display time zone with milliseconds and the UTC offset."""

from __future__ import annotations

import logging
import time


class OffsetFormatter(logging.Formatter):
    """Adds `%(tz)s`, the record's UTC offset (+0900), so a log line's time is unambiguous.

    The process's local zone is DISPLAY_TIMEZONE: Django sets TZ from TIME_ZONE at start-up.
    """

    def format(self, record: logging.LogRecord) -> str:
        record.tz = time.strftime("%z", self.converter(record.created))
        return super().format(record)
