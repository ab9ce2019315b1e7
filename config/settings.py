"""Settings of the WMS: every value comes from an environment variable (see .env.example).

With nothing set the project runs on the embedded default: a SQLite file and kombu's filesystem
transport under var/. Setting DATABASE_URL and CELERY_BROKER_URL moves it to Postgres and
RabbitMQ; no code outside config/ knows which one it runs on.
"""

import os
import secrets
from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if env.str("WMS_ENV_FILE", default=""):
    environ.Env.read_env(env.str("WMS_ENV_FILE"))

VAR_DIR = Path(env.str("WMS_VAR_DIR", default=str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)

# --- Safe defaults (docs/security.md) ------------------------------------------------------------
# With no DJANGO_* variable the settings are production's: DEBUG off, a secret of this
# installation, localhost names only. Development mode is switched on explicitly
# (DJANGO_DEBUG=true; `manage.py up` does it for the processes it starts).
DEBUG = env.bool("DJANGO_DEBUG", default=False)


def _secret_key_of_this_installation(path: Path) -> str:
    """A random key made once into ``path`` (mode 0600) and read from it afterwards, so that
    every process sharing WMS_VAR_DIR (web, worker, ``manage.py``) signs with the same key.
    The file appears whole or not at all (written aside, then hard-linked into place), so
    processes starting together agree on one key."""
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(64))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            tmp.unlink()
    key = path.read_text().strip()
    if len(key) < 50:
        raise ImproperlyConfigured(f"{path} holds no usable secret key: remove it")
    return key


SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="") or _secret_key_of_this_installation(
    VAR_DIR / "secret_key"
)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "django_structlog",
    "axes",
    "wms",
    "files",
    "tasks",
    "jobs",
    "pilots",
    "devtools",
]

MIDDLEWARE = [
    # First: requests under /api/ with a body over WMS_API_MAX_BODY or a NUL in the path or
    # query are refused before anything reads them (wms.middleware).
    "wms.middleware.ApiRequestGuard",
    # Then: a pilot's call of the pilot protocol (Authorization: Pilot <token>, one of
    # WMS_LEAN_PATHS) takes the short chain WMS_LEAN_MIDDLEWARE instead of what follows
    # (sessions, CSRF, users, messages, static files, the lockout and the request log lines
    # serve browsers and users, not pilots): wms.middleware.TokenRequestPath.
    "wms.middleware.TokenRequestPath",
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's and the API docs' static files from STATIC_ROOT under gunicorn
    # (after `manage.py collectstatic`); runserver serves them itself in DEBUG.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_structlog.middlewares.RequestMiddleware",
    # Last (django-axes): answers a locked-out login attempt (see "Accounts" below).
    "axes.middleware.AxesMiddleware",
]

WMS_LEAN_AUTH_SCHEMES = ["Pilot"]
WMS_LEAN_PATHS = [
    r"/api/v1/pilots/[0-9]+/[a-z_-]+/\Z",  # heartbeat, terminate, events, starts
    r"/api/v1/jobs/[0-9a-fA-F-]{32,36}/(?:start|report)/\Z",
]
WMS_LEAN_MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",  # HTTPS redirect, security headers
    "django.middleware.common.CommonMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

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

# --- Database -----------------------------------------------------------------------------------
DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'wms.sqlite3'}"),
}
DATABASES["default"].setdefault("ATOMIC_REQUESTS", False)
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several processes (web, worker, pilots' API calls) share one file: wait for the lock
    # instead of failing, and let readers go on while one process writes.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
else:
    # Persistent connections (per process/thread), checked before reuse: a connection the
    # database dropped (a restart) is replaced at the next request, not handed out dead.
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # Seconds a new connection may take (libpq's connect_timeout, unless DATABASE_URL sets
    # it): a database that accepts and never answers is an outage (503 with Retry-After),
    # not a request that hangs until the web server kills its worker. 0: wait forever.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault(
        "connect_timeout", env.int("DATABASE_CONNECT_TIMEOUT", default=5)
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env.str("DJANGO_STATIC_ROOT", default=str(VAR_DIR / "static")))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # whitenoise looks there before collectstatic

# --- REST API -----------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "wms.auth.ApiTokenAuthentication",  # Authorization: Token <key>, stored hashed
        # A pilot's token (docs/pilot-api.md) is recognised everywhere, so that a user
        # endpoint answers a pilot 403 ("not for pilots") rather than 401.
        "pilots.auth.PilotTokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_PAGINATION_CLASS": "wms.api.PageNumberPagination",
    "PAGE_SIZE": env.int("WMS_API_PAGE_SIZE", default=100),
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "wms.api.exception_handler",
    # JSON and form bodies with the checks of wms.parsers (depth, NUL, non-finite numbers).
    "DEFAULT_PARSER_CLASSES": [
        "wms.parsers.JSONParser",
        "wms.parsers.FormParser",
        "wms.parsers.MultiPartParser",
    ],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
}

# --- Hostile input and outages (wms.middleware, wms.parsers, wms.api) ---
# The largest request body under /api/, in bytes: larger ones answer 413 before they are
# read. 16 MiB holds the largest legitimate request, 10,000 files registered in a dataset at
# once with the longest names and URLs (~14 MB); a pilot's final report is under 1 MB.
WMS_API_MAX_BODY = env.int("WMS_API_MAX_BODY", default=16 * 1024 * 1024)
# DRF reads JSON and form bodies through request.body, which Django bounds by this: the same.
DATA_UPLOAD_MAX_MEMORY_SIZE = WMS_API_MAX_BODY
# JSON bodies nested deeper than this answer 400.
WMS_API_MAX_JSON_DEPTH = env.int("WMS_API_MAX_JSON_DEPTH", default=32)
# Seconds in the Retry-After header of a 503 (database or broker unavailable).
WMS_API_RETRY_AFTER = env.int("WMS_API_RETRY_AFTER", default=10)
# /healthz checks the broker at most once per this many seconds (per web process thread).
WMS_HEALTHZ_BROKER_TTL = env.float("WMS_HEALTHZ_BROKER_TTL", default=5.0)
# Form bodies (the browsable API, the admin): at most this many fields (400 beyond).
DATA_UPLOAD_MAX_NUMBER_FIELDS = env.int("WMS_MAX_FORM_FIELDS", default=1000)
# Under /api/, CSRF failures answer the API's error body; elsewhere Django's page.
CSRF_FAILURE_VIEW = "wms.api.csrf_failure"

SPECTACULAR_SETTINGS = {
    "TITLE": "WMS API",
    "DESCRIPTION": "Workload Management System: tasks, jobs, files, datasets and pilots.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "DeviceTypeEnum": "wms.choices.DeviceType",
        "JobModeEnum": "wms.choices.Mode",
        "TaskStateEnum": "tasks.models.TaskState",
        "JobStateEnum": "jobs.models.JobState",
        "AttemptStateEnum": "jobs.models.AttemptState",
        "PilotStateEnum": "pilots.models.PilotState",
        "DatasetStateEnum": "files.models.DatasetState",
        "DatasetRoleEnum": "files.models.DatasetRole",
        "FileTypeEnum": "files.models.FileType",
        "FileStatusEnum": "files.models.FileStatus",
        "PilotReportedStateEnum": ["idle", "busy", "draining"],
        "StatusEventStateEnum": ["running", "finished", "failed"],
        "ReportedFileTypeEnum": ["output", "log"],
        "EventOutcomeEnum": ["applied", "duplicate", "ignored"],
        "StatusEventKindEnum": ["event"],
        "PilotCommandEnum": "pilots.models.CommandKind",
    },
    # The answers every operation can give (413, 429, 503, ...) and the list parameters'
    # bounds, added once to every operation (wms/schema.py).
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "wms.schema.add_generic_answers",
    ],
}

# --- Celery -------------------------------------------------------------------------------------
BROKER_DIR = VAR_DIR / "broker"
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    for sub in ("out", "processed", "control"):
        (BROKER_DIR / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "out"),
        "data_folder_out": str(BROKER_DIR / "out"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
    }
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True}
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TIMEZONE = "UTC"
CELERY_ENABLE_UTC = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# The broker away (a restart, an outage): the worker and beat reconnect by themselves, at
# start-up too, and never give up (Celery's default gives up after 100 attempts, about an hour
# of outage, and the worker then exits). 0 or unset: forever.
CELERY_BROKER_CONNECTION_RETRY = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = (
    env.int("WMS_BROKER_CONNECTION_MAX_RETRIES", default=0) or None
)
CELERY_TASK_DEFAULT_QUEUE = env.str("WMS_CONTROL_QUEUE", default="wms.control")
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_BEAT_SCHEDULE: dict = {}

# --- WMS ----------------------------------------------------------------------------------------
WMS_HEARTBEAT_INTERVAL = env.int("WMS_HEARTBEAT_INTERVAL", default=30)
WMS_PILOT_LOST_AFTER = env.int("WMS_PILOT_LOST_AFTER", default=300)
WMS_QUEUED_REPUBLISH_AFTER = env.int("WMS_QUEUED_REPUBLISH_AFTER", default=600)
WMS_DEFAULT_RETRIES = env.int("WMS_DEFAULT_RETRIES", default=3)

# --- Logging ------------------------------------------------------------------------------------
WMS_LOG_FORMAT = env.str("WMS_LOG_FORMAT", default="console")
WMS_LOG_LEVEL = env.str("WMS_LOG_LEVEL", default="INFO")
DJANGO_STRUCTLOG_CELERY_ENABLED = True

from wms.logging import configure_logging  # noqa: E402

LOGGING = configure_logging(fmt=WMS_LOG_FORMAT, level=WMS_LOG_LEVEL)

# --- Bus (RabbitMQ topology, DESIGN.md section 5) ---
WMS_BUS_PREFIX = env.str("WMS_BUS_PREFIX", default="wms")
from wms.topology import QUEUE_TYPES, Topology  # noqa: E402

# classic (one node; priorities from rank) | quorum (every queue replicated over a RabbitMQ
# cluster, docs/deployment.md): the job, events and command queues and Celery's task queue.
WMS_QUEUE_TYPE = env.str("WMS_QUEUE_TYPE", default="classic")
if WMS_QUEUE_TYPE not in QUEUE_TYPES:
    raise ImproperlyConfigured(f"WMS_QUEUE_TYPE: one of {QUEUE_TYPES}, not {WMS_QUEUE_TYPE!r}")
# Celery's task queue (WMS_CONTROL_QUEUE) is of that type too; so would be any queue Celery
# made for a name it does not know. With quorum queues Celery's workers use per-consumer
# prefetch (quorum queues have no global QoS) and its pidbox (remote control) queues stay
# classic, exclusive and transient: docs/deployment.md says why that is safe.
CELERY_TASK_QUEUES = [
    Topology(WMS_BUS_PREFIX, WMS_QUEUE_TYPE).control_queue(CELERY_TASK_DEFAULT_QUEUE)
]
CELERY_TASK_DEFAULT_QUEUE_TYPE = WMS_QUEUE_TYPE
CELERY_TASK_CREATE_MISSING_QUEUE_TYPE = WMS_QUEUE_TYPE
CELERY_WORKER_DETECT_QUORUM_QUEUES = True
# without Celery's native delayed delivery (no WMS task has a countdown or an ETA)
CELERY_WORKER_CONSUMER = "config.celery:Consumer"
WMS_PUBLISH_CONFIRM_TIMEOUT = env.float("WMS_PUBLISH_CONFIRM_TIMEOUT", default=30.0)
# Seconds one attempt to connect to the broker may take (wms.bus: the publisher, the events
# consumer); the publisher's retries stop after that long too. A broker that accepts and
# never answers costs an API call that publishes (a cancel) seconds, not a hang.
WMS_BROKER_CONNECT_TIMEOUT = env.float("WMS_BROKER_CONNECT_TIMEOUT", default=5.0)
WMS_SERVER_URL = env.str("WMS_SERVER_URL", default="http://127.0.0.1:8000")

# --- DSM ---
# The Data Storage Manager backend (docs/dsm.md): "local" keeps the catalogue in the WMS's own
# tables; "http" talks to an external DSM at WMS_DSM_URL with the bearer token WMS_DSM_TOKEN.
WMS_DSM_BACKEND = env.str("WMS_DSM_BACKEND", default="local")
WMS_DSM_URL = env.str("WMS_DSM_URL", default="")
WMS_DSM_TOKEN = env.str("WMS_DSM_TOKEN", default="")
# Seconds: "connect,read" (or one value for both).
WMS_DSM_TIMEOUT = tuple(env.list("WMS_DSM_TIMEOUT", cast=float, default=[3.05, 30.0]))
WMS_DSM_RETRIES = env.int("WMS_DSM_RETRIES", default=3)  # retries after the first attempt
WMS_DSM_BACKOFF = env.float("WMS_DSM_BACKOFF", default=0.5)  # first retry delay, then doubles

# --- Splitter and executor (DESIGN.md sections 5, 6, 8) ---
WMS_SPLIT_PAGE = env.int("WMS_SPLIT_PAGE", default=10_000)  # files read from the DSM per page
WMS_SPLIT_BATCH = env.int("WMS_SPLIT_BATCH", default=5_000)  # rows per INSERT
WMS_SPLIT_MAX_JOBS_PER_RUN = env.int("WMS_SPLIT_MAX_JOBS_PER_RUN", default=200_000)
WMS_TASK_MAX_INPUTS = env.int("WMS_TASK_MAX_INPUTS", default=1_000)  # input datasets per task
WMS_DISPATCH_BATCH = env.int("WMS_DISPATCH_BATCH", default=5_000)  # jobs claimed per batch
WMS_DISPATCH_MAX_PER_RUN = env.int("WMS_DISPATCH_MAX_PER_RUN", default=50_000)
WMS_QUEUE_MAX_DEPTH = env.int("WMS_QUEUE_MAX_DEPTH", default=10_000)  # backpressure, 0 = none
WMS_SPLIT_EVERY = env.float("WMS_SPLIT_EVERY", default=5.0)  # beat periods, seconds
WMS_DISPATCH_EVERY = env.float("WMS_DISPATCH_EVERY", default=2.0)
WMS_RECONCILE_EVERY = env.float("WMS_RECONCILE_EVERY", default=60.0)
# The finalizer: ends tasks whose work is done and closes their output datasets (lifecycle.md)
WMS_FINALIZE_EVERY = env.float("WMS_FINALIZE_EVERY", default=10.0)
WMS_KICKS_ENABLED = env.bool("WMS_KICKS_ENABLED", default=True)  # on-commit kicks of beat work
WMS_BULK_COPY = env.bool("WMS_BULK_COPY", default=True)  # PostgreSQL COPY for bulk inserts

# --- Where data may live (docs/dsm.md, "Storage roots") ---
# Every task's outputs go inside the output root, in its owner's folder <root>/<username>/,
# in a place of its own (by default <root>/<username>/task-<id>).
WMS_OUTPUT_ROOT = env.str("WMS_OUTPUT_ROOT", default="") or (VAR_DIR / "outputs").as_uri()
# The URL prefixes input files may live under (comma-separated). The default holds the demo's
# inputs (<WMS_VAR_DIR>/demo); a site names its storage.
WMS_STORAGE_ROOTS = env.list("WMS_STORAGE_ROOTS", default=[(VAR_DIR / "demo").resolve().as_uri()])

from wms.locations import LocationError, canonical_roots  # noqa: E402

try:
    canonical_roots([WMS_OUTPUT_ROOT, *WMS_STORAGE_ROOTS])
except LocationError as _exc:
    raise ImproperlyConfigured(f"WMS_OUTPUT_ROOT / WMS_STORAGE_ROOTS: {_exc}") from _exc

# --- Pilots (docs/pilot-api.md) ---
WMS_REAP_EVERY = env.float("WMS_REAP_EVERY", default=30.0)  # the reaper of silent pilots, s
# Silence judged with care (docs/lifecycle.md, "The reaper"): when at least
# WMS_REAPER_MASS_SILENCE_MIN live pilots AND at least WMS_REAPER_MASS_SILENCE_FRACTION of them
# are silent at once, or all of them are, the server is the likely culprit: the reaper holds
# (nobody is declared lost) and, once the pilots are heard from again, gives the still silent
# ones a fresh WMS_PILOT_LOST_AFTER. A pilot silent longer than WMS_PILOT_LOST_AFTER_OUTAGE is
# lost even during a hold. A reaper that did not run for WMS_REAPER_ABSENT_AFTER seconds
# counts every silence from its return.
WMS_REAPER_MASS_SILENCE_MIN = env.int("WMS_REAPER_MASS_SILENCE_MIN", default=3)
WMS_REAPER_MASS_SILENCE_FRACTION = env.float("WMS_REAPER_MASS_SILENCE_FRACTION", default=0.55)
WMS_PILOT_LOST_AFTER_OUTAGE = env.int(
    "WMS_PILOT_LOST_AFTER_OUTAGE", default=6 * WMS_PILOT_LOST_AFTER
)
WMS_REAPER_ABSENT_AFTER = env.float(
    "WMS_REAPER_ABSENT_AFTER", default=max(3 * WMS_REAP_EVERY, 60.0)
)
# An attempt the server has running on a pilot whose heartbeat lists it neither as running nor
# as reporting, started more than this many seconds ago, was lost by the pilot: it fails
# (error code not_on_pilot) and its job is retried.
WMS_NOT_ON_PILOT_GRACE = env.int("WMS_NOT_ON_PILOT_GRACE", default=2 * WMS_HEARTBEAT_INTERVAL)
# The consumer of pilots' status events on the bus (<prefix>.events): a batch is applied when
# it holds WMS_EVENTS_BATCH events or its first event waited WMS_EVENTS_MAX_WAIT seconds.
WMS_EVENTS_BATCH = env.int("WMS_EVENTS_BATCH", default=500)
WMS_EVENTS_MAX_WAIT = env.float("WMS_EVENTS_MAX_WAIT", default=0.5)
# Run that consumer inside every Celery worker (a bootstep); off when `manage.py
# consume_events` runs it apart.
WMS_EVENTS_IN_WORKER = env.bool("WMS_EVENTS_IN_WORKER", default=True)

# Idempotency keys of API calls (docs/pilot-api.md): an answer is replayed for this long (s),
# then purged by beat every WMS_IDEMPOTENCY_PURGE_EVERY seconds.
WMS_IDEMPOTENCY_TTL = env.float("WMS_IDEMPOTENCY_TTL", default=24 * 3600.0)
WMS_IDEMPOTENCY_PURGE_EVERY = env.float("WMS_IDEMPOTENCY_PURGE_EVERY", default=3600.0)

CELERY_BEAT_SCHEDULE = {
    "split": {"task": "wms.split", "schedule": WMS_SPLIT_EVERY, "kwargs": {"beat": True}},
    "dispatch": {"task": "wms.dispatch", "schedule": WMS_DISPATCH_EVERY, "kwargs": {"beat": True}},
    "reconcile-queued": {"task": "wms.reconcile_queued", "schedule": WMS_RECONCILE_EVERY},
    "finalize-tasks": {
        "task": "wms.finalize_tasks",
        "schedule": WMS_FINALIZE_EVERY,
        "kwargs": {"beat": True},
    },
    "reap-pilots": {
        "task": "wms.reap_pilots",
        "schedule": WMS_REAP_EVERY,
        "kwargs": {"beat": True},
    },
    "purge-idempotency-keys": {
        "task": "wms.purge_idempotency_keys",
        "schedule": WMS_IDEMPOTENCY_PURGE_EVERY,
    },
}

# --- Accounts: tokens, logins, throttles (docs/security.md) --------------------------------------
# Admin (password) logins: django-axes counts failures per (username, client IP) pair and locks
# the pair for a cool-off period; a success before the limit resets the count.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",  # first: refuses a locked-out pair before the check
    "django.contrib.auth.backends.ModelBackend",
]
AXES_ENABLED = env.bool("WMS_LOGIN_LOCKOUT", default=True)
AXES_FAILURE_LIMIT = env.int("WMS_LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.float("WMS_LOGIN_COOLOFF_MINUTES", default=15))
# username+IP: a guesser is stopped, but nobody can lock an operator out from elsewhere by
# failing on purpose with their name. "username" alone would also stop guessing spread over
# many addresses, at that price.
AXES_LOCKOUT_PARAMETERS = [
    p.split("+") if "+" in p else p
    for p in env.list("WMS_LOGIN_LOCKOUT_BY", default=["username+ip_address"])
]
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "wms.throttles.client_ip"  # the same client address as the throttles
AXES_VERBOSE = False  # failures are logged by the WMS's own handlers
# Clients behind this many reverse proxies: the client address is taken from X-Forwarded-For
# (as the proxies append to it) for the login lockout and the API's throttles. 0: REMOTE_ADDR.
WMS_NUM_PROXIES = env.int("WMS_NUM_PROXIES", default=0)

# API throttles (DRF): per user for users, per client address for anonymous calls. Pilots are
# neither (pilots/auth.py): they have a scope of their own, per pilot, off by default.
CACHES = {"default": env.cache_url("DJANGO_CACHE_URL", default="locmemcache://")}
REST_FRAMEWORK["NUM_PROXIES"] = WMS_NUM_PROXIES or None
REST_FRAMEWORK["DEFAULT_THROTTLE_CLASSES"] = [
    "wms.throttles.UserThrottle",
    "wms.throttles.AnonThrottle",
    "pilots.throttles.PilotThrottle",
]
REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"] = {
    "user": env.str("WMS_THROTTLE_USER", default="6000/min") or None,
    "anon": env.str("WMS_THROTTLE_ANON", default="600/min") or None,
    "pilot": env.str("WMS_THROTTLE_PILOT", default="") or None,
}
# Users' API tokens: how long one made through the API lives when the request names no expiry.
WMS_API_TOKEN_DEFAULT_DAYS = env.int("WMS_API_TOKEN_DEFAULT_DAYS", default=90)

# Transport security: on by default when DEBUG is off, each switchable for a site that
# terminates TLS in a proxy in front (then set DJANGO_SECURE_PROXY_SSL_HEADER, so that Django
# knows a request came in over HTTPS).
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=not DEBUG)
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]  # load balancers' health checks over plain HTTP
SESSION_COOKIE_SECURE = env.bool("DJANGO_SESSION_COOKIE_SECURE", default=not DEBUG)
CSRF_COOKIE_SECURE = env.bool("DJANGO_CSRF_COOKIE_SECURE", default=not DEBUG)
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=0 if DEBUG else 31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool(
    "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=not DEBUG
)
SECURE_HSTS_PRELOAD = env.bool("DJANGO_SECURE_HSTS_PRELOAD", default=not DEBUG)
# The header a TLS-terminating proxy sets to "https" (e.g. X-Forwarded-Proto); empty: none.
# Only with a proxy that always sets or strips it, or clients could claim HTTPS.
_proxy_ssl_header = env.str("DJANGO_SECURE_PROXY_SSL_HEADER", default="")
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_" + _proxy_ssl_header.upper().replace("-", "_"), "https") if _proxy_ssl_header else None
)
