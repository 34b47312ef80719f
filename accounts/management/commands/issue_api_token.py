"""issue_api_token: print a user's API token (created when missing; --rotate replaces it)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.services import api_token_issue


class Command(BaseCommand):
    help = (
        "Print USERNAME's API token for `Authorization: Token <key>`, creating it when missing. "
        "--rotate replaces an existing token (the old one stops working)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--rotate", action="store_true", help="replace the existing token with a new one")

    def handle(self, *args: Any, **options: Any) -> None:
        user = get_user_model().objects.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"no user {options['username']!r}")
        if not user.is_active:
            raise CommandError(f"user {options['username']!r} is inactive")
        key, created = api_token_issue(user=user, rotate=options["rotate"])
        state = "new token" if created else "existing token"
        self.stderr.write(f"{state} of {user.get_username()!r}; send it as `Authorization: Token <key>`:")
        # The key alone on stdout, so scripts can capture it: TOKEN=$(manage.py issue_api_token demo)
        self.stdout.write(key)
