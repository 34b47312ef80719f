"""Named crash points (SPEC §4.1) that tests enable to prove every order survives a crash anywhere."""

from __future__ import annotations

import os
import signal

from django.conf import settings

# Every crash point the order paths pass through, in the order an order meets them.
CRASH_POINTS = (
    "promote.after_submitting_commit",
    "promote.after_exchange_ack",  # after each acknowledgement: mid-batch while others are unsent
    "promote.before_batch_record",  # every reply of a batch in, none recorded yet
    "demote.after_cancelling_commit",
    "demote.after_cancel_ack",
    "fill.after_trade_upsert",
)

_enabled: dict[str, str] = {}
_hits: dict[str, list[int]] = {}  # name → [passes so far, the pass that crashes]


class CrashPointError(RuntimeError):
    """Raised at an enabled crash point in 'raise' mode: the process state is as after a crash there."""


def crash_enable(name: str, mode: str = "raise", *, hit: int = 1) -> None:
    """Arm a crash point for this process: mode 'raise' (exception) or 'kill' (SIGKILL itself), on its
    `hit`-th pass (e.g. the second acknowledgement of a batch)."""
    if name not in CRASH_POINTS:
        raise ValueError(f"unknown crash point {name!r}; known: {', '.join(CRASH_POINTS)}")
    if mode not in ("raise", "kill"):
        raise ValueError(f"crash point mode must be 'raise' or 'kill', got {mode!r}")
    _enabled[name] = mode
    _hits[name] = [0, hit]


def crash_disable_all() -> None:
    _enabled.clear()
    _hits.clear()


def _from_settings() -> dict[str, str]:
    # ORDER_CRASH_POINTS="promote.after_exchange_ack:kill,demote.after_cancel_ack" arms points in a subprocess.
    armed = {}
    for item in filter(None, (part.strip() for part in settings.ORDER_CRASH_POINTS.split(","))):
        name, _, mode = item.partition(":")
        armed[name] = mode or "raise"
    return armed


def crash_point(name: str) -> None:
    """Crash here if a test armed `name`; a no-op otherwise (one dict lookup on the hot path)."""
    mode = _enabled.get(name) or (_from_settings().get(name) if settings.ORDER_CRASH_POINTS else None)
    if mode is None:
        return
    count = _hits.get(name)
    if count is not None:
        count[0] += 1
        if count[0] != count[1]:
            return
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise CrashPointError(f"crash point {name}")
