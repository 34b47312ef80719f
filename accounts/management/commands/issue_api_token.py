"""issue_api_token: issue an API token for a user and print its key (once; it is stored hashed)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.services import api_token_new


class Command(BaseCommand):
    help = (
        "Issue an API token for USERNAME and print its key, for `Authorization: Token <key>`. The key is shown "
        "only now (the database keeps its digest). --rotate first revokes the user's other tokens."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="issue_api_token", help="what the token is for (shown in admin)")
        parser.add_argument("--rotate", action="store_true", help="revoke the user's other tokens first")

    def handle(self, *args: Any, **options: Any) -> None:
        user = get_user_model().objects.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"no user {options['username']!r}")
        if not user.is_active:
            raise CommandError(f"user {options['username']!r} is inactive")
        key = api_token_new(user=user, name=options["name"], rotate=options["rotate"])
        self.stderr.write(
            f"new API token of {user.get_username()!r}, shown once; send it as `Authorization: Token <key>`:"
        )
        # The key alone on stdout, so scripts can capture it: TOKEN=$(manage.py issue_api_token demo)
        self.stdout.write(key)
