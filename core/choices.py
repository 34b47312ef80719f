"""Django model choices derived from a plain enum, so a vocabulary is defined once (below the ORM)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from django.db import models


def text_choices(enum: type[StrEnum]) -> Any:
    """A TextChoices class with `enum`'s members: same names and values, Django's default labels.

    Typed Any: the members are built at run time, which the django-stubs plugin cannot see.
    """
    # Enum's functional API (name, [(member, value), ...]); django-stubs only types the class syntax.
    functional: Any = models.TextChoices
    return functional(enum.__name__, [(member.name, member.value) for member in enum])
