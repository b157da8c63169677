"""The local-process batch system: real background processes, driven through the provider's own operations."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from airflow_oellm.hooks.slurm import SlurmHook
from airflow_oellm.localjobs.spec import SubmitError, directives, job_spec, parse_options
from airflow_oellm.slurm.identity import JobIdentity
from airflow_oellm.slurm.operations import CycleRequest, SubmissionConflict
from airflow_oellm.slurm.states import JobState
from airflow_oellm.slurm.target import ClusterTarget

pytestmark = pytest.mark.hook


@pytest.fixture
def queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "queue"
    monkeypatch.setenv("OELLM_LOCAL_JOBS_DIR", str(root))
    monkeypatch.setenv("OELLM_LOCAL_KILL_WAIT", "3")
    monkeypatch.setenv("OELLM_LOCAL_CPUS", "2")
    yield root
    # stop whatever a failed test left running
    for pgid_file in root.glob("jobs/*/pgid.json"):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(json.loads(pgid_file.read_text())["pgid"], signal.SIGKILL)


@pytest.fixture
def hook(queue: Path) -> SlurmHook:
    hook = SlurmHook(cluster=ClusterTarget(batch_system="local-process"))
    yield hook
    hook.close()


@pytest.fixture
def script(tmp_path: Path) -> Callable[..., str]:
    def _script(body: str, name: str = "job", **directive: str) -> str:
        lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --output={tmp_path}/%x-%j.out"]
        lines += [f"#SBATCH --{k.replace('_', '-')}={v}" for k, v in directive.items()]
        path = tmp_path / f"{name}.sbatch"
        path.write_text("\n".join([*lines, body, ""]))
        return str(path)

    return _script


def wait_state(hook: SlurmHook, job_id: str, done: Callable[[JobState], bool], timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = hook.job_status(job_id)
        if done(status.state):
            return status
        time.sleep(0.2)  # poll
    raise AssertionError(f"job {job_id} still {status.raw_state} after {timeout}s")


def eventually_gone(pid: int, timeout: float = 5) -> bool:
    """The process ended (a zombie waiting for a reaper that is not ours counts as ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)  # poll
    return False


def finished(hook: SlurmHook, job_id: str, timeout: float = 30):
    return wait_state(hook, job_id, lambda s: s.is_terminal, timeout)


def test_job_runs_to_completion_with_slurm_environment(hook, script, tmp_path):
    job_id, cluster = hook.submit_unreconciled(
        script('echo "id=$SLURM_JOB_ID name=$SLURM_JOB_NAME"; pwd', name="hello")
    )
    status = finished(hook, job_id)
    assert status.state is JobState.COMPLETED and status.exit_code == 0 and cluster is None
    assert status.name == "hello" and status.source == "sacct" and status.start and status.end
    assert (tmp_path / f"hello-{job_id}.out").read_text().splitlines() == [f"id={job_id} name=hello", os.getcwd()]


def test_exit_status_and_signals_become_failed(hook, script):
    failing = hook.submit_unreconciled(script("exit 3", name="three"))[0]
    killed = hook.submit_unreconciled(script("kill -9 $$", name="killed"))[0]
    status = finished(hook, failing)
    assert status.state is JobState.FAILED and (status.exit_code, status.exit_signal) == (3, 0)
    status = finished(hook, killed)
    assert status.state is JobState.FAILED and status.exit_signal == 9


def test_time_limit_warns_then_times_out(hook, script, tmp_path):
    body = "trap 'echo warned; exit 0' USR1\nwhile true; do sleep 0.1; done"
    job_id = hook.submit_unreconciled(script(body, name="slow", time="0:04", signal="B:USR1@2"))[0]
    assert finished(hook, job_id).state is JobState.COMPLETED  # the batch shell caught the warning and left
    assert (tmp_path / f"slow-{job_id}.out").read_text().strip() == "warned"

    stubborn = "trap '' TERM\nwhile true; do sleep 0.1; done"
    job_id = hook.submit_unreconciled(script(stubborn, name="stubborn", time="0:02"))[0]
    started = time.monotonic()
    status = finished(hook, job_id)
    # SIGTERM at the limit is ignored; SIGKILL follows after the kill wait (3 s here)
    assert status.state is JobState.TIMEOUT and time.monotonic() - started >= 4


def test_cancel_terminates_the_whole_process_group(hook, script, tmp_path):
    marker = tmp_path / "child.pid"
    body = f"sleep 300 & echo $! > {marker}\nwait"
    job_id = hook.submit_unreconciled(script(body, name="tree"))[0]
    wait_state(hook, job_id, lambda s: s is JobState.RUNNING)
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # poll
    child = int(marker.read_text())
    hook.cancel([job_id])
    status = finished(hook, job_id)
    assert status.state is JobState.CANCELLED and status.cancelled_by == str(os.getuid())
    assert eventually_gone(child)
    hook.cancel([job_id])  # cancelling a finished job is not an error, as with scancel


def test_jobs_wait_for_free_cpus(hook, script):
    long = [hook.submit_unreconciled(script("sleep 3", name=f"long{i}"))[0] for i in range(2)]
    queued = hook.submit_unreconciled(script("true", name="queued"))[0]
    wait_state(hook, long[1], lambda s: s is JobState.RUNNING)
    status = hook.job_status(queued)
    assert status.state is JobState.PENDING and status.reason == "Resources"
    # as on a cluster: the pending job's reason, and `squeue --start` answers, without an estimate here
    cycle = hook.poll_cycle([queued, long[0]], CycleRequest(), start_of=[queued])
    assert cycle.statuses[queued].reason == "Resources" and cycle.start_estimates == {queued: None}
    assert finished(hook, queued).state is JobState.COMPLETED
    assert all(finished(hook, j).state is JobState.COMPLETED for j in long)


def test_a_dead_supervisor_is_a_node_failure_and_its_job_is_stopped(hook, script, queue, tmp_path):
    marker = tmp_path / "shell.pid"
    job_id = hook.submit_unreconciled(script(f"echo $$ > {marker}; sleep 300", name="orphan"))[0]
    wait_state(hook, job_id, lambda s: s is JobState.RUNNING)
    supervisor = json.loads((queue / "jobs" / job_id / "supervisor.json").read_text())["pid"]
    os.kill(supervisor, signal.SIGKILL)
    status = finished(hook, job_id)
    assert status.state is JobState.NODE_FAIL
    assert eventually_gone(int(marker.read_text())), "the orphaned job kept running"


def test_submit_once_records_adopts_and_refuses_like_on_a_cluster(hook, script, tmp_path):
    output = str(tmp_path / "run")
    first = JobIdentity("dag", "run1", "train", -1, 1, output)
    path = script("sleep 5", name="train")
    outcome = hook.submit_once(first, path)
    assert outcome.kind == "submitted"
    assert hook.submit_once(first, path).kind == "recorded"  # a retried call does not submit twice
    retry = JobIdentity("dag", "run1", "train", -1, 2, output)
    adopted = hook.submit_once(retry, path)
    assert adopted.kind == "adopted" and adopted.job_id == outcome.job_id
    other = JobIdentity("dag", "run1", "other_task", -1, 1, output)
    with pytest.raises(SubmissionConflict, match="in use by job"):
        hook.submit_once(other, path)
    assert hook.job_status(outcome.job_id).comment == first.comment
    hook.cancel([outcome.job_id])


def test_unknown_ids_and_refused_options(hook, script):
    from airflow_oellm.slurm.commands import SlurmCommandError

    assert hook.job_status("999999").state is JobState.NOT_FOUND
    for directive, message in [
        ({"nodes": "2"}, "runs every job on this one machine"),
        ({"array": "0-3"}, "job arrays are not supported"),
        ({"cpus_per_task": "64"}, "Requested node configuration is not available"),
        ({"time": "soon"}, "invalid SLURM time"),
    ]:
        with pytest.raises(SlurmCommandError, match=message):
            hook.submit_unreconciled(script("true", name="refused", **directive))
    with pytest.raises(SlurmCommandError, match="Unable to open file"):
        hook.submit_unreconciled("/nonexistent/job.sbatch")


def test_options_parse_like_sbatch():
    text = "#!/bin/bash\n#SBATCH -J name --time=1:00\n#SBATCH --output out.log # comment\nset -e\n#SBATCH --ignored=1\n"
    assert directives(text) == ["-J", "name", "--time=1:00", "--output", "out.log"]
    options, rest = parse_options(["--parsable", "-c4", "--comment=a b", "job.sh", "--x"])
    assert options == {"parsable": "", "cpus-per-task": "4", "comment": "a b"} and rest == ["job.sh", "--x"]
    spec = job_spec("/x/job.sh", text, {"chdir": "/w", "signal": "B:USR1@90"}, "/submit", 8)
    assert (spec.name, spec.time_limit, spec.workdir, spec.output) == ("name", 60, "/w", "out.log")
    assert (spec.warn_signal, spec.warn_seconds, spec.warn_batch_only) == ("USR1", 90, True)
    with pytest.raises(SubmitError, match="must start with #!"):
        job_spec("/x/job.sh", "echo hi\n", {}, "/submit", 8)


def test_quickstart_commands_work_on_a_real_local_job(hook, script):
    """The `oellm-local` lines of docs/quickstart.md, as written (with this job's id)."""
    import re
    import subprocess

    from tests.conftest import REPO

    lines = [
        line.split("#", 1)[0].strip()
        for line in (REPO / "docs" / "quickstart.md").read_text().splitlines()
        if line.startswith("oellm-local ")
    ]
    assert len(lines) == 3
    job_id = hook.submit_unreconciled(script("sleep 60", name="quick"))[0]
    wait_state(hook, job_id, lambda s: s is JobState.RUNNING)
    command = str(Path(sys.executable).with_name("oellm-local"))
    outputs = []
    for line in lines:
        argv = [command, *re.sub(r"\b12\b", job_id, line).split()[1:]]
        outputs.append(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout)
    assert re.search(rf"^\s*{job_id} local quick \S+ R ", outputs[0], re.MULTILINE), outputs[0]
    assert outputs[1].splitlines()[0] == "JobID State ExitCode Elapsed"
    assert outputs[1].splitlines()[1].startswith(f"{job_id} RUNNING 0:0 ")
    assert finished(hook, job_id).state is JobState.CANCELLED
