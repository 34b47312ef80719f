"""Encrypted model fields: credentials at rest under FIELD_ENCRYPTION_KEY (Fernet)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings
from django.db import models

from core.scrub import secret_register


@lru_cache(maxsize=4)
def _fernet(key: str) -> Fernet:
    return Fernet(key.encode())


def encrypt(value: str) -> str:
    return _fernet(settings.FIELD_ENCRYPTION_KEY).encrypt(value.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _fernet(settings.FIELD_ENCRYPTION_KEY).decrypt(token.encode()).decode()
    except InvalidToken:
        # Never echo the token: it is the secret's ciphertext.
        raise ValueError("stored credential cannot be decrypted with FIELD_ENCRYPTION_KEY") from None


class EncryptedTextField(models.TextField):
    """A text field stored Fernet-encrypted; decrypted values are registered for log scrubbing."""

    def get_prep_value(self, value: Any) -> Any:
        value = super().get_prep_value(value)
        if value in (None, ""):
            return value
        return encrypt(str(value))

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        if value in (None, ""):
            return value
        plain = decrypt(value)
        secret_register(plain)
        return plain
