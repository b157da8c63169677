"""SlurmHook against the real dev cluster over real SSH: states, files, exactly-once submission, security."""

from __future__ import annotations

import asyncio
import hashlib
import shlex
import threading
import time
import uuid

import paramiko
import pytest

from airflow_oellm.hooks import AsyncSlurmHook, SlurmHook
from airflow_oellm.slurm.commands import SlurmCommandError
from airflow_oellm.slurm.identity import JobIdentity
from airflow_oellm.slurm.operations import SubmissionConflict
from airflow_oellm.slurm.states import JobState
from airflow_oellm.slurm.target import ClusterTarget
from tests.cluster_fixtures import ssh_connection_uri

pytestmark = pytest.mark.hook


@pytest.fixture(scope="module")
def hook(slurm_conn_id):
    h = SlurmHook(ssh_conn_id=slurm_conn_id)
    yield h
    h.close()


def job_script(directory: str, name: str, body: str, *directives: str) -> str:
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --output={directory}/{name}-%j.out",
        "#SBATCH --time=00:05:00",
        *(f"#SBATCH {d}" for d in directives),
        body,
        "",
    ]
    return "\n".join(lines)


def put_job(hook, directory: str, name: str, body: str, *directives: str) -> str:
    path = f"{directory}/{name}.sbatch"
    hook.upload(path, job_script(directory, name, body, *directives), mode="0700")
    return path


def wait_for(hook, job_id: str, predicate, timeout: float = 60, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        status = hook.job_status(job_id)
        seen.append(status.state)
        if predicate(status):
            return status, seen
        time.sleep(interval)  # poll
    raise AssertionError(f"job {job_id}: condition not met in {timeout}s; states seen {seen[-5:]}")


def terminal(status):
    return status.is_terminal


@pytest.fixture(scope="module")
def slow_jobs(hook, module_remote_dir):
    """Jobs whose outcome takes a while (time limit, purge from the queue), started first."""
    tmo = hook.submit_unreconciled(put_job(hook, module_remote_dir, "tmo", "sleep 600"), ["--time=1"])[0]
    gone = hook.submit_unreconciled(put_job(hook, module_remote_dir, "gone", "true"))[0]
    return {"timeout": tmo, "purged": gone}


def test_submit_running_then_completed(hook, remote_dir, slow_jobs):
    job_id, cluster = hook.submit_unreconciled(put_job(hook, remote_dir, "ok", "sleep 4; echo done"))
    assert cluster is None and job_id.isdigit()
    status, seen = wait_for(hook, job_id, terminal)
    assert JobState.RUNNING in seen
    assert status.state is JobState.COMPLETED and status.exit_code == 0 and status.source == "sacct"
    log = hook.read_range(f"{remote_dir}/ok-{job_id}.out")
    assert log.data == b"done\n"


def test_failed_with_exit_code(hook, remote_dir):
    job_id, _ = hook.submit_unreconciled(put_job(hook, remote_dir, "fail", "exit 3"))
    status, _ = wait_for(hook, job_id, terminal)
    assert status.state is JobState.FAILED and (status.exit_code, status.exit_signal) == (3, 0)


def test_cancelled_by_user(hook, dev_cluster, remote_dir):
    job_id, _ = hook.submit_unreconciled(put_job(hook, remote_dir, "can", "sleep 300"))
    wait_for(hook, job_id, lambda s: s.state is JobState.RUNNING)
    hook.cancel([job_id])
    status, _ = wait_for(hook, job_id, terminal)
    uid = dev_cluster.ssh(["id", "-u"]).stdout.strip()
    assert status.state is JobState.CANCELLED and status.cancelled_by == uid


def test_cancel_with_a_signal_reaches_the_batch_shell(hook, remote_dir):
    body = "trap 'echo \"got USR1\"' USR1; echo trapping; for i in $(seq 120); do sleep 1; done"
    job_id, _ = hook.submit_unreconciled(put_job(hook, remote_dir, "sig", body))
    wait_for(hook, job_id, lambda s: s.state is JobState.RUNNING)
    out = f"{remote_dir}/sig-{job_id}.out"
    deadline = time.monotonic() + 20
    while b"trapping" not in hook.read_range(out).data:  # the trap is set: a signal now reaches it
        assert time.monotonic() < deadline, "the batch shell never started"
        time.sleep(0.2)  # poll
    hook.cancel([job_id], "USR1", batch_only=True)
    deadline = time.monotonic() + 20
    while b"got USR1" not in hook.read_range(out).data:
        assert time.monotonic() < deadline, "USR1 not delivered"
        time.sleep(0.5)  # poll
    assert hook.job_status(job_id).state is JobState.RUNNING  # the signal did not end the job
    hook.cancel([job_id])


@pytest.mark.anomalies
@pytest.mark.parametrize("with_step", [True, False], ids=["srun-step", "batch-shell"])
def test_kill_ends_every_process_without_a_sigterm_first(hook, dev_cluster, remote_dir, with_step):
    """What a rewind stops a diverged job with: a SIGTERM would let Megatron's exit handler save the diverged
    weights. `scancel --signal=KILL` sends one first (it cancels the job as a whole); `kill` does not."""
    # a Python child of the batch shell or of an srun step, as a trainer started either way
    marker = f"oellm-kill-{uuid.uuid4().hex[:8]}"
    work = (
        f"# {marker}\nimport signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: print('got TERM', flush=True))\n"
        "print('started', flush=True)\n"
        "for i in range(120):\n    time.sleep(1)\n    print('tick', i, flush=True)\n"
    )
    python = f"python3 -c {shlex.quote(work)}"
    body = f"srun {python} & wait" if with_step else python
    name = f"kill{'step' if with_step else 'batch'}"
    job_id, _ = hook.submit_unreconciled(put_job(hook, remote_dir, name, f"trap 'echo got TERM' TERM; {body}"))
    out = f"{remote_dir}/{name}-{job_id}.out"
    deadline = time.monotonic() + 30
    while b"started" not in hook.read_range(out).data:  # the traps are set
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.2)  # poll
    hook.kill([job_id])
    wait_for(hook, job_id, terminal)
    assert b"got TERM" not in hook.read_range(out).data, hook.read_range(out).data
    deadline = time.monotonic() + 15  # the dev cluster's one node is this machine: its processes are visible
    while dev_cluster.ssh(["pgrep", "-f", f"[{marker[0]}]{marker[1:]}"], check=False).returncode == 0:  # not itself
        assert time.monotonic() < deadline, "a process of the job outlived it"
        time.sleep(0.5)  # poll
    hook.kill([job_id])  # a job that ended is no error


def test_array_job_as_a_whole_and_by_element(hook, remote_dir):
    job_id, _ = hook.submit_unreconciled(put_job(hook, remote_dir, "arr", "sleep 1", "--array=0-3"))
    status, _ = wait_for(hook, job_id, terminal)
    assert status.state is JobState.COMPLETED
    elements = hook.job_statuses([f"{job_id}_{i}" for i in range(4)])
    assert {s.state for s in elements.values()} == {JobState.COMPLETED}
    assert {s.array_task_id for s in elements.values()} == {"0", "1", "2", "3"}


def test_requeue_keeps_the_job_alive_and_records_history(hook, dev_cluster, remote_dir):
    job_id, _ = hook.submit_unreconciled(put_job(hook, remote_dir, "rq", "sleep 300", "--open-mode=append"))
    wait_for(hook, job_id, lambda s: s.state is JobState.RUNNING)
    dev_cluster.ssh(["scontrol", "requeue", job_id])
    status, seen = wait_for(
        hook, job_id, lambda s: s.state is JobState.RUNNING and s.reason in (None, "None"), timeout=90, interval=0.5
    )
    assert not any(s.is_terminal for s in seen), seen  # never reported as finished in between
    hook.cancel([job_id])
    status, _ = wait_for(hook, job_id, lambda s: s.is_terminal and s.source == "sacct")
    assert status.state is JobState.CANCELLED
    assert "REQUEUED" in status.history and status.restarts >= 1


def test_upload_is_atomic_with_modes(hook, dev_cluster, remote_dir):
    data = bytes(range(256)) * 3
    hook.upload(f"{remote_dir}/deep/er/blob.bin", data)
    hook.upload(f"{remote_dir}/job.sh", "#!/bin/bash\necho hi\n", mode="0700")
    modes = dev_cluster.ssh(f"stat -c '%a %n' {remote_dir}/deep/er/blob.bin {remote_dir}/job.sh").stdout.split("\n")
    assert modes[0].startswith("600 ") and modes[1].startswith("700 ")
    assert dev_cluster.ssh(f"ls -A {remote_dir}/deep/er").stdout.split() == ["blob.bin"]  # no temp file left
    assert hook.read_range(f"{remote_dir}/deep/er/blob.bin", 0, 10_000).data == data


def test_read_ranges_and_the_tracker_file(hook, remote_dir):
    hook.upload(f"{remote_dir}/log.txt", b"0123456789")
    hook.upload(f"{remote_dir}/ckpt/latest_checkpointed_iteration.txt", b"1000\n")
    chunks = hook.read_ranges(
        [
            (f"{remote_dir}/log.txt", 3, 4),
            (f"{remote_dir}/nope", 0, 10),
            (f"{remote_dir}/log.txt", 10, 5),
            (f"{remote_dir}/log.txt", 50, 5),
        ]
    )
    assert (chunks[0].size, chunks[0].data) == (10, b"3456")
    assert chunks[1].size is None
    assert (chunks[2].size, chunks[2].data) == (10, b"")
    assert (chunks[3].size, chunks[3].data) == (10, b"")  # the file is shorter than the offset (truncated)
    assert hook.read_tracker(f"{remote_dir}/ckpt") == 1000
    assert hook.read_tracker(f"{remote_dir}/nockpt") is None


def test_a_rewind_sets_the_checkpoint_directory_back(hook, remote_dir):
    ckpt = f"{remote_dir}/rewind/checkpoints"
    for iteration in (100, 200, 300):
        hook.upload(f"{ckpt}/iter_{iteration:07d}/metadata.json", b"{}")
    hook.upload(f"{ckpt}/latest_checkpointed_iteration.txt", b"300")
    discard = f"{ckpt}/discarded/rewind-1"
    assert hook.rewind_checkpoints(ckpt, 100, discard) == [200, 300]
    assert hook.read_tracker(ckpt) == 100
    assert hook.read_range(f"{discard}/iter_0000300/metadata.json").data == b"{}"  # moved aside, kept
    assert hook.read_range(f"{ckpt}/iter_0000200/metadata.json").size is None
    assert hook.rewind_checkpoints(ckpt, 100, discard) == []  # run again: nothing left to do
    with pytest.raises(SlurmCommandError, match="checkpoint 150 is missing"):
        hook.rewind_checkpoints(ckpt, 150, discard)


def identity(remote_dir: str, run_id: str = "manual__1", try_number: int = 1) -> JobIdentity:
    return JobIdentity("oellm__t__exp", run_id, "train", -1, try_number, f"{remote_dir}/exp")


def test_submit_once_never_submits_twice(hook, dev_cluster, remote_dir):
    name = f"once-{uuid.uuid4().hex[:8]}"  # unique: sacct remembers earlier runs' jobs by name
    script = put_job(hook, remote_dir, name, "sleep 60")
    ident = identity(remote_dir)
    first = hook.submit_once(ident, script)
    assert first.kind == "submitted"
    again = hook.submit_once(ident, script)  # a retry of the same attempt: the record answers
    assert (again.kind, again.job_id) == ("recorded", first.job_id)
    # the worker died after sbatch and the record is gone: the active job on the output dir is adopted
    dev_cluster.ssh(["rm", "-f", ident.record_path])
    adopted = hook.submit_once(ident, script)
    assert (adopted.kind, adopted.job_id) == ("adopted", first.job_id)
    # the next attempt of the same task while the job still runs: follow it, do not start a second one
    next_try = hook.submit_once(identity(remote_dir, try_number=2), script)
    assert (next_try.kind, next_try.job_id) == ("adopted", first.job_id)
    # another DAG run on the same output directory: refused
    with pytest.raises(SubmissionConflict, match=first.job_id):
        hook.submit_once(identity(remote_dir, run_id="manual__2"), script)
    jobs = hook.find_jobs(comment_prefix=f"oellm/{ident.workspace_key}/", names=[name])
    assert [j.job_id for j in jobs] == [first.job_id]
    show = dev_cluster.ssh(["scontrol", "show", "job", "-o", first.job_id]).stdout
    assert f"Comment={ident.comment} " in show
    hook.cancel([first.job_id])


def test_a_retry_takes_the_earlier_tries_ended_job_unless_a_try_judged_it(hook, remote_dir):
    """Try 1's follower died and its job ended: try 2 takes that job instead of submitting; once a try
    has judged the job (a retry verdict), the next try submits anew."""
    name = f"ended-{uuid.uuid4().hex[:8]}"
    script = put_job(hook, remote_dir, name, "true")
    first = hook.submit_once(identity(remote_dir), script, decided=[])
    assert first.kind == "submitted"
    wait_for(hook, first.job_id, terminal)
    taken = hook.submit_once(identity(remote_dir, try_number=2), script, decided=[])
    assert (taken.kind, taken.job_id, taken.try_number) == ("ended", first.job_id, 1)
    # a caller that keeps no decisions (decided=None) never takes an ended job
    fresh = hook.submit_once(identity(remote_dir, try_number=2), script)
    assert fresh.kind == "submitted" and fresh.job_id != first.job_id
    wait_for(hook, fresh.job_id, terminal)
    # try 3: the latest earlier job (try 2's) is judged, so try 1's is not looked at either
    third = hook.submit_once(identity(remote_dir, try_number=3), script, decided=[fresh.job_id])
    assert third.kind == "submitted" and third.job_id not in (first.job_id, fresh.job_id)
    wait_for(hook, third.job_id, terminal)


def test_concurrent_submitters_make_one_job(slurm_conn_id, dev_cluster, hook, remote_dir):
    name = f"race-{uuid.uuid4().hex[:8]}"
    script = put_job(hook, remote_dir, name, "sleep 30")
    ident = identity(remote_dir, run_id="manual__race")
    outcomes, errors = [], []

    def submit():
        h = SlurmHook(ssh_conn_id=slurm_conn_id)
        try:
            outcomes.append(h.submit_once(ident, script))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)
        finally:
            h.close()

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert sorted(o.kind for o in outcomes) == ["recorded", "recorded", "recorded", "submitted"]
    assert len({o.job_id for o in outcomes}) == 1
    names = dev_cluster.ssh(["squeue", "--noheader", "--me", f"--name={name}", "--format=%A"]).stdout.split()
    assert names == [outcomes[0].job_id]
    hook.cancel(names)


def test_sbatch_is_throttled_per_cluster(hook, remote_dir):
    script = put_job(hook, remote_dir, "thr", "true")
    start = time.monotonic()
    for i in range(3):
        hook.submit_once(JobIdentity("d", "r", f"t{i}", -1, 1, f"{remote_dir}/thr{i}"), script)
    assert time.monotonic() - start >= 2.0  # three sbatch calls at most one per second


@pytest.mark.faults
def test_secrets_reach_the_job_and_nowhere_else(hook, dev_cluster, remote_dir, reliability):
    secret = "hf_s3cr3t value; $(touch PWNED)"
    body = 'printf %s "$OELLM_TEST_SECRET" | sha256sum | cut -c1-64'
    script = put_job(hook, remote_dir, "sec", body)
    outcome = hook.submit_once(
        identity(remote_dir, run_id="manual__sec"), script, secrets={"OELLM_TEST_SECRET": secret}
    )
    status, _ = wait_for(hook, outcome.job_id, terminal)
    assert status.state is JobState.COMPLETED
    log = hook.read_range(f"{remote_dir}/sec-{outcome.job_id}.out").data.decode()
    assert log.strip() == hashlib.sha256(secret.encode()).hexdigest()
    leaked = dev_cluster.ssh(f"grep -rl -F 's3cr3t' {remote_dir} || true").stdout.strip()
    assert leaked == ""
    assert dev_cluster.ssh(f"find {remote_dir} -name PWNED").stdout.strip() == ""
    reliability.record(
        "a secret with shell metacharacters",
        "reached the job's environment (its hash matched) and no file under the job's directory",
        files_holding_the_secret=len(leaked.split()),
    )


def test_exclude_nodes_on_a_pending_job(hook, dev_cluster, remote_dir):
    job_id, _ = hook.submit_unreconciled(put_job(hook, remote_dir, "held", "true"), ["--hold"])
    hook.exclude_nodes(job_id, [dev_cluster.env["SLURM_DEV_NODE"]])
    show = dev_cluster.ssh(["scontrol", "show", "job", "-o", job_id]).stdout
    assert f"ExcNodeList={dev_cluster.env['SLURM_DEV_NODE']} " in show
    hook.cancel([job_id])


def test_platform_detection_runs_remotely(hook):
    found = hook.detect_platform()
    assert found.name == "devcluster" and "oellm-dev-cluster" in found.reason


@pytest.mark.faults
def test_wrong_host_key_is_refused_by_both_hooks(dev_cluster, monkeypatch, reliability):
    wrong = paramiko.Ed25519Key.from_private_key_file(dev_cluster.env["SLURM_DEV_SSH_KEY"])  # a key, not the host's
    monkeypatch.setenv("AIRFLOW_CONN_SLURM_WRONG", ssh_connection_uri(dev_cluster, f"ssh-ed25519 {wrong.get_base64()}"))
    with pytest.raises(paramiko.SSHException, match=r"not found in known_hosts|does not match"):
        SlurmHook(ssh_conn_id="slurm_wrong").job_statuses(["1"])

    async def connect():
        hook = AsyncSlurmHook(ssh_conn_id="slurm_wrong")
        try:
            await hook.job_statuses(["1"])
        finally:
            await hook.close()

    with pytest.raises(SlurmCommandError) as err:
        asyncio.run(connect())
    assert not err.value.transient  # a wrong host key is not retried as a network blip
    reliability.record(
        "host key mismatch",
        "refused by the worker's hook (paramiko) and the triggerer's (asyncssh); not retried as a blip",
    )


def test_local_mode_runs_the_same_operations(dev_cluster, tmp_path):
    local = SlurmHook(cluster=ClusterTarget(local_commands=True))
    (tmp_path / "x").mkdir()
    local.upload(str(tmp_path / "x" / "f.txt"), b"hello world")
    assert local.read_range(str(tmp_path / "x" / "f.txt"), 6, 5).data == b"world"
    assert (tmp_path / "x" / "f.txt").stat().st_mode & 0o777 == 0o600
    job = dev_cluster.ssh(["sbatch", "--parsable", "--hold", "-o", "/dev/null", "--wrap=true"]).stdout.strip()
    assert local.job_status(job).reason == "JobHeldUser"
    local.cancel([job])
    status, _ = wait_for(local, job, terminal)
    assert status.state is JobState.CANCELLED
    # a script bigger than one argument may be (128 KiB: a sweep's plots written at once) goes on stdin, as over SSH
    big = bytes(range(256)) * 1200
    assert local.write_files([(str(tmp_path / "x" / "big.bin"), big), (str(tmp_path / "x" / "b.txt"), b"b")]) == [
        True,
        True,
    ]
    assert (tmp_path / "x" / "big.bin").read_bytes() == big

    async def written_by_the_async_twin() -> list[bool]:
        from airflow_oellm.slurm.operations import CycleRequest

        twin = AsyncSlurmHook(cluster=ClusterTarget(local_commands=True))
        try:
            return (await twin.poll_cycle([], CycleRequest(writes=[(str(tmp_path / "x" / "twin.bin"), big)]))).writes_ok
        finally:
            await twin.close()

    assert asyncio.run(written_by_the_async_twin()) == [True] and (tmp_path / "x" / "twin.bin").read_bytes() == big


def test_time_limit_ends_in_timeout(hook, slow_jobs):
    status, _ = wait_for(hook, slow_jobs["timeout"], terminal, timeout=200, interval=3)
    assert status.state is JobState.TIMEOUT and not status.state.is_success


def test_purged_job_is_still_resolved_through_sacct(hook, dev_cluster, slow_jobs):
    job_id = slow_jobs["purged"]
    deadline = time.monotonic() + 240
    while dev_cluster.ssh(["squeue", "-h", "-t", "all", "-j", job_id], check=False).returncode == 0:
        assert time.monotonic() < deadline, "job never left the queue (MinJobAge)"
        time.sleep(5)  # poll: MinJobAge is minutes
    status = hook.job_status(job_id)
    assert status.state is JobState.COMPLETED and status.source == "sacct" and status.exit_code == 0
    assert hook.job_status("99999999").state is JobState.NOT_FOUND


def test_commands_larger_than_a_command_line_work(hook, dev_cluster, remote_dir):
    """A poll cycle for many jobs is bigger than Linux allows for one argument (128 KiB): it goes on stdin."""
    from airflow_oellm.slurm.operations import CycleRequest

    writes = [(f"{remote_dir}/many/{i}.json", b"x" * 2000) for i in range(300)]
    cycle = hook.poll_cycle([], CycleRequest(writes=writes))
    assert all(cycle.writes_ok) and len(cycle.writes_ok) == 300
    cycle = hook.poll_cycle([], CycleRequest(reads=[(path, 0, 10) for path, _ in writes]))
    assert {c.data for c in cycle.chunks} == {b"x" * 10} and len(cycle.chunks) == 300
    assert dev_cluster.ssh(f"ls {remote_dir}/many | wc -l").stdout.strip() == "300"


def test_a_guarded_write_lands_only_over_the_content_its_writer_last_saw(hook, dev_cluster, remote_dir):
    """Compare and swap through the cluster's shell: two watchers of one job, the second saving in between,
    and the first's save over the content it last saw is refused (`stale`), in the same cycle as others."""
    from airflow_oellm.slurm.operations import CycleRequest, FileWrite

    path, other = f"{remote_dir}/guarded dir/state.json", f"{remote_dir}/guarded dir/other.json"
    empty = hashlib.sha256(b"").hexdigest()
    first = hook.poll_cycle([], CycleRequest(writes=[FileWrite(path, b"first", empty)]))
    assert (first.writes_ok, first.writes_stale) == ([True], [False])
    second = FileWrite(path, b"second", hashlib.sha256(b"first").hexdigest())
    stale = FileWrite(path, b"stale", empty)  # its writer last saw no file
    cycle = hook.poll_cycle([], CycleRequest(writes=[second, stale, (other, b"unguarded")]))
    assert (cycle.writes_ok, cycle.writes_stale) == ([True, False, True], [False, True, False])
    assert dev_cluster.ssh(["cat", path]).stdout == "second"
    assert dev_cluster.ssh(["cat", other]).stdout == "unguarded"
