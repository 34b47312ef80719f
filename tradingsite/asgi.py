"""ASGI entry point: HTTP and websockets."""

import os

from channels.routing import ProtocolTypeRouter, URLRouter
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tradingsite.settings")
django_asgi_app = get_asgi_application()

# Imported after get_asgi_application(): they load models, which needs the app registry ready.
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from core.middleware import asgi_body_limit  # noqa: E402
from scheduler.routing import websocket_urlpatterns as scheduler_websockets  # noqa: E402

application = ProtocolTypeRouter(
    {
        # Bodies are counted as they arrive and cut off at their cap (core.middleware).
        "http": asgi_body_limit(django_asgi_app),
        # Origin checked against ALLOWED_HOSTS (a session cookie alone must not open the feed from
        # another site); then the session's user in scope["user"].
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(scheduler_websockets))),
    }
)
