"""`runscheduler --check` refuses an unusable FIELD_ENCRYPTION_KEY: a malformed one, and a valid one that
cannot decrypt the stored credentials (probe registered by accounts and notifications as system checks)."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from django.core.management import CommandError, call_command

from notifications.models import TelegramProfile
from tests import procs
from tests.orders.factories import AccountFactory, UserFactory

SECRET = "binance-api-secret-778899"


@pytest.mark.django_db
def test_check_fails_on_a_malformed_key(settings, capsys):  # noqa: ANN001
    settings.FIELD_ENCRYPTION_KEY = "short"
    with pytest.raises(CommandError):
        call_command("runscheduler", "--check")
    assert "FIELD_ENCRYPTION_KEY is not a valid Fernet key" in capsys.readouterr().err


def test_check_exits_1_on_a_malformed_key_in_a_real_process(proc_sqlite_db):  # noqa: ANN001
    out = procs.manage("runscheduler", "--check", env=proc_sqlite_db.env(FIELD_ENCRYPTION_KEY="short"))
    assert out.returncode == 1
    assert "FIELD_ENCRYPTION_KEY is not a valid Fernet key" in out.stderr + out.stdout


@pytest.mark.django_db
def test_check_fails_when_stored_credentials_do_not_decrypt(settings, capsys):  # noqa: ANN001
    account = AccountFactory(api_key="key-123456", api_secret=SECRET)
    AccountFactory()  # no credentials: nothing to decrypt, not counted
    TelegramProfile.objects.create(user=UserFactory(), bot_token="123456:telegram-bot-token-abcdef")
    call_command("runscheduler", "--check")  # the key that encrypted them: OK
    assert "OK" in capsys.readouterr().out

    settings.FIELD_ENCRYPTION_KEY = Fernet.generate_key().decode()  # valid, but not the one used
    with pytest.raises(CommandError):
        call_command("runscheduler", "--check")
    err = capsys.readouterr().err
    assert (
        "accounts.Account.api_secret: 1 of 1 stored value(s) cannot be decrypted with FIELD_ENCRYPTION_KEY "
        f"(ids {account.pk})" in err
    )
    assert "accounts.Account.api_key" in err
    assert "notifications.TelegramProfile.bot_token" in err
    assert SECRET not in err and "key-123456" not in err
