"""Log events, classification, hang detection, progress guard and checkpoint readiness (no cluster)."""

from __future__ import annotations

import json
import subprocess

import pytest

from airflow_oellm.cli import main as cli
from airflow_oellm.megatron import checkpoints
from airflow_oellm.megatron.logs import iteration_fields
from airflow_oellm.monitor.classify import FATAL, RETRY, SUCCESS, Outcome, classify, progress_guard, rules_from_config
from airflow_oellm.monitor.events import MAX_LINE_BYTES, EventMatcher, EventSpec, event_specs, match_log
from airflow_oellm.monitor.inactivity import Activity
from airflow_oellm.slurm.states import JobState

pytestmark = pytest.mark.operators

# lines in Megatron-LM's exact formats (see ../shared/reference/megatron-formats.md, section 3.1)
ITERATION_LINE = (
    " [2026-05-07 20:32:47] iteration      100/    1000 | consumed samples:         6400 | elapsed time per "
    "iteration (ms): 370.3 | mem usages: 0.5123 | throughput per GPU (TFLOP/s/GPU): 198.6 | Tokens per second per "
    "GPU (Tok/s/GPU): 22120.2 | learning rate: 3.000000E-04 | global batch size:    64 | lm loss: 3.141593E+00 | "
    "loss scale: 1.0 | grad norm: 0.523 | number of skipped iterations:   0 | number of nan iterations:   0 |"
)
MEGATRON_LOG = (
    "\n".join(
        [
            "WARNING: could not find the metadata file /out/run/checkpoints/latest_checkpointed_iteration.txt",
            "    will not load any checkpoints and will start from random",
            "[default0]:" + ITERATION_LINE,
            "[default7]: validation loss at iteration 1000 | lm loss value: 2.345678E+00 "
            "| lm loss PPL: 1.043998E+01 | ",
            "[default0]:saving checkpoint at iteration    1000 to /out/run in torch_dist format",
            "[default0]:  successfully saved checkpoint from iteration    1000 to /out/run [ t 1/1, p 1/1 ]",
            " validation loss at iteration 1000 on test set | lm loss value: 2.3E+00 | lm loss PPL: 9.9E+00 | ",
            "[after training is done] datetime: 2026-05-07 21:00:00.123456 ",
            "[exiting program after receiving SIGTERM.] datetime: 2026-05-07 21:00:01.000000 ",
            "  successfully loaded checkpoint from /out/run [ t 1/1, p 1/1 ] at iteration 1000",
            "[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
            "srun: error: Task launch for StepId=12345.0 failed on node lrdn0417: Communication connection failure",
            "slurmstepd: error: *** JOB 12345 ON lrdn0417 CANCELLED AT 2026-06-13T10:00:00 DUE TO TIME LIMIT ***",
            "[rank3]:[E1107 12:34:56.789 ProcessGroupNCCL.cpp:616] [Rank 3] "
            "Watchdog caught collective operation timeout",
            "Traceback (most recent call last):",
        ]
    )
    + "\n"
)


def test_iteration_line_fields():
    fields = iteration_fields(ITERATION_LINE)
    assert fields["iteration"] == 100 and fields["train_iters"] == 1000 and fields["consumed_samples"] == 6400
    assert fields["loss"] == pytest.approx(3.141593) and fields["lr"] == pytest.approx(3e-4)
    assert fields["tflops_per_gpu"] == pytest.approx(198.6) and fields["tokens_per_second_per_gpu"] == 22120.2
    assert fields["grad_norm"] == pytest.approx(0.523) and fields["nan_iterations"] == 0
    # fields are optional and order-free (NVIDIA builds print fewer)
    short = iteration_fields(" iteration        5/      10 | lm loss: 1.0E+00 | learning rate: 1.0E-03 |")
    assert short == {"iteration": 5, "train_iters": 10, "loss": 1.0, "lr": 0.001}


def test_builtin_events_from_megatron_lines():
    events = match_log(MEGATRON_LOG.encode(), event_specs())
    by_name = {}
    for e in events:
        by_name.setdefault(e.name, []).append(e)
    assert set(by_name) >= {
        "fresh_start",
        "iteration",
        "validation",
        "checkpoint_saved",
        "training_done",
        "exit_signal",
        "checkpoint_loaded",
        "cuda_oom",
        "node_failure",
        "time_limit",
        "nccl_error",
        "traceback",
    }
    saved = by_name["checkpoint_saved"][0]
    assert saved.groups["iteration"] == 1000 and saved.groups["path"] == "/out/run" and saved.line_no == 6
    assert by_name["validation"][0].groups == {"iteration": 1000, "loss": 2.345678, "ppl": 10.43998}
    assert by_name["validation"][1].groups["split"] == "test"
    assert by_name["checkpoint_loaded"][0].groups["iteration"] == 1000
    assert by_name["node_failure"][0].groups["node"] == "lrdn0417"
    assert by_name["iteration"][0].groups["loss"] == pytest.approx(3.141593)
    assert by_name["exit_signal"][0].groups["signal"] == "SIGTERM"


def test_seed_format_event_with_extract_groups_and_metadata():
    spec = EventSpec.from_dict(
        {
            "name": "checkpoint_saved",
            "pattern": r"successfully saved checkpoint from iteration\s+(?P<iteration>\d+) to "
            r"(?P<path>\S+)",
            "pattern_type": "regex",
            "metadata": {"kind": "checkpoint", "trigger": "hf_conversion"},
            "extract_groups": {"checkpoint_iteration": "iteration", "checkpoint_path": "path"},
        }
    )
    [event] = [e for e in match_log(MEGATRON_LOG.encode(), event_specs([spec.to_dict()])) if e.name == spec.name]
    assert event.groups["checkpoint_iteration"] == 1000 and event.groups["checkpoint_path"] == "/out/run"
    assert event.metadata == {"kind": "checkpoint", "trigger": "hf_conversion"}
    substring = EventSpec("done", "[after training is done]", "substring")
    assert [e.line_no for e in match_log(MEGATRON_LOG.encode(), [substring])] == [8]


def test_matcher_is_exact_across_chunks_and_restarts():
    data = MEGATRON_LOG.encode()
    whole = [(e.name, e.line_no, e.offset) for e in match_log(data, event_specs())]
    for cut in (1, 7, 100, len(data) // 2, len(data) - 3):
        matcher = EventMatcher(event_specs())
        _, first = matcher.feed(data[:cut])
        restored = EventMatcher.from_state(event_specs(), json.loads(json.dumps(matcher.state())))
        _, second = restored.feed(data[cut:], final=True)
        assert [(e.name, e.line_no, e.offset) for e in first + second] == whole, cut
    for e in match_log(data, event_specs()):
        assert data[e.offset :].startswith(e.line.encode()[:10])


def test_matcher_survives_long_lines_binary_and_invalid_utf8():
    junk = b"\xff\xfe\x00binary\x80" + b"x" * (3 * MAX_LINE_BYTES) + b"\n" + ITERATION_LINE.encode() + b"\r\n"
    matcher = EventMatcher(event_specs())
    lines, events = [], []
    for i in range(0, len(junk), 4096):
        new_lines, new_events = matcher.feed(junk[i : i + 4096])
        lines += new_lines
        events += new_events
    assert all(len(line.encode()) <= MAX_LINE_BYTES * 4 for line in lines)
    assert [e.name for e in events] == ["iteration"] and events[0].groups["iteration"] == 100
    assert len(matcher.partial) == 0


def test_events_cli(tmp_path, capsys):
    log = tmp_path / "job.log"
    log.write_text(MEGATRON_LOG)
    assert cli(["events", str(log), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"name", "groups", "line_no"} <= set(rows[0])
    assert any(r["name"] == "checkpoint_saved" and r["groups"]["iteration"] == 1000 for r in rows)
    config = tmp_path / "events.yaml"
    config.write_text(
        "monitoring:\n  log_events:\n    - name: mine\n      pattern: 'lm loss value: (?P<v>[0-9.E+-]+)'\n"
        "      extract_groups: {value: v}\n"
    )
    assert cli(["events", "--config", str(config), str(log)]) == 0
    out = capsys.readouterr().out
    assert "mine" in out and "checkpoint_saved" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("monitoring:\n  log_events:\n    - {name: x, pattern: '(unclosed'}\n")
    assert cli(["events", "--config", str(bad), str(log)]) == 1
    assert "monitoring.log_events[0].pattern" in capsys.readouterr().err


def outcome(state, tail="", **kw):
    return Outcome(JobState(state), log_tail=tail, **kw)


@pytest.mark.parametrize(
    "case, verdict, reason",
    [
        (outcome("TIMEOUT", "*** JOB 1 ON n1 CANCELLED AT x DUE TO TIME LIMIT ***"), RETRY, "time limit"),
        (outcome("PREEMPTED"), RETRY, "preempted"),
        (outcome("NODE_FAIL"), RETRY, "NODE_FAIL"),
        (outcome("BOOT_FAIL"), RETRY, "BOOT_FAIL"),
        (outcome("CANCELLED", cancelled_by="1001", hang=True), RETRY, "hang"),
        (outcome("FAILED", "NCCL ERROR Remote process has terminated", iterations_run=5), RETRY, "NCCL"),
        (
            outcome("FAILED", "torch.OutOfMemoryError: CUDA out of memory.", iterations_run=5),
            FATAL,
            "CUDA out of memory",
        ),
        (outcome("OUT_OF_MEMORY"), FATAL, "host memory"),
        (outcome("FAILED", "Traceback (most recent call last):\n  ValueError: bad arg"), FATAL, "traceback"),
        (outcome("FAILED", "Traceback (most recent call last):", iterations_run=12), RETRY, "crashed"),
        (outcome("CANCELLED", cancelled_by="1001"), FATAL, "cancelled by a user"),
        (outcome("CANCELLED", cancelled_by="1001", cancelled_by_us=True), FATAL, "unclassified"),
        (outcome("COMPLETED", training_done=True), SUCCESS, "finished"),
        (outcome("COMPLETED", checkpoint_before=0, checkpoint_after=500), RETRY, "before the last iteration"),
        (outcome("COMPLETED", checkpoint_before=500, checkpoint_after=500), FATAL, "without progress"),
        (outcome("DEADLINE"), FATAL, "DEADLINE"),
        (outcome("NOT_FOUND"), RETRY, "vanished"),
    ],
)
def test_default_classification(case, verdict, reason):
    result = classify(case)
    assert result.verdict == verdict and reason in result.reason


def test_node_failure_names_the_node_to_exclude():
    tail = (
        "srun: error: Task launch for StepId=7.0 failed on node lrdn0417: Communication connection failure\n"
        "srun: error: Node failure on lrdn0418\n"
    )
    result = classify(outcome("FAILED", tail))
    assert result.verdict == RETRY and result.exclude_nodes == ("lrdn0417", "lrdn0418")


def test_configured_rules_come_first():
    rules = rules_from_config([{"verdict": "fatal", "reason": "bad data", "pattern": "corrupt shard"}])
    from airflow_oellm.monitor.classify import DEFAULT_RULES

    assert classify(outcome("TIMEOUT", "corrupt shard 7"), [*rules, *DEFAULT_RULES]).reason == "bad data"


def test_progress_guard():
    assert progress_guard([None, 1000]) is None
    assert progress_guard([0, 1000, 1000]) is None  # one attempt without progress: retry once more
    assert "no progress over the last two attempts" in progress_guard([0, 1000, 1000, 1000])
    assert progress_guard([0, 0, 0]) is not None
    assert progress_guard([0, 500, 1000, 1500]) is None


def test_hang_detection_counts_only_running_time_and_any_movement():
    a = Activity(last_change=0.0)
    a = a.observe(10, running=False, log_size=0)  # pending for a long time is not a hang
    assert not a.is_hung(5000, 600)
    a = a.observe(5000, running=True, log_size=100, iteration=1)
    assert not a.is_hung(5500, 600)
    a = a.observe(5500, running=True, log_size=200)  # log grew
    assert not a.is_hung(6000, 600) and a.is_hung(6100, 600)
    a = a.observe(6050, running=True, log_size=200, mtimes={"/ckpt/latest": 6049.0})  # an output file changed
    assert not a.is_hung(6600, 600)
    a2 = Activity.from_dict(json.loads(json.dumps(a.to_dict())), now=0)
    assert a2 == a and a2.is_hung(6700, 600)


def run_probe(directory):
    out = subprocess.run(
        ["bash", "-c", checkpoints.probe_script(0, str(directory))], capture_output=True, text=True, check=True
    ).stdout
    return checkpoints.parse_probe(out.strip())[1]


def test_checkpoint_readiness_needs_tracker_and_complete_dir(tmp_path):
    save = tmp_path / "checkpoints"
    assert run_probe(save).tracker is None
    (save / "iter_0000500").mkdir(parents=True)  # being written: only the directory exists
    assert checkpoints.ready(run_probe(save), str(save), 500) is None
    (save / "iter_0000500" / "metadata.json").write_text("{}")
    assert checkpoints.ready(run_probe(save), str(save), 500) is None  # tracker not written yet
    (save / "latest_checkpointed_iteration.txt").write_text("500")
    found = checkpoints.ready(run_probe(save), str(save), 500)
    assert found.to_dict() == {"iteration": 500, "path": f"{save}/iter_0000500", "format": "torch_dist"}
    legacy = save / "iter_0001000" / "mp_rank_00"
    legacy.mkdir(parents=True)
    (legacy / "model_optim_rng.pt").write_bytes(b"x")
    (save / "latest_checkpointed_iteration.txt").write_text("1000\n")
    state = run_probe(save)
    assert state.complete == {500: "torch_dist", 1000: "torch"}
    assert checkpoints.ready(state, str(save), 700, at_least=True).iteration == 1000
    assert checkpoints.ready(state, str(save), 700) is None
    assert "does not exist" in checkpoints.never(state, 700)
    assert checkpoints.never(state, 1500) is None and checkpoints.never(state, 700, at_least=True) is None
    (save / "latest_checkpointed_iteration.txt").write_text("release")
    assert run_probe(save).tracker == "release"


RERUN_FIRST = (
    "ERROR:megatron.core.rerun_state_machine:Rank 5, node nid001234, device 5, iteration #1235: First rerun: "
    "unexpected result is reproducible within the tolerance (tensor(nan, device='cuda:5') = tensor(nan, "
    "device='cuda:5')). Need to rerun on a different GPU to verify correctness.!\n"
    "WARNING:megatron.core.rerun_state_machine:Saving a checkpoint and exiting now. Please resume the job from the "
    "checkpoint to rerun the last iteration and establish a diagnostic\n"
)
RERUN_PERSISTENT = (
    "WARNING:megatron.core.rerun_state_machine:Second rerun: unexpected result is not reproducible on a different "
    "GPU, therefore was likely incorrect\n"
    "ERROR:megatron.core.rerun_state_machine:Rank 5, node nid001777, device 5, iteration #1235: Possible persistent "
    "error!!\n"
    "WARNING:megatron.core.rerun_state_machine:Exiting now. A checkpoint at the last iteration already exists if "
    "further examination is needed\n"
)


@pytest.mark.parametrize(
    ("case", "verdict", "reason", "nodes", "progress_free"),
    [
        # Megatron's rerun state machine: 16 = resume from the checkpoint just saved, on another GPU
        (outcome("FAILED", RERUN_FIRST, exit_code=16, iterations_run=3), RETRY, "exit 16", ("nid001234",), True),
        (outcome("FAILED", RERUN_FIRST, exit_code=1, iterations_run=3), RETRY, "exit 16", ("nid001234",), True),
        (outcome("FAILED", "", exit_code=16, iterations_run=3), RETRY, "exit 16", (), True),
        # 17 = the result failed validation: the reason is Megatron's diagnosis
        (
            outcome("FAILED", RERUN_PERSISTENT, exit_code=17, iterations_run=0),
            FATAL,
            "(Megatron's rerun state machine, exit 17): Possible persistent error",
            (),
            False,
        ),
        (outcome("FAILED", "", exit_code=17), FATAL, "exit 17", (), False),
        # a diverged loss: N log intervals in a row with NaN (Megatron leaves the loss out and counts it)
        (outcome("TIMEOUT", nan_intervals=3), FATAL, "the loss diverged", (), False),
        (outcome("TIMEOUT", nan_intervals=2), RETRY, "time limit", (), False),
        (outcome("TIMEOUT", nan_intervals=9, nan_limit=0), RETRY, "time limit", (), False),
        (
            outcome(
                "FAILED",
                "RuntimeError: Rank 3, node nid001234, device 3, iteration 1234: Unexpected result nan "
                "(message='found NaN in local forward loss calculation')",
                iterations_run=4,
            ),
            FATAL,
            "NaN in the loss or the gradients (Megatron's check): Unexpected result nan",
            (),
            False,
        ),
        # hardware errors exclude the node; an NCCL timeout alone does not
        (
            outcome(
                "FAILED",
                "NVRM: Xid (PCI:0000:8a:00): 79, pid=1234, GPU has fallen off the bus.\n"
                "srun: error: lrdn0612: task 3: Exited with exit code 1\n",
                iterations_run=8,
            ),
            RETRY,
            "GPU hardware error",
            ("lrdn0612",),
            False,
        ),
        (
            outcome(
                "FAILED",
                "[Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE) ran for "
                "600000 milliseconds before timing out.\nProcessGroupNCCL's watchdog got stuck ... timeout\n"
                "srun: error: lrdn0612: task 3: Exited with exit code 1\n",
                iterations_run=8,
            ),
            RETRY,
            "NCCL / communication error",
            (),
            False,
        ),
    ],
)
def test_megatron_exits_and_faults(case, verdict, reason, nodes, progress_free):
    result = classify(case)
    assert (result.verdict, result.exclude_nodes, result.progress_free) == (verdict, nodes, progress_free), result
    assert reason in result.reason, result.reason


def test_configured_rules_match_exit_codes_and_name_nodes():
    rules = rules_from_config(
        [
            {
                "verdict": "retry",
                "reason": "site's flaky storage ({detail})",
                "exit_codes": [75],
                "pattern": r"(?P<detail>Lustre error \S+) on (?P<node>n\d+)",
                "node_pattern": r"Lustre error \S+ on (?P<node>n\d+)",
            }
        ]
    )
    from airflow_oellm.monitor.classify import DEFAULT_RULES

    tail = "LustreError: Lustre error -5 on n042\n"
    result = classify(outcome("FAILED", tail, exit_code=75), [*rules, *DEFAULT_RULES])
    assert (result.verdict, result.reason, result.exclude_nodes) == (
        RETRY,
        "site's flaky storage (Lustre error -5)",
        ("n042",),
    )
    assert classify(outcome("FAILED", tail, exit_code=1, iterations_run=3), [*rules, *DEFAULT_RULES]).reason == (
        "crashed (FAILED)"
    )


def test_config_rules_are_checked_when_the_sweep_loads(write, project):
    from typing import get_args

    from airflow_oellm.config import ConfigError, load_sweep
    from airflow_oellm.config.schema import ClassificationRuleConfig
    from airflow_oellm.config.validate import schema_fields
    from airflow_oellm.monitor.classify import WHEN

    # the schema offers exactly the facts the classifier knows
    when = schema_fields(ClassificationRuleConfig)["when"].type
    assert set(get_args(get_args(when)[0])) == set(WHEN)
    path = write(
        "config/sweeps/r.yaml",
        "defaults: [{platform: mini}]\nproject: {name: p, base_output_dir: /r}\nmonitoring:\n  rules:\n"
        "    - {verdict: retry, reason: x, states: [FAILD], pattern: '(unclosed'}\n",
    )
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert sorted(i.key for i in err.value.issues) == ["monitoring.rules[0].pattern", "monitoring.rules[0].states[0]"]
    assert "not a SLURM job state: 'FAILD'" in str(err.value)


def test_a_fault_megatron_could_not_reproduce_is_retried():
    # core 0.18+: the in-place rerun gave another result: a transient fault, exit 17 without a checkpoint
    tail = (
        "ERROR:megatron.core.rerun_state_machine:Rank 2, node nid000417, device 2, iteration #1402: First rerun: "
        "unexpected result is not reproducible within the tolerance (3.21 != nan)\n"
        "ERROR:megatron.core.rerun_state_machine:Rank 2, node nid000417, device 2, iteration #1402: Possible "
        "transient error!!\n"
        "WARNING:megatron.core.rerun_state_machine:Exiting now. The job can be resumed from a previous checkpoint\n"
    )
    result = classify(outcome("FAILED", tail, exit_code=17, iterations_run=5))
    assert result.verdict == RETRY and "transient fault" in result.reason and result.exclude_nodes == ()
