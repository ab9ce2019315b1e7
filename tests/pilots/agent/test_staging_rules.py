"""The pilot's own rules on where data may live (docs/pilot.md, "Where data may live"),
independent of the server: inputs only from its storage roots (or the job's own output URL),
no symlink followed out of the job's directory at stage-out, nothing written outside the job's
output URL. Real processes, real files, real symlinks."""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path

import pytest

from pilots.agent.config import ConfigError, merge
from pilots.agent.runner import JobRunner
from tests.pilots.agent.conftest import job_message
from wms.contract import InputFile, JobMessage
from wms.locations import canonical_roots


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A real file outside every root (as /etc/shadow would be)."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    f = d / "shadow"
    f.write_text("root:SECRET-HASH:19000:0:99999:7:::\n")
    return f


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    d = tmp_path / "data" / "in"
    d.mkdir(parents=True)
    return d


def runner_for(job: JobMessage, tmp_path: Path, storage: Path, **kw) -> JobRunner:
    return JobRunner(
        job,
        work_root=tmp_path / "work",
        sample_interval=0.05,
        storage_roots=canonical_roots([storage.as_uri()]),
        **kw,
    )


def shell_job(outdir: Path, script: str, **kw) -> JobMessage:
    """A job whose payload is a shell script (run in the job's directory)."""
    return dataclasses.replace(
        job_message(outdir, **kw), executable="/bin/sh", args=shlex.join(["-c", script])
    )


def everything_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*")} if path.exists() else set()


# --- stage-in ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["inplace", "copy"])
def test_an_input_outside_the_storage_roots_fails_the_job_and_is_never_read(
    tmp_path, outdir, storage, secret, mode
):
    job = job_message(outdir, "env", inputs=[InputFile("shadow", "d", secret.as_uri())])
    runner = runner_for(job, tmp_path, storage, stage_in=mode)
    result = runner.run()

    assert (result.state, result.error_code) == ("failed", "stage_in_refused")
    assert "not under the pilot's storage roots" in result.error_message
    assert [o["type"] for o in result.outputs] == ["log"]  # no output, the payload never ran
    assert not (runner.dir / "env.json").exists()
    assert everything_under(runner.inputs_dir) == set()  # nothing copied in
    log_copy = outdir / job.job_uuid / "0" / f"{job.job_uuid}.0.log"
    assert "SECRET-HASH" not in log_copy.read_text()


@pytest.mark.parametrize(
    "url",
    [
        "{storage}/../../elsewhere/shadow",  # climbs out of the root
        "{storage}%2F..%2F..%2Felsewhere/shadow",  # an encoded slash
        "{storage}2/x",  # a sibling whose name starts like the root
    ],
)
def test_urls_that_only_look_inside_a_root_are_refused(tmp_path, outdir, storage, secret, url):
    (storage.parent / "in2").mkdir()
    (storage.parent / "in2" / "x").write_text("x")
    url = url.format(storage=storage.as_uri())
    job = job_message(outdir, "env", inputs=[InputFile("x", "d", url)])
    result = runner_for(job, tmp_path, storage, stage_in="copy").run()

    assert (result.state, result.error_code) == ("failed", "stage_in_refused")


def test_a_symlink_inside_a_root_to_a_file_outside_is_refused(tmp_path, outdir, storage, secret):
    link = storage / "events.root"
    link.symlink_to(secret)
    job = job_message(outdir, "env", inputs=[InputFile("events.root", "d", link.as_uri())])
    runner = runner_for(job, tmp_path, storage, stage_in="copy")
    result = runner.run()

    assert (result.state, result.error_code) == ("failed", "stage_in_refused")
    assert "outside the storage roots" in result.error_message
    assert everything_under(runner.inputs_dir) == set()


def test_inputs_under_a_root_or_the_job_s_own_output_url_are_staged(tmp_path, outdir, storage):
    (storage / "a.txt").write_text("A")
    own = outdir / "earlier-job" / "hist.json"  # a merge job reads its task's outputs
    own.parent.mkdir()
    own.write_text("H")
    inputs = [
        InputFile("a.txt", "d", (storage / "a.txt").as_uri()),
        InputFile("h", "d", own.as_uri()),
    ]
    result = runner_for(job_message(outdir, "env", inputs=inputs), tmp_path, storage).run()

    assert (result.state, result.error_code) == ("finished", "")


def test_without_storage_roots_no_input_is_taken(tmp_path, outdir, storage):
    (storage / "a.txt").write_text("A")
    job = job_message(outdir, "env", inputs=[InputFile("a.txt", "d", (storage / "a.txt").as_uri())])
    result = JobRunner(job, work_root=tmp_path / "work").run()

    assert (result.state, result.error_code) == ("failed", "stage_in_refused")
    assert "none configured" in result.error_message


# --- stage-out --------------------------------------------------------------------------------


def test_a_symlink_out_of_the_job_dir_is_never_followed_at_stage_out(
    tmp_path, outdir, storage, secret
):
    job = shell_job(
        outdir, f'echo ok > "$WMS_OUTPUT_DIR/ok.txt"; ln -s {secret} "$WMS_OUTPUT_DIR/out.root"'
    )
    runner = runner_for(job, tmp_path, storage)
    result = runner.run()

    assert (result.state, result.error_code) == ("failed", "stage_out_refused")
    assert (
        "out.root" in result.error_message and "outside the job's directory" in result.error_message
    )
    assert [o["type"] for o in result.outputs] == ["log"]  # the report carries no output
    staged = everything_under(outdir / job.job_uuid)
    assert staged == {"0", f"0/{job.job_uuid}.0.log"}  # neither out.root nor ok.txt copied
    for path in (outdir / job.job_uuid).rglob("*"):
        if path.is_file():
            assert "SECRET-HASH" not in path.read_text()


def test_a_linked_directory_out_of_the_job_dir_is_refused(tmp_path, outdir, storage, secret):
    job = shell_job(outdir, f'ln -s {secret.parent} "$WMS_OUTPUT_DIR/sub"')
    result = runner_for(job, tmp_path, storage).run()

    assert (result.state, result.error_code) == ("failed", "stage_out_refused")
    assert not (outdir / job.job_uuid / "sub").exists()


def test_the_outputs_dir_replaced_by_a_link_is_refused(tmp_path, outdir, storage, secret):
    job = shell_job(outdir, f'rm -r "$WMS_OUTPUT_DIR" && ln -s {secret.parent} "$WMS_OUTPUT_DIR"')
    result = runner_for(job, tmp_path, storage).run()

    assert (result.state, result.error_code) == ("failed", "stage_out_refused")
    assert not (outdir / job.job_uuid / "shadow").exists()


def test_the_log_replaced_by_a_link_is_not_staged(tmp_path, outdir, storage, secret):
    job = shell_job(outdir, f'rm -f ./*.log && ln -s {secret} "$WMS_JOB_UUID.$WMS_ATTEMPT.log"')
    result = runner_for(job, tmp_path, storage).run()

    assert (result.state, result.error_code) == ("failed", "stage_out_refused")
    assert result.outputs == []
    for path in (outdir / job.job_uuid).rglob("*") if (outdir / job.job_uuid).exists() else []:
        if path.is_file():
            assert "SECRET-HASH" not in path.read_text()


def test_a_link_to_a_file_inside_the_job_dir_is_staged_as_that_file(tmp_path, outdir, storage):
    job = shell_job(
        outdir, 'echo data > scratch.txt && ln -s ../scratch.txt "$WMS_OUTPUT_DIR/a.txt"'
    )
    result = runner_for(job, tmp_path, storage).run()

    assert (result.state, result.error_code) == ("finished", "")
    assert (outdir / job.job_uuid / "a.txt").read_text() == "data\n"
    assert not (outdir / job.job_uuid / "a.txt").is_symlink()


def test_an_output_url_that_cannot_be_normalised_is_refused(tmp_path, storage):
    job = dataclasses.replace(job_message(tmp_path, "write", "a=1"), output_url="file:///../x")
    result = runner_for(job, tmp_path, storage).run()

    assert (result.state, result.error_code) == ("failed", "stage_out_refused")
    assert result.outputs == []


def test_a_link_planted_in_the_output_storage_is_not_written_through(
    tmp_path, outdir, storage, secret
):
    """Another job's payload left ``<output_url>/<this job's uuid>`` as a link elsewhere."""
    job = job_message(outdir, "write", "a.txt=payload-data")
    (outdir / job.job_uuid).symlink_to(secret.parent)
    result = runner_for(job, tmp_path, storage).run()

    assert (result.state, result.error_code) == ("failed", "stage_out_refused")
    assert not (secret.parent / "a.txt").exists()
    assert os.listdir(secret.parent) == ["shadow"]


# --- the option -------------------------------------------------------------------------------


def test_storage_roots_option_from_flag_and_environment(tmp_path):
    cfg = merge(flags={"storage_roots": "file:///data/in/, root://EOS.example.org//eos/x"})
    assert cfg.storage_roots == ("file:///data/in", "root://eos.example.org/eos/x")
    cfg = merge(environ={"WMS_PILOT_STORAGE_ROOTS": "/data/a /data/b"})
    assert cfg.storage_roots == ("file:///data/a", "file:///data/b")
    with pytest.raises(ConfigError):
        merge(flags={"storage_roots": "relative/path"})


# --- the stage-out's open follows no link, even one planted after the pilot looked -----------


def test_open_inside_reads_a_regular_file_of_the_job(tmp_path: Path) -> None:
    from pilots.agent.runner import open_inside

    (tmp_path / "outputs" / "sub").mkdir(parents=True)
    (tmp_path / "outputs" / "sub" / "h.json").write_text("histogram")
    with open_inside(tmp_path, tmp_path / "outputs" / "sub" / "h.json") as fh:
        assert fh.read() == b"histogram"


@pytest.mark.parametrize("swap", ["file_is_link", "folder_is_link", "fifo", "outside"])
def test_open_inside_refuses_what_a_payload_swapped_in(
    tmp_path: Path, secret: Path, swap: str
) -> None:
    """What a payload's leftover process can do between the pilot's look and its copy:
    replace the output or one of its folders by a link to a file of the pilot's (or root's),
    or by a FIFO that would hang the pilot. Each is refused and nothing is read."""
    from pilots.agent.runner import StageRefused, open_inside

    job = tmp_path / "job"
    (job / "outputs").mkdir(parents=True)
    target = job / "outputs" / "sub" / "shadow"
    if swap == "file_is_link":
        target.parent.mkdir()
        target.symlink_to(secret)
    elif swap == "folder_is_link":
        (job / "outputs" / "sub").symlink_to(secret.parent, target_is_directory=True)
    elif swap == "fifo":
        target.parent.mkdir()
        os.mkfifo(target)
    else:
        target = secret
    with pytest.raises(StageRefused):
        open_inside(job, target)
    assert secret.read_text().startswith("root:SECRET-HASH")  # untouched, and never read
