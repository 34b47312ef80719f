"""System checks for secrets: FIELD_ENCRYPTION_KEY's shape, and a probe that stored credentials decrypt.

Tags: "secrets" (no database; every manage.py command runs it) and "credentials" (reads the
database; registered as a deployment check, so it runs only when asked for, with a database:
`runscheduler --check`, or `manage.py check --deploy --tag credentials --database default`;
never inside `migrate`, whose tables may not exist yet). Apps that own encrypted fields register
the probe for their models (accounts, notifications), so nothing here imports a higher layer.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Iterable
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings
from django.core.checks import CheckMessage, Error, register
from django.db import DatabaseError, models
from django.db.models.functions import Cast

from core.fields import EncryptedTextField

SECRETS_TAG = "secrets"
CREDENTIALS_TAG = "credentials"


def field_encryption_key_problem() -> str | None:
    key = settings.FIELD_ENCRYPTION_KEY
    try:
        Fernet(key.encode() if isinstance(key, str) else key)
    except (ValueError, TypeError, binascii.Error):
        return (
            "FIELD_ENCRYPTION_KEY is not a valid Fernet key (it must be 32 url-safe base64-encoded bytes, "
            "44 characters; make one with cryptography.fernet.Fernet.generate_key())"
        )
    return None


@register(SECRETS_TAG)
def field_encryption_key_check(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    problem = field_encryption_key_problem()
    return [Error(problem, id="core.E001")] if problem else []


def undecryptable_credentials(model: type[models.Model], *, using: str = "default", sample: int = 5) -> list[str]:
    """One line per encrypted field of `model` whose stored values do not decrypt with FIELD_ENCRYPTION_KEY:
    how many, and the first primary keys. Reads the ciphertext (cast to text, so nothing is decrypted
    on load); never puts a value or its ciphertext in the message."""
    if field_encryption_key_problem():
        return []  # reported by core.E001; every decrypt would fail for that reason
    fernet = Fernet(settings.FIELD_ENCRYPTION_KEY.encode())
    lines = []
    for field in model._meta.get_fields():
        if not isinstance(field, EncryptedTextField):
            continue
        rows = (
            model._default_manager.using(using)
            .exclude(**{field.name: ""})
            .exclude(**{f"{field.name}__isnull": True})
            .annotate(_ciphertext=Cast(field.name, models.TextField()))
            .values_list("pk", "_ciphertext")
        )
        bad, total = [], 0
        for pk, ciphertext in rows.iterator():
            total += 1
            try:
                fernet.decrypt(ciphertext.encode())
            except (InvalidToken, ValueError, TypeError):
                bad.append(pk)
        if bad:
            shown = ", ".join(str(pk) for pk in bad[:sample]) + (" …" if len(bad) > sample else "")
            lines.append(
                f"{model._meta.label}.{field.name}: {len(bad)} of {total} stored value(s) cannot be decrypted "
                f"with FIELD_ENCRYPTION_KEY (ids {shown}); was the key changed without re-encrypting?"
            )
    return lines


def credentials_check_register(models_of: Callable[[], Iterable[type[models.Model]]], *, check_id: str) -> None:
    """Register the decrypt probe for the models `models_of()` returns (called by the owning app's ready())."""

    def credentials_check(
        app_configs: Any, databases: Iterable[str] | None = None, **kwargs: Any
    ) -> list[CheckMessage]:
        if not databases:
            return []
        messages: list[CheckMessage] = []
        for alias in databases:
            for model in models_of():
                try:
                    lines = undecryptable_credentials(model, using=alias)
                except DatabaseError as exc:  # no table yet (unmigrated): the migration check reports that
                    lines = [f"{model._meta.label}: cannot read stored credentials: {exc}"]
                messages += [Error(line, id=check_id) for line in lines]
        return messages

    credentials_check.__name__ = f"credentials_check_{check_id.replace('.', '_')}"
    register(credentials_check, CREDENTIALS_TAG, deploy=True)
