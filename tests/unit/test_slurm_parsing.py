"""Parsing squeue/sacct/sbatch output recorded on the real dev cluster (tests/fixtures/slurm/record.sh)."""

from __future__ import annotations

import base64
import hashlib
import re
import shlex
import subprocess

import pytest

from airflow_oellm.slurm import commands, operations
from airflow_oellm.slurm.commands import SlurmCommandError
from airflow_oellm.slurm.identity import JobIdentity, parse_comment
from airflow_oellm.slurm.operations import Command, Result, SubmissionConflict
from airflow_oellm.slurm.states import JobState, JobStatus
from tests.conftest import REPO

pytestmark = pytest.mark.hook

RECORDED = (REPO / "tests" / "fixtures" / "slurm" / "dev-cluster-22.05.txt").read_text()


def section(name: str) -> str:
    m = re.search(rf"^== {name} ==\n(.*?)(?=^== |\Z)", RECORDED, re.M | re.S)
    assert m, name
    return m.group(1)


IDS = dict(kv.split("=") for kv in section("ids").split())


def test_every_state_name_parses():
    for state in JobState:
        if state not in (JobState.NOT_FOUND, JobState.UNKNOWN):
            assert JobState.parse(state.value) is state
    assert JobState.parse("CANCELLED by 1001") is JobState.CANCELLED
    assert JobState.parse("CANCELLED+") is JobState.CANCELLED
    assert JobState.parse("OUT_OF_ME+") is JobState.OUT_OF_MEMORY
    assert JobState.parse("running") is JobState.RUNNING
    assert JobState.parse("SOMETHING_NEW") is JobState.UNKNOWN
    assert JobState.parse("") is JobState.UNKNOWN


def test_state_classes_cover_everything_once():
    for state in JobState:
        kinds = [state.is_terminal, state.is_active]
        if state is JobState.UNKNOWN:
            assert kinds == [False, False]  # keep polling, report it
        else:
            assert sum(kinds) == 1, state
    assert [s for s in JobState if s.is_success] == [JobState.COMPLETED]
    assert not JobState.NOT_FOUND.is_success and JobState.NOT_FOUND.is_terminal
    assert JobState.REQUEUED.is_active and JobState.REQUEUE_HOLD.is_active
    for state in ("TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "FAILED", "CANCELLED"):
        assert JobState(state).is_terminal and not JobState(state).is_success


def test_squeue_final_states():
    got = commands.match_requested(list(IDS.values()), commands.parse_squeue(section("squeue_end")))
    assert got[IDS["ok"]].state is JobState.COMPLETED and got[IDS["ok"]].comment == "oellm/test/ok"
    assert got[IDS["fail"]].state is JobState.FAILED and got[IDS["fail"]].reason == "NonZeroExitCode"
    assert got[IDS["tmo"]].state is JobState.TIMEOUT and got[IDS["tmo"]].reason == "TimeLimit"
    assert got[IDS["can"]].state is JobState.CANCELLED
    assert got[IDS["dep"]].reason == "DependencyNeverSatisfied"
    assert got[IDS["arr"]].state is JobState.COMPLETED  # the array as a whole
    assert got[IDS["ok"]].source == "squeue" and got[IDS["ok"]].nodes == "vm" and got[IDS["ok"]].name == "ok"


def test_squeue_running_pending_and_held():
    got = commands.match_requested(list(IDS.values()), commands.parse_squeue(section("squeue_mid")))
    assert got[IDS["run"]].state is JobState.RUNNING
    assert got[IDS["rq"]].state is JobState.PENDING and got[IDS["rq"]].reason == "BeginTime"  # requeued
    assert got[IDS["held"]].reason == "JobHeldUser"
    assert got[IDS["can"]].comment is None  # "(null)"


def test_array_elements_and_pending_arrays():
    statuses = commands.parse_squeue(section("squeue_end"))
    arr = IDS["arr"]
    elements = [s for s in statuses if s.array_job_id == arr]
    assert sorted(s.display_id for s in elements) == [f"{arr}_{i}" for i in range(4)]
    assert {s.job_id for s in elements} >= {arr}  # the last element reuses the array job id
    by_element = commands.match_requested([f"{arr}_2"], statuses)
    assert by_element[f"{arr}_2"].array_task_id == "2"
    pending = commands.parse_squeue(section("squeue_pending_array"))
    master = pending[0]
    assert master.display_id.endswith("_[0-3]") and master.state is JobState.PENDING
    assert commands.match_requested([master.job_id], pending)[master.job_id].state is JobState.PENDING


def test_sacct_exit_codes_cancelled_by_and_requeue_history():
    got = commands.match_requested(list(IDS.values()), commands.parse_sacct(section("sacct_end")))
    assert (got[IDS["fail"]].exit_code, got[IDS["fail"]].exit_signal) == (3, 0)
    assert (got[IDS["sig"]].exit_code, got[IDS["sig"]].exit_signal) == (0, 9)
    assert got[IDS["can"]].state is JobState.CANCELLED and got[IDS["can"]].cancelled_by == "1001"
    rq = got[IDS["rq"]]
    assert rq.state is JobState.CANCELLED and rq.history == ("REQUEUED",) and rq.restarts == 1
    assert got[IDS["tmo"]].state is JobState.TIMEOUT and got[IDS["tmo"]].end
    assert got[IDS["dep"]].nodes is None and got[IDS["dep"]].start is None  # "None assigned", "None"
    assert got[IDS["arr"]].state is JobState.COMPLETED and got[IDS["ok"]].source == "sacct"


def test_sacct_ignores_steps():
    text = "17|17|CANCELLED by 0|0:0|None|vm|a|b|x|\n17.batch|17.batch|CANCELLED|0:15|None|vm|a|b|batch|\n"
    [status] = commands.parse_sacct(text)
    assert status.job_id == "17" and status.cancelled_by == "0"


def test_not_found_and_transient_errors():
    assert commands.squeue_not_found(1, section("squeue_unknown"))
    assert section("sacct_unknown").strip() == "rc=0"  # sacct: no lines, exit 0
    for text in (
        "slurm_load_jobs error: Socket timed out on send/recv operation",
        "squeue: error: Unable to contact slurm controller (connect failure)",
        "bash: fork: retry: Resource temporarily unavailable",
        "sacct: error: slurmdbd: Getting response to message type: DBD_GET_JOBS_COND",
    ):
        assert commands.is_transient(text), text
        assert not commands.squeue_not_found(1, text)
    assert not commands.is_transient("slurm_load_jobs error: Invalid job id specified")
    assert not commands.is_transient("sbatch: error: invalid partition specified: nosuch")


def drive(op, results):
    """Run an operation against scripted results; returns (value, commands)."""
    seen = []
    answers = iter(results)

    def execute(command):
        seen.append(command)
        return next(answers)

    return operations.run_sync(op, execute), seen


def squeue_answer(text: str, rc: int = 0) -> Result:
    return Result(0, f"@@squeue {rc}\n{text}@@end\n", "")


def test_job_statuses_uses_one_squeue_then_one_sacct():
    squeue_out = "7|7|7|N/A|RUNNING|None|vm|x|(null)\n"
    sacct_out = "8|8|COMPLETED|0:0|None|vm|a|b|y|\n"
    value, seen = drive(operations.job_statuses(["7", "8", "9"]), [squeue_answer(squeue_out), Result(0, sacct_out, "")])
    assert [c.label for c in seen] == ["poll", "sacct"]
    assert "--jobs=7,8,9" in seen[0].script and "--jobs=8,9" in seen[1].script
    assert value["7"].state is JobState.RUNNING and value["8"].state is JobState.COMPLETED
    assert value["9"].state is JobState.NOT_FOUND


def test_jobs_that_just_ended_are_completed_from_sacct():
    squeue_out = "7|7|7|N/A|FAILED|NonZeroExitCode|vm|x|(null)\n6|6|6|N/A|COMPLETED|None|vm|x|(null)\n"
    sacct_out = "7|7|FAILED|3:0|None|vm|a|b|x|\n6|6|RUNNING|0:0|None|vm|a|b|x|\n"  # 6: sacct still behind
    value, seen = drive(operations.job_statuses(["7", "6"]), [squeue_answer(squeue_out), Result(0, sacct_out, "")])
    assert "--jobs=7,6" in seen[1].script
    assert value["7"].exit_code == 3 and value["7"].source == "sacct"
    assert value["6"].state is JobState.COMPLETED and value["6"].source == "squeue"


def test_job_statuses_all_in_queue_needs_no_sacct_and_chunks_long_lists():
    ids = [str(i) for i in range(2500)]
    lines = "".join(f"{i}|{i}|{i}|N/A|PENDING|None||x|(null)\n" for i in ids)
    answer = Result(
        0,
        "".join(
            f"@@squeue 0\n{chunk}@@end\n"
            for chunk in ("".join(lines.splitlines(True)[i : i + 1000]) for i in (0, 1000, 2000))
        ),
        "",
    )
    value, seen = drive(operations.job_statuses(ids, chunk_size=1000), [answer])
    assert [c.label for c in seen] == ["poll"] and seen[0].script.count("squeue --noheader") == 3
    assert len(value) == 2500 and value["2499"].state is JobState.PENDING


def test_job_statuses_transient_failure_is_an_error_not_a_state():
    with pytest.raises(SlurmCommandError) as err:
        drive(operations.job_statuses(["1"]), [squeue_answer("slurm_load_jobs error: Socket timed out\n", rc=1)])
    assert err.value.transient
    value, _ = drive(
        operations.job_statuses(["1"]),
        [squeue_answer("slurm_load_jobs error: Invalid job id specified\n", rc=1), Result(0, "", "")],
    )
    assert value["1"].state is JobState.NOT_FOUND


def test_sbatch_parsing():
    assert commands.parse_sbatch("11\n") == ("11", None)
    assert commands.parse_sbatch("sbatch: warning: x\n34;devcluster\n") == ("34", "devcluster")
    with pytest.raises(SlurmCommandError):
        commands.parse_sbatch("Submitted batch job x")


def test_identity_comment_round_trip():
    ident = JobIdentity("oellm__s__e", "manual__2026-11-28T11:23:41+00:00", "train", -1, 2, "/scratch/out/e/")
    parsed = parse_comment(ident.comment)
    assert parsed.task_key == ident.task_key and parsed.try_number == 2
    assert ident.workspace_key == JobIdentity("other", "r", "t", 0, 1, "/scratch/out/e").workspace_key
    assert ident.record_path == f"/scratch/out/e/.oellm/submissions/{ident.task_key}-2"
    assert re.match(r"^oellm/[0-9a-f]{16}/[0-9a-f]{16}/2$", ident.comment)
    assert parse_comment("(null)") is None and parse_comment("oellm/x/y/1") is None


def submit_result(tag_lines: str) -> Result:
    return Result(0, tag_lines, "")


def test_submit_once_outcomes():
    ident = JobIdentity("d", "r", "t", -1, 1, "/o")
    other_task = JobIdentity("d", "r2", "t", -1, 1, "/o")
    outcome, seen = drive(operations.submit_once(ident, "/o/job.sh"), [submit_result("OELLM-SUBMITTED 42\n")])
    assert (outcome.kind, outcome.job_id) == ("submitted", "42")
    assert f"--comment={ident.comment}" in seen[0].script
    outcome, _ = drive(operations.submit_once(ident, "/o/job.sh"), [submit_result("OELLM-RECORDED 42;c\n")])
    assert (outcome.kind, outcome.job_id, outcome.cluster) == ("recorded", "42", "c")
    earlier_try = JobIdentity("d", "r", "t", -1, 0, "/o").comment
    outcome, _ = drive(operations.submit_once(ident, "/o/job.sh"), [submit_result(f"OELLM-ACTIVE 40 {earlier_try}\n")])
    assert (outcome.kind, outcome.job_id) == ("adopted", "40")
    with pytest.raises(SubmissionConflict, match="in use by job"):
        drive(operations.submit_once(ident, "/o/job.sh"), [submit_result(f"OELLM-ACTIVE 41 {other_task.comment}\n")])
    with pytest.raises(SlurmCommandError, match="invalid partition") as err:
        drive(
            operations.submit_once(ident, "/o/job.sh"),
            [submit_result("OELLM-SBATCH-FAILED 1\nsbatch: error: invalid partition specified: x\n")],
        )
    assert not err.value.transient
    with pytest.raises(SlurmCommandError) as err:
        drive(operations.submit_once(ident, "/o/job.sh"), [Result(4, "OELLM-RETRY squeue: Socket timed out\n", "")])
    assert err.value.transient


def test_an_earlier_tries_ended_job_is_taken_only_when_no_try_judged_it():
    ident = JobIdentity("d", "r", "t", -1, 3, "/o")
    outcome, seen = drive(
        operations.submit_once(ident, "/o/job.sh", decided=["7", "8"]), [submit_result("OELLM-ENDED 9 2\n")]
    )
    assert (outcome.kind, outcome.job_id, outcome.try_number) == ("ended", "9", 2)
    assert "$(seq 2 -1 1)" in seen[0].script and 'case " "\'7 8\'" " in' in seen[0].script
    _, seen = drive(operations.submit_once(ident, "/o/job.sh"), [submit_result("OELLM-SUBMITTED 10\n")])
    assert "$(seq 0 -1 1)" in seen[0].script  # decided=None: no earlier try's job is ever taken
    with pytest.raises(ValueError, match="invalid job id"):
        drive(operations.submit_once(ident, "/o/job.sh", decided=["7; touch x"]), [])


def test_secrets_travel_on_stdin_only():
    ident = JobIdentity("d", "r", "t", -1, 1, "/o")
    _, seen = drive(
        operations.submit_once(ident, "/o/job.sh", secrets={"HF_TOKEN": "hf_s3cret"}),
        [submit_result("OELLM-SUBMITTED 1\n")],
    )
    command = seen[0]
    assert "hf_s3cret" not in command.script and "hf_s3cret" not in repr(command)
    assert command.stdin == b"HF_TOKEN=" + base64.b64encode(b"hf_s3cret") + b"\n"
    with pytest.raises(ValueError):
        operations.encode_secrets({"BAD NAME": "x"})


def test_read_ranges_framing():
    requests = [("/a", 0, 10), ("/missing", 0, 10), ("/b", 5, 3)]
    binary = base64.b64encode(b"ab\x00c").decode()
    out = f"F 0 4 {binary}\nF 1 -1 \nF 2 100 {base64.b64encode(b'xyz').decode()}\n"
    chunks = commands.parse_read_ranges(out, requests)
    assert chunks[0].data == b"ab\x00c" and chunks[0].size == 4 and chunks[0].end == 4
    assert chunks[1].size is None and chunks[1].data == b""
    assert chunks[2].offset == 5 and chunks[2].end == 8
    with pytest.raises(SlurmCommandError):
        commands.parse_read_ranges("F 0 4 \n", requests)


def test_tracker_parsing():
    assert commands.parse_tracker(b"1000\n") == 1000
    assert commands.parse_tracker(b"release") == "release"
    assert commands.parse_tracker(b"") is None and commands.parse_tracker(b"garbage") is None


def test_command_builders_quote_and_validate():
    assert shlex.split(commands.upload_script("/x y/job.sh", "0700"))[0] == "set"
    with pytest.raises(ValueError):
        commands.upload_script("/x", "0999")
    with pytest.raises(ValueError):
        commands.scancel_argv(["1; rm -rf /"])
    with pytest.raises(ValueError):
        commands.scancel_argv(["1"], signal="USR1; id")
    assert commands.scancel_argv(["5", "6_1"], "USR1", batch_only=True) == [
        "scancel",
        "--signal=USR1",
        "--batch",
        "5",
        "6_1",
    ]
    assert commands.exclude_nodes_argv("5", ["lrdn0417", "nid[001-004]"])[-1] == "ExcNodeList=lrdn0417,nid[001-004]"
    with pytest.raises(ValueError):
        commands.exclude_nodes_argv("5", ["a b"])


def test_status_round_trips_through_json():
    status = commands.parse_sacct(section("sacct_end"))[0]
    assert JobStatus.from_dict(status.to_dict()) == status
    assert "secret" not in repr(Command("x", stdin=b"secret"))


def test_a_guarded_write_compares_and_swaps_and_quotes_what_it_compares(tmp_path):
    """The compare-and-swap of state files, in a real bash: over the content last seen (no file: empty), and
    nothing a hostile digest holds runs."""
    path, canary = tmp_path / "a dir" / "state.json", tmp_path / "canary"

    def write(data: bytes, replaces: str | None) -> str:
        script = commands.write_script(0, str(path), data, replaces)
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.strip()

    empty, first = hashlib.sha256(b"").hexdigest(), hashlib.sha256(b"first").hexdigest()
    assert write(b"first", empty) == "W 0 ok" and path.read_bytes() == b"first"
    assert write(b"late", empty) == "W 0 stale" and path.read_bytes() == b"first"
    assert write(b"x", f"'; touch {canary}; echo '") == "W 0 stale" and not canary.exists()
    assert write(b"second", first) == "W 0 ok" and path.read_bytes() == b"second"
    # the same write again (it landed, its answer was lost, it is retried): done, not stale
    assert write(b"second", first) == "W 0 ok" and path.read_bytes() == b"second"
    assert write(b"any", None) == "W 0 ok" and path.read_bytes() == b"any"
