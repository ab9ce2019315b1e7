from django.apps import AppConfig


class DevtoolsConfig(AppConfig):
    """Development tooling: ``manage.py up`` (the process stack, ``devtools.stack``) and
    ``manage.py demo`` (``devtools.demo``). It may depend on every app; nothing depends on it
    (docs/architecture.md, "Dependencies")."""

    name = "devtools"
    verbose_name = "Development tools"
