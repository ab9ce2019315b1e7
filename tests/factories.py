"""factory-boy factories for every model (one module, imported by every test package)."""

import functools

import factory
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.utils import timezone

from files.models import Dataset, DatasetEntry, DatasetRole, File, FileType
from jobs.models import Job, JobAttempt
from pilots.models import CommandKind, Pilot, PilotCommand
from pilots.services import hash_token
from tasks.models import Task, TaskInput
from wms import checksums
from wms.services import api_token_create


@functools.cache
def _password_hash(raw: str) -> str:
    return make_password(raw)


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"physicist{n}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.org")
    # Stored hashed in the row (force_login and password login both work); hashed once per run,
    # since the password hasher is deliberately slow.
    password = factory.LazyFunction(lambda: _password_hash("pw-for-tests"))


class DatasetFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Dataset

    name = factory.Sequence(lambda n: f"mc.run{n:05d}.evgen")
    role = DatasetRole.INPUT
    # A system dataset by default; the API lets only its owner (staff, files.change_dataset)
    # write an input dataset: DatasetFactory(owner=user).
    owner = None


class DatasetEntryFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = DatasetEntry

    dataset = factory.SubFactory(DatasetFactory)
    name = factory.Sequence(lambda n: f"events.{n:06d}.root")
    size = 1024
    check_sum = factory.LazyAttribute(lambda o: checksums.bytes_checksum(o.name.encode()))


class TaskFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Task
        skip_postgeneration_save = True

    owner = factory.SubFactory(UserFactory)
    executable = "wms-payload-map"
    args = "--events 100"
    rank = 0
    data_in_uid = factory.LazyFunction(lambda: DatasetFactory.create().uid)
    name = factory.Sequence(lambda n: f"task-{n}")
    data_out_url = "file:///out"  # where the reports of the tests' pilots put their files

    @factory.post_generation
    def inputs(obj, create, extracted, **kwargs):
        """Input 0 is ``data_in_uid`` (as ``task_create`` makes it); ``inputs=[uid, ...]``
        gives the whole series instead."""
        if not create:
            return
        uids = extracted if extracted is not None else [obj.data_in_uid]
        TaskInput.objects.bulk_create(
            [TaskInput(task=obj, position=i, dataset_uid=uid) for i, uid in enumerate(uids)]
        )


class PilotFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Pilot

    hostname = factory.Sequence(lambda n: f"wn{n:03d}.example.org")
    site = "TEST-SITE"
    cores = 8
    memory_mb = 16000
    started_at = factory.LazyFunction(timezone.now)
    last_heartbeat = factory.LazyFunction(timezone.now)
    token_hash = factory.Sequence(lambda n: hash_token(f"token-{n}"))


class PilotCommandFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = PilotCommand

    pilot = factory.SubFactory(PilotFactory)
    command = CommandKind.DRAIN
    reason = "test"


class JobFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Job

    task = factory.SubFactory(TaskFactory)
    executable = factory.SelfAttribute("task.executable")
    args = factory.SelfAttribute("task.args")
    rank = factory.SelfAttribute("task.rank")
    device_type = factory.SelfAttribute("task.device_type")
    mode = factory.SelfAttribute("task.mode")
    retries = factory.SelfAttribute("task.max_retries")


class JobAttemptFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = JobAttempt

    job = factory.SubFactory(JobFactory)
    number = factory.SelfAttribute("job.cur_retry")
    pilot = factory.SubFactory(PilotFactory)


class FileFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = File

    file_name = factory.Sequence(lambda n: f"out.{n:06d}.root")
    type = FileType.OUTPUT
    size = 2048
    check_sum = factory.LazyAttribute(lambda o: checksums.bytes_checksum(o.file_name.encode()))
    job = factory.SubFactory(JobFactory)
    task = factory.SelfAttribute("job.task")


def api_token(user, *, name: str = "tests", expires_at=None) -> tuple:
    """A user's API token through the service: (ApiToken, key), the key shown this once."""
    return api_token_create(user=user, name=name, expires_at=expires_at)
