"""Settings for tradingsite, read from the environment (SPEC §7)."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import environ
from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(environ.Env().str("TRADINGSITE_VAR_DIR", default=str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)

env = environ.Env()

DEBUG = env.bool("DJANGO_DEBUG", default=True)


def _development_secret(name: str, make: Callable[[], str]) -> str:
    """A development default generated once into var/ and reused; production refuses it."""
    value = env.str(name, default="")
    if value:
        return value
    if not DEBUG:
        raise ImproperlyConfigured(f"{name} must be set when DJANGO_DEBUG is false")
    path = VAR_DIR / name.lower()
    if not path.exists():
        path.write_text(make())
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _development_secret("DJANGO_SECRET_KEY", lambda: secrets.token_urlsafe(50))
FIELD_ENCRYPTION_KEY = _development_secret("FIELD_ENCRYPTION_KEY", lambda: Fernet.generate_key().decode())
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "axes",
    "channels",
    "django_apscheduler",
    # Domain apps in layer order, bottom to top (README "Where things are"): a lower layer never
    # imports a higher one (tests/test_layers.py).
    "core",
    "notifications",
    "scheduler",
    "exchanges",
    "accounts",
    "positions",
    "orders",
    "reporting",
]

MIDDLEWARE = [
    # First: a too-large body is refused (413) before anything reads it or checks a token.
    "core.middleware.BodySizeLimitMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Static files in every mode (daphne serves no /static/ itself): from STATIC_ROOT after
    # collectstatic, and straight from the apps' static/ dirs when WHITENOISE_USE_FINDERS is on.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes requires: turns a locked-out admin login into a 429 page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "tradingsite.urls"
WSGI_APPLICATION = "tradingsite.wsgi.application"
ASGI_APPLICATION = "tradingsite.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------
# The raw URLs stay module-private (lower case): Django's debug page lists every upper-case
# setting, and a URL carries its password. DATABASES hides PASSWORD by key name; URL-shaped
# values anywhere else are scrubbed by core.debug.SafeExceptionReporterFilter.
_database_url = env.str("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}")
DATABASES = {"default": env.db_url_config(_database_url)}
_db = DATABASES["default"]
if _db["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets readers run beside the one writer; IMMEDIATE takes the write lock
    # at BEGIN so a transaction never fails half-way with "database is locked";
    # the 30 s busy timeout absorbs the short write transactions of other processes.
    _db["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=30000;",
    }
    _db["CONN_MAX_AGE"] = 0
    # A file (not in-memory) test database, one per test process: scheduler threads and
    # subprocess-style tests need real WAL locking, and concurrent test runs must not collide.
    _db["TEST"] = {"NAME": str(VAR_DIR / f"test_{os.getpid()}.sqlite3")}
else:
    if _db["ENGINE"] == "django.db.backends.postgresql":
        # Django's backend plus a connection pool shared by the execution engine's worker threads
        # (core.pgpool): they hold a connection only while they use it, never over an exchange call.
        _db["ENGINE"] = "core.pgpool"
    _db["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
    _db["CONN_HEALTH_CHECKS"] = True
    _db.setdefault("OPTIONS", {}).update(
        {
            "connect_timeout": 3,
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 2,
        }
    )
    _db.setdefault("TEST", {})
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_redis_url = env.str("REDIS_URL", default="")
USE_REDIS = bool(_redis_url)
# Throttle counters must be shared by every web process (daphne workers, gunicorn workers), or
# each process would grant the full rate on its own. With Redis they live there; without it in
# the database cache table (created by a core migration), which every process on the host (and
# on PostgreSQL every host) shares, survives restarts and needs no extra service. The file cache
# was the alternative: it culls entries at random when full and is per host only.
_throttle_db_cache = {
    "BACKEND": "django.core.cache.backends.db.DatabaseCache",
    "LOCATION": "core_throttle_cache",
    "KEY_PREFIX": "throttle",
    "OPTIONS": {"MAX_ENTRIES": 100_000},
}
if USE_REDIS:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": _redis_url},
        "throttle": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": _redis_url,
            "KEY_PREFIX": "throttle",
        },
    }
    CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [_redis_url]}}
    }
else:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "throttle": _throttle_db_cache,
    }
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
# The debug page and error reports never show a credential (core.debug scrubs URL passwords).
DEFAULT_EXCEPTION_REPORTER_FILTER = "core.debug.SafeExceptionReporterFilter"

# Admin login lockout (django-axes): failures are rows in axes_accessattempt, so a lockout holds
# in every process and across restarts. The first backend only enforces the lockout.
AUTHENTICATION_BACKENDS = [
    "core.auth.AxesLockoutBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_ENABLED = env.bool("AXES_ENABLED", default=True)
AXES_HANDLER = "axes.handlers.database.AxesDatabaseHandler"
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = env.float("AXES_COOLOFF_MINUTES", default=15.0) / 60  # hours, as axes counts it
# Comma-separated; "username+ip_address" locks that pair only. The default locks the source IP,
# so a guesser elsewhere cannot lock the real operator out.
AXES_LOCKOUT_PARAMETERS = [
    part.split("+") if "+" in part else part for part in env.list("AXES_LOCKOUT_PARAMETERS", default=["ip_address"])
]
AXES_RESET_ON_SUCCESS = True
AXES_HTTP_RESPONSE_CODE = 429
AXES_LOCKOUT_CALLABLE = "core.auth.lockout_response"  # adds Retry-After
AXES_VERBOSE = False

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
USE_I18N = True
USE_TZ = True
# One display time zone for people: admin, dashboards, API datetimes (ISO 8601 with offset) and log
# lines (Django sets the process's TZ from TIME_ZONE). Storage stays UTC; the scheduler's "day" keeps
# SCHEDULER_TIMEZONE (defined below; the default display zone is the same).
DISPLAY_TIMEZONE = env.str("DISPLAY_TIMEZONE", default="") or env.str("SCHEDULER_TIMEZONE", default="Asia/Seoul")
TIME_ZONE = DISPLAY_TIMEZONE

STATIC_URL = "static/"
STATIC_ROOT = env.str("STATIC_ROOT", default=str(VAR_DIR / "static"))
# Without collectstatic (development, tests) WhiteNoise finds files in the apps' static/ dirs itself.
WHITENOISE_USE_FINDERS = env.bool("WHITENOISE_USE_FINDERS", default=DEBUG)
WHITENOISE_AUTOREFRESH = DEBUG
# Every user signs in here (the admin login admits staff only); the dashboards send others to it.
LOGIN_URL = "/login/"


def _rate(name: str, default: str) -> str | None:
    """A DRF rate such as "120/min"; empty or "off" turns that throttle off."""
    value = env.str(name, default=default).strip()
    return None if value.lower() in ("", "off", "none") else value


REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "core.tokens.HashedTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # DRF's defaults with the JSON parser replaced by one that bounds nesting (a deep document is a 400).
    "DEFAULT_PARSER_CLASSES": [
        "core.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    # Proxies in front of the site that append to X-Forwarded-For; 0 = the client's own address
    # (REMOTE_ADDR), so a client cannot pick its throttle identity with a forged header.
    "NUM_PROXIES": env.int("API_NUM_PROXIES", default=0),
    "DEFAULT_THROTTLE_RATES": {
        "orders": _rate("THROTTLE_ORDERS_RATE", "120/min"),
        "webhook_strategy": _rate("THROTTLE_WEBHOOK_STRATEGY_RATE", "60/min"),
        "webhook_ip": _rate("THROTTLE_WEBHOOK_IP_RATE", "300/min"),
        "webhook_bad_token": _rate("THROTTLE_WEBHOOK_BAD_TOKEN_RATE", "30/min"),
    },
}
# Request body caps (bytes), checked by core.middleware before the body is parsed; the longest
# matching path prefix wins. Above the cap: 413 with a JSON body.
WEBHOOK_MAX_BODY_BYTES = env.int("WEBHOOK_MAX_BODY_BYTES", default=64 * 1024)
API_MAX_BODY_BYTES = env.int("API_MAX_BODY_BYTES", default=256 * 1024)
BODY_LIMITS = {"/api/webhook/": WEBHOOK_MAX_BODY_BYTES, "/api/": API_MAX_BODY_BYTES}
# Who may read /api/schema/ and /api/docs/: staff, authenticated (any user with a token or session) or public.
API_DOCS_ACCESS = env.str("API_DOCS_ACCESS", default="authenticated").strip().lower()
if API_DOCS_ACCESS not in ("staff", "authenticated", "public"):
    raise ImproperlyConfigured(f"API_DOCS_ACCESS must be staff, authenticated or public, not {API_DOCS_ACCESS!r}")
SPECTACULAR_SETTINGS = {
    "TITLE": "tradingsite API",
    "VERSION": "0.1.0",
    "SERVE_PERMISSIONS": ["core.api.ApiDocsPermission"],
    "SERVE_AUTHENTICATION": [
        "core.tokens.HashedTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DESCRIPTION": (
        "Token authentication: send `Authorization: Token <key>`. A key is issued by "
        "`python manage.py issue_api_token USERNAME`, by the admin action *Issue API token* on Users, "
        "or by adding an API token in admin; it is shown once and stored hashed."
    ),
    # Swagger UI and Redoc from drf-spectacular-sidecar's bundled files (served as static files): no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {"OrderEventKindEnum": "orders.models.OrderEventKind"},
}

# --- Scheduler (SPEC §2) ----------------------------------------------------
SCHEDULER_TIMEZONE = env.str("SCHEDULER_TIMEZONE", default="Asia/Seoul")
SCHEDULER_HISTORY_DAYS = env.int("SCHEDULER_HISTORY_DAYS", default=7)
SCHEDULER_PROBE_JOB = env.bool("SCHEDULER_PROBE_JOB", default=False)
SCHEDULER_STANDBY_POLL = env.float("SCHEDULER_STANDBY_POLL", default=1.0)
SCHEDULER_SHUTDOWN_GRACE = env.float("SCHEDULER_SHUTDOWN_GRACE", default=30.0)
SCHEDULER_THREADS = env.int("SCHEDULER_THREADS", default=20)
SCHEDULER_LOCK_FILE = env.str("SCHEDULER_LOCK_FILE", default="")
# Account shards (PostgreSQL only; SQLite keeps one process owning everything): how many, whether
# on ("auto": on with PostgreSQL; "off"), how often owners poll, and how old a shard lock's last
# successful probe may be before its owner stops touching the shard's accounts.
ACCOUNT_SHARDS = env.int("ACCOUNT_SHARDS", default=16)
SCHEDULER_SHARDING = env.str("SCHEDULER_SHARDING", default="auto")
SHARD_POLL = env.float("SHARD_POLL", default=0.5)
SHARD_PROBE_MAX_AGE = env.float("SHARD_PROBE_MAX_AGE", default=2.0)
SHARD_DRAIN_MAX = env.float("SHARD_DRAIN_MAX", default=30.0)
# Test and drill knob: seconds the probe job sleeps, so a run can be caught in flight.
SCHEDULER_PROBE_SLEEP = env.float("SCHEDULER_PROBE_SLEEP", default=0.0)
try:
    SCHEDULER_JOB_OVERRIDES = json.loads(env.str("SCHEDULER_JOB_OVERRIDES", default="{}") or "{}")
except json.JSONDecodeError as exc:
    # Kept as text: `runscheduler --check` reports it with the variable's name.
    SCHEDULER_JOB_OVERRIDES = f"invalid JSON: {exc}"

METRICS_TOKEN = env.str("METRICS_TOKEN", default="")

# --- Telegram (SPEC §4.9) ---------------------------------------------------------
# The global bot and chat; a user's TelegramProfile overrides them for that user's messages.
# Neither set: nothing is enqueued. The token is registered for scrubbing in NotificationsConfig.ready().
TELEGRAM_BOT_TOKEN = env.str("TELEGRAM_BOT_TOKEN", default="")
TELEGRAM_CHAT_ID = env.str("TELEGRAM_CHAT_ID", default="")
TELEGRAM_API_URL = env.str("TELEGRAM_API_URL", default="https://api.telegram.org")
# KIS (SPEC §4.7): empty picks the real or virtual host per account; tests aim it at a local server.
KIS_BASE_URL = env.str("KIS_BASE_URL", default="")

# --- Orders (SPEC §4.1) ----------------------------------------------------------
# Live slots per bucket: a number, or JSON {"default": 2, "BINANCE:FUTURES": 5}.
_slots = env.str("ORDER_QUEUE_SLOTS", default="2")
try:
    ORDER_QUEUE_SLOTS = json.loads(_slots) if _slots.strip().startswith("{") else {"default": int(_slots)}
except (ValueError, json.JSONDecodeError) as exc:
    raise ImproperlyConfigured(f"ORDER_QUEUE_SLOTS: expected a number or a JSON object, got {_slots!r}") from exc
# Test-only: crash points armed in this process, e.g. "promote.after_exchange_ack:kill".
ORDER_CRASH_POINTS = env.str("ORDER_CRASH_POINTS", default="")

# --- Exchanges (SPEC §4.4, §5) -------------------------------------------------------
PRICE_MAX_AGE_TRADE = env.int("PRICE_MAX_AGE_TRADE", default=120)  # seconds; sizing and validation
PRICE_MAX_AGE_VALUE = env.int("PRICE_MAX_AGE_VALUE", default=3600)  # seconds; PnL valuation
try:
    # {"BINANCE": "http://127.0.0.1:8900"}: aim a real exchange id at another base URL.
    EXCHANGE_URL_OVERRIDES = json.loads(env.str("EXCHANGE_URL_OVERRIDES", default="{}") or "{}")
except json.JSONDecodeError as exc:
    raise ImproperlyConfigured(f"EXCHANGE_URL_OVERRIDES is not valid JSON: {exc}") from None
SIMULATOR_SEED = env.int("SIMULATOR_SEED", default=0)
# Extra generated symbols (SYN0001/USDT, …) listed by both simulated market types: benchmarks at scale.
SIMULATOR_SYNTHETIC_SYMBOLS = env.int("SIMULATOR_SYNTHETIC_SYMBOLS", default=0)
# ccxt: per-request timeout, and retries (with exponential backoff from EXCHANGE_RETRY_BACKOFF seconds)
# for reads that failed with a network error or a rate limit; create_order is never retried.
# User-data streams: timings by name (ping_interval, listen_key_keepalive, backoff_base, backoff_max, ...).
try:
    USER_STREAMS = json.loads(env.str("USER_STREAMS", default="{}") or "{}")
except json.JSONDecodeError as exc:
    raise ImproperlyConfigured(f"USER_STREAMS is not valid JSON: {exc}") from None
# The currency account capital is counted and allocated in (SPEC §4.11).
CAPITAL_QUOTE_CURRENCY = env.str("CAPITAL_QUOTE_CURRENCY", default="USDT")
EXCHANGE_HTTP_TIMEOUT_MS = env.int("EXCHANGE_HTTP_TIMEOUT_MS", default=10_000)
EXCHANGE_RETRIES = env.int("EXCHANGE_RETRIES", default=2)
EXCHANGE_RETRY_BACKOFF = env.float("EXCHANGE_RETRY_BACKOFF", default=0.5)
# The 1 s order queue's own per-request timeout (its calls are not retried; outcomes are looked up).
# The execution engine (orders.execution): worker threads for the queue's exchange calls (one pair
# at a time per key, pairs in parallel) and for reconciliation per account market; 0 runs inline.
# On PostgreSQL their threads share EXECUTION_DB_CONNECTIONS connections (core.pgpool), taken for
# each stretch of database work and given back before every exchange call, so the threads can be
# many (most of them wait on exchanges) while the connections stay few.
EXECUTION_WORKERS = env.int("EXECUTION_WORKERS", default=48)
RECONCILE_WORKERS = env.int("RECONCILE_WORKERS", default=32)
EXECUTION_DB_CONNECTIONS = env.int("EXECUTION_DB_CONNECTIONS", default=12)
for _name, _value in (("EXECUTION_WORKERS", EXECUTION_WORKERS), ("RECONCILE_WORKERS", RECONCILE_WORKERS)):
    if not 0 <= _value <= 256:
        raise ImproperlyConfigured(f"{_name} must be between 0 and 256 worker threads, not {_value}")
if not 1 <= EXECUTION_DB_CONNECTIONS <= 256:
    raise ImproperlyConfigured(
        f"EXECUTION_DB_CONNECTIONS must be between 1 and 256 connections, not {EXECUTION_DB_CONNECTIONS}"
    )
EXCHANGE_QUEUE_TIMEOUT_MS = env.int("EXCHANGE_QUEUE_TIMEOUT_MS", default=1000)
# Request budgets per exchange market (IP weight) and per account (orders), exchanges.ratelimit;
# JSON replacing the defaults per "EXCHANGE:MARKET" key ([] turns them off there).
EXCHANGE_RATE_LIMITS = env.str("EXCHANGE_RATE_LIMITS", default="")
EXCHANGE_RATE_WAIT_MAX = env.float("EXCHANGE_RATE_WAIT_MAX", default=2.0)
# Calls to one exchange running at once from this process (exchanges.ratelimit.InFlightLimits): a
# number for every exchange or JSON {"default": 32, "BINANCE": 48}; 0 is no cap. A call waits for a
# slot as long as for its budget (EXCHANGE_RATE_WAIT_MAX), then fails as RateLimited unsent.
EXCHANGE_MAX_IN_FLIGHT = env.str("EXCHANGE_MAX_IN_FLIGHT", default="32")
# The local address this process's REST calls to exchanges leave from ("" = the system's choice): a
# host with several egress IPs runs one scheduler per IP, and each IP has its own weight budget.
EXCHANGE_SOURCE_ADDRESS = env.str("EXCHANGE_SOURCE_ADDRESS", default="")
if EXCHANGE_SOURCE_ADDRESS:
    try:
        ipaddress.ip_address(EXCHANGE_SOURCE_ADDRESS)
    except ValueError:
        raise ImproperlyConfigured(
            f"EXCHANGE_SOURCE_ADDRESS must be an IP address of this host, not {EXCHANGE_SOURCE_ADDRESS!r}"
        ) from None

if EXCHANGE_QUEUE_TIMEOUT_MS <= 0:
    raise ImproperlyConfigured(f"EXCHANGE_QUEUE_TIMEOUT_MS must be positive (ms), not {EXCHANGE_QUEUE_TIMEOUT_MS}")

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"scrub": {"()": "core.scrub.ScrubFilter"}},
    "formatters": {
        # Local time of DISPLAY_TIMEZONE with its offset (e.g. 2026-12-04T23:41:07.123+0900).
        "plain": {
            "format": "%(asctime)s.%(msecs)03d%(tz)s %(levelname)s %(process)d %(threadName)s %(name)s: %(message)s",
            "datefmt": "%Y-%m-%dT%H:%M:%S",
            "()": "tradingsite.logformat.OffsetFormatter",
        },
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["scrub"]},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "apscheduler": {"level": "WARNING"},
        "django.db.backends": {"level": "WARNING"},
    },
}


def _check_rate_limits() -> None:
    from exchanges.ratelimit import limits_parse, max_in_flight_parse

    try:
        limits_parse(EXCHANGE_RATE_LIMITS)
        max_in_flight_parse(EXCHANGE_MAX_IN_FLIGHT)
    except ValueError as exc:
        raise ImproperlyConfigured(str(exc)) from None


_check_rate_limits()
