"""schemathesis over the whole API, with each kind of credential (docs/development.md).

Two ways in:

- in the test suite (``tests/wms/test_api_fuzz.py``): in-process against the WSGI app on the
  test database, a bounded number of examples per operation, derandomized;
- against a live server, bigger (``python -m tests.api_fuzz --url ...``): the same world is
  built in the server's database, then the schemathesis CLI runs once per credential.

The world (:func:`build_world`) gives every id a path can name something real: a user's task,
its jobs (queued, running on the pilot, finished), their files, an input dataset with files,
an output dataset, a registered pilot. Each credential is an ``Authorization`` header (none
for the anonymous caller).

The checks: no server error (5xx), every status documented for its operation, every body
and header as documented, and every request the schema calls invalid refused (4xx).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, cast

CREDENTIALS = ("anonymous", "user", "staff", "pilot")

# The schemathesis checks run, in-process and in the CLI alike.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
)


@dataclasses.dataclass
class World:
    headers: dict[str, dict[str, str]]  # credential -> request headers
    # credential -> path parameter name -> a real value (the caller's own objects)
    path_parameters: dict[str, dict[str, Any]]


def build_world(*, label: str = "fuzz") -> World:
    """Objects for the ids the API's paths take, owned by a user, a staff user and a pilot.

    ``label`` makes the names unique, so the live form can run again on the same database.
    """
    from django.contrib.auth import get_user_model

    from files.models import File, FileType
    from files.services import dataset_add_files, dataset_register
    from jobs.models import AttemptState, Job, JobState
    from pilots.services import pilot_register
    from tasks.create import task_create
    from tests.factories import FileFactory, JobAttemptFactory, JobFactory
    from wms import checksums
    from wms.services import api_token_create

    user_model = get_user_model()
    user = user_model.objects.create_user(username=f"{label}-user", password=None)
    staff = user_model.objects.create_user(
        username=f"{label}-staff", password=None, is_staff=True, is_superuser=True
    )
    _, user_token = api_token_create(user=user, name="fuzz")
    _, staff_token = api_token_create(user=staff, name="fuzz")

    dataset = dataset_register(name=f"{label}.input", owner=user)
    dataset_add_files(
        dataset=dataset,
        files=[
            {
                "name": f"events.{i}.root",
                "size": 1024,
                "check_sum": checksums.bytes_checksum(f"{label}{i}".encode()),
            }
            for i in range(3)
        ],
    )
    task = task_create(
        owner=user, executable="wms-payload-map", data_in_uid=dataset.uid, name=f"{label}-task"
    )
    pilot, pilot_token = pilot_register(hostname=f"{label}.wn.example.org", registered_by="fuzz")

    queued = cast(Job, JobFactory(task=task, state=JobState.QUEUED))
    running = cast(Job, JobFactory(task=task, state=JobState.RUNNING, pilot=pilot))
    JobAttemptFactory(job=running, pilot=pilot, number=0, state=AttemptState.RUNNING)
    finished = cast(Job, JobFactory(task=task, state=JobState.FINISHED))
    out = cast(File, FileFactory(job=finished, task=task, type=FileType.OUTPUT))
    FileFactory(job=queued, task=task, type=FileType.INPUT)

    own = {
        "id": task.pk,  # tasks/{id}; jobs/{id} and files/{id} get their own below
        "uid": str(dataset.uid),
    }
    return World(
        headers={
            "anonymous": {},
            "user": {"Authorization": f"Token {user_token}"},
            "staff": {"Authorization": f"Token {staff_token}"},
            "pilot": {"Authorization": f"Pilot {pilot_token}"},
        },
        path_parameters={
            "anonymous": own,
            "user": own,
            "staff": own,
            "pilot": {
                "pilot_id": pilot.pk,
                "job_uuid": str(running.uuid),
                "id": pilot.pk,
            },
            # Read by the harness for the operations of other tables.
            "_jobs": {"id": running.pk, "queued_uuid": str(queued.uuid)},
            "_files": {"id": out.pk},
            "_pilots": {"id": pilot.pk},
        },
    )


def real_path_parameters(world: World, credential: str, path: str) -> dict[str, Any]:
    """The real values of the path parameters of ``path`` for ``credential``."""
    own = dict(world.path_parameters[credential])
    for prefix, key in (
        ("/api/v1/jobs/{id}", "_jobs"),
        ("/api/v1/files/{id}", "_files"),
        ("/api/v1/pilots/{id}", "_pilots"),
    ):
        if path.startswith(prefix):
            own["id"] = world.path_parameters[key]["id"]
    names = {part[1:-1] for part in path.split("/") if part.startswith("{")}
    return {name: value for name, value in own.items() if name in names}


# --- the live form --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.api_fuzz",
        description="Build the fuzz world in the server's database (DATABASE_URL), then run "
        "the schemathesis CLI against the live server once per credential.",
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--max-examples", type=int, default=200, help="per operation")
    parser.add_argument("--seed", type=int, default=12, help="schemathesis' random seed")
    parser.add_argument("--workers", default="1", help="schemathesis' workers (or 'auto')")
    parser.add_argument(
        "--credential", action="append", choices=CREDENTIALS, help="default: every one"
    )
    parser.add_argument("--label", default=f"fuzz{os.getpid()}", help="names of the world")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more schemathesis options")
    args = parser.parse_args(argv)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    world = build_world(label=args.label)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    failed = 0
    for credential in args.credential or CREDENTIALS:
        # The caller's own objects for the path parameters that name one whatever the path
        # (the pilot's id and its running job, the user's dataset): schemathesis' config.
        config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)  # noqa: SIM115
        with config:
            config.write("[parameters]\n")
            for name in ("pilot_id", "job_uuid", "uid"):
                if name in world.path_parameters[credential]:
                    value = world.path_parameters[credential][name]
                    config.write(f'"path.{name}" = {json.dumps(value)}\n')
        command = [
            os.path.join(os.path.dirname(sys.executable), "schemathesis"),
            "--config-file",
            config.name,
            "run",
            f"{args.url.rstrip('/')}/api/schema/",
            "--checks",
            ",".join(CHECKS),
            "--max-examples",
            str(args.max_examples),
            "--seed",
            str(args.seed),
            "--workers",
            str(args.workers),
        ]
        for name, value in world.headers[credential].items():
            command += ["--header", f"{name}: {value}"]
        command += extra
        print(f"== {credential}: {' '.join(command)}", flush=True)
        failed |= subprocess.call(command)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
