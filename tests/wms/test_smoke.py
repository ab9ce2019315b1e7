from tests.factories import FileFactory, JobAttemptFactory


def test_factories_build_a_consistent_graph(db):
    f = FileFactory()
    a = JobAttemptFactory(job=f.job)
    assert f.task_id == f.job.task_id
    assert a.job_id == f.job_id and a.number == 0
