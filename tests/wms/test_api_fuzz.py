"""schemathesis over the whole API with each credential, at a size CI affords.

In-process against the WSGI app on the test database, with the world of
``tests.api_fuzz.build_world`` (real ids for every path). For each operation and credential:
``WMS_FUZZ_EXAMPLES`` examples (default 10) of valid requests (half of those on the caller's
own objects when the path names one) and as many invalid ones, derandomized so that a run is
the same every time. Each example runs in a savepoint rolled back after it: every example
sees the same world. Bigger: ``WMS_FUZZ_EXAMPLES=200 pytest tests/wms/test_api_fuzz.py``, or
the live form (``python -m tests.api_fuzz``, docs/development.md).

Fails on any server error, any status the operation does not document, any body or header
not as documented, and any invalid request (by the schema) that is not refused.
"""

from __future__ import annotations

import os
import re

import pytest
import schemathesis
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections, transaction
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi import checks as openapi_checks

from tests.api_fuzz import CHECKS, CREDENTIALS, build_world, real_path_parameters

EXAMPLES = int(os.environ.get("WMS_FUZZ_EXAMPLES", "10"))
REPORT = os.environ.get("WMS_FUZZ_REPORT")  # a file for every failure in full
ONLY = os.environ.get("WMS_FUZZ_ONLY")  # a regular expression of operations ("POST /api/v1/jobs")

_CHECK_FUNCTIONS = [
    not_a_server_error if name == "not_a_server_error" else getattr(openapi_checks, name)
    for name in CHECKS
]


def summary(exc: BaseException) -> str:
    """The failure's checks, status and the request (its curl line) in a few lines."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    keep = [
        line
        for line in lines
        if line.startswith(("- ", "[", "Received", "curl")) and len(line) < 2000
    ]
    return "\n    ".join(keep or lines[:3])


@pytest.fixture
def wsgi_app(db, settings):
    """The WSGI app on the test transaction: Django's test client does the same, a request's
    start and end must not close the connection that holds the test's transaction."""
    settings.ALLOWED_HOSTS = ["*"]
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        yield get_wsgi_application()
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


@pytest.mark.parametrize("credential", CREDENTIALS)
def test_every_operation_conforms_to_the_schema(credential, wsgi_app):
    world = build_world()
    schema = schemathesis.openapi.from_wsgi("/api/schema/", wsgi_app)
    headers = world.headers[credential]
    failures: list[str] = []
    operations = examples = 0

    for result in schema.get_all_operations():
        operation = result.ok()
        if ONLY and not re.search(ONLY, operation.label):
            continue
        operations += 1
        real = real_path_parameters(world, credential, operation.path)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategies = [operation.as_strategy(generation_mode=mode)]
            if real and mode is GenerationMode.POSITIVE:
                strategies.append(operation.as_strategy(generation_mode=mode, path_parameters=real))

            @settings(
                max_examples=EXAMPLES,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=st.one_of(strategies))
            def run(case):
                nonlocal examples
                examples += 1
                with transaction.atomic():
                    try:
                        case.call_and_validate(headers=headers, checks=_CHECK_FUNCTIONS)
                    finally:
                        transaction.set_rollback(True)

            try:
                run()
            except Unsatisfiable:
                pass  # nothing to negate (no parameter, no body): no invalid request exists
            except (Exception, BaseExceptionGroup) as exc:
                failures.append(f"{operation.label} [{mode.value}]: {summary(exc)}")
                if REPORT:
                    with open(REPORT, "a") as out:
                        out.write(f"== {credential} {operation.label} [{mode.value}]\n{exc}\n")

    print(f"\n{credential}: {operations} operations, {examples} examples, {len(failures)} failed")
    assert operations > 30 or ONLY
    assert not failures, "\n\n".join(failures)
