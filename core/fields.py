"""Model fields: credentials encrypted at rest under FIELD_ENCRYPTION_KEY (Fernet); exact money on SQLite."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Context, Decimal
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


# --- Money -------------------------------------------------------------------------------------------

_WIDE = Context(prec=80, rounding=ROUND_HALF_UP)  # wider than any column: quantize never overflows
_FLOAT = Context(prec=15)  # what a REAL holds: SQL arithmetic on SQLite yields floats


class MoneyField(models.DecimalField):
    """A DecimalField that stays exact on SQLite too; on PostgreSQL exactly numeric(max_digits, places).

    SQLite has no decimal type: Django's "decimal" column has NUMERIC affinity, so a value is
    stored as a REAL and keeps ~15 significant digits (1234567.123456789012 reads back
    1234567.12345679). Here the SQLite column is TEXT (values written as canonical fixed-point
    text, read back exactly) with the collation "decimal" (core.db), which compares the text as
    numbers: =, !=, <, >, ORDER BY, MIN/MAX, GROUP BY, UNIQUE and indexes are numeric. SUM over
    such a column is exact through core.db's decimal-aware SUM. Arithmetic in SQL (F("a") - F("b"))
    converts the text to REAL, as it did before (approximate; compute exact figures in Python).

    The internal type is "MoneyField", not "DecimalField", so Django's SQLite layer does not wrap
    its aggregates in CAST(… AS NUMERIC) (which would round them to a REAL again). The cost: on
    SQLite, Django refuses `*` and `/` between a MoneyField and another column in SQL ("Invalid
    arguments for operator"); wrap one side in Cast(…, DecimalField()) where that is needed.
    """

    def get_internal_type(self) -> str:
        return "MoneyField"

    def db_type(self, connection: Any) -> str:
        if connection.vendor == "sqlite":
            return "text"
        return connection.data_types["DecimalField"] % self.db_type_parameters(connection)

    def db_parameters(self, connection: Any) -> dict[str, Any]:
        params = super().db_parameters(connection)
        if connection.vendor == "sqlite":
            params["collation"] = "decimal"
        return params

    def cast_db_type(self, connection: Any) -> str | None:
        return self.db_type(connection)

    def get_db_prep_value(self, value: Any, connection: Any, prepared: bool = False) -> Any:
        value = super().get_db_prep_value(value, connection, prepared)
        if connection.vendor == "sqlite" and isinstance(value, Decimal) and value.is_finite():
            # Canonical fixed point (no exponent), rounded to the column's places as PostgreSQL does.
            return format(value.quantize(self._quantum, context=_WIDE), "f")
        return value

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        if value is None or isinstance(value, Decimal):
            return value  # PostgreSQL: psycopg2 returns Decimal
        if isinstance(value, float):
            number = _FLOAT.create_decimal_from_float(value)
        else:
            number = Decimal(value) if isinstance(value, str | int) else Decimal(str(value))
        return number.quantize(self._quantum, context=_WIDE) if number.is_finite() else number

    @property
    def _quantum(self) -> Decimal:
        return Decimal(1).scaleb(-(self.decimal_places or 0))
