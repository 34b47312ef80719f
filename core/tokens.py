"""Hashed DRF API tokens: issue (key shown once), digest, and the TokenAuthentication that checks them."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from django.contrib.auth.models import User
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication

from core.models import ApiToken


def api_token_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def api_token_key_set(token: ApiToken) -> str:
    """Give an unsaved `token` a fresh key (its prefix and digest) and return the key, which is not stored."""
    key = secrets.token_hex(20)
    token.prefix, token.digest = key[:8], api_token_digest(key)
    return key


def api_token_issue(*, user: User, name: str = "") -> tuple[ApiToken, str]:
    """Create a token for `user`; returns (row, key). Only the digest is stored: the caller shows the
    key once, and nobody can read it back later."""
    token = ApiToken(user=user, name=name)
    key = api_token_key_set(token)
    token.save()
    return token, key


class HashedTokenAuthentication(TokenAuthentication):
    """`Authorization: Token <key>` checked against ApiToken digests.

    Same header, 401 and WWW-Authenticate as DRF's TokenAuthentication (it subclasses it, so
    drf-spectacular documents it as the same scheme), but the database holds no usable key.
    """

    model = ApiToken

    def authenticate_credentials(self, key: str) -> tuple[Any, ApiToken]:
        token = ApiToken.objects.select_related("user").filter(digest=api_token_digest(key)).first()
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid token.")
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        return token.user, token
