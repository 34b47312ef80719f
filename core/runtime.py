"""Facts about the running process shared by every app."""

from __future__ import annotations

import socket

HOST = socket.gethostname()
