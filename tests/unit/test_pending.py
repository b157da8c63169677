"""Why a pending job waits: SLURM's reason codes (as `job_reason_string` spells them, 22.05 to 24.11) in
categories, the ones that never clear by themselves with their fix, and the start estimates' schedule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_oellm.slurm.commands import parse_start_estimates, start_estimates_section
from airflow_oellm.slurm.pending import (
    CATEGORY_LABELS,
    StartEstimates,
    pending_counts,
    queue_state,
)
from airflow_oellm.slurm.states import JobState, JobStatus

pytestmark = [pytest.mark.unit, pytest.mark.queue]

# (SLURM's text in squeue %r, category, clears by itself)
REASONS = [
    ("Priority", "priority", True),
    ("Resources", "resources", True),
    ("None", "scheduling", True),
    ("", "scheduling", True),
    ("Dependency", "dependency", True),
    ("DependencyNeverSatisfied", "dependency", False),
    ("BeginTime", "begin_time", True),
    ("JobHeldUser", "held", False),
    ("JobHeldAdmin", "held", False),
    ("JobHoldMaxRequeue", "held", False),
    ("launch failed requeued held", "held", False),
    ("Reservation", "reservation", True),
    ("ReqNodeNotAvail, Reserved_for_maintenance", "reservation", True),
    ("ReqNodeNotAvail, UnavailableNodes:nid[001001-001004]", "resources", True),
    ("Nodes_required_for_job_are_DOWN,_DRAINED_or_reserved_for_jobs_in_higher_priority_partitions", "resources",
     True),
    ("PartitionDown", "partition", True),
    ("PartitionTimeLimit", "too_big", False),
    ("PartitionNodeLimit", "too_big", False),
    ("PartitionConfig", "too_big", False),
    ("BadConstraints", "too_big", False),
    ("InvalidAccount", "not_allowed", False),
    ("InvalidQOS", "not_allowed", False),
    ("QOSNotAllowed", "not_allowed", False),
    ("AssocGrpGRESMinutes", "budget", False),
    ("AssocGrpCPUMinsLimit", "budget", False),
    ("AssocGrpBillingMinutes", "budget", False),
    ("QOSGrpGRESMinutes", "budget", False),
    ("AssocGrpGRESRunMinutes", "limits", True),  # running jobs' minutes come back as they end
    ("AssocGrpCPURunMinsLimit", "limits", True),
    ("QOSMaxWallDurationPerJobLimit", "too_big", False),
    ("AssocMaxWallDurationPerJobLimit", "too_big", False),
    ("QOSMaxGRESPerJob", "too_big", False),
    ("AssocMaxGRESPerNode", "too_big", False),
    ("AssocMaxGRESMinutesPerJob", "too_big", False),
    ("QOSMaxNodePerJobLimit", "too_big", False),
    ("QOSMinCPUsNotSatisfied", "too_big", False),
    ("QOSMaxGRESPerUser", "limits", True),
    ("QOSMaxJobsPerUserLimit", "limits", True),
    ("QOSMaxCpuPerUserLimit", "limits", True),
    ("AssocGrpGRES", "limits", True),
    ("AssocGrpCpuLimit", "limits", True),
    ("AssocMaxJobsLimit", "limits", True),
    ("AssociationJobLimit", "limits", True),
    ("QOSGrpNodeLimit", "limits", True),
    ("JobArrayTaskLimit", "limits", True),
    ("SomethingNewInSlurm26", "other", True),
]  # fmt: skip


@pytest.mark.parametrize(("reason", "category", "clears"), REASONS)
def test_every_slurm_reason_has_a_category_and_those_that_never_clear_have_a_fix(reason, category, clears):
    state = queue_state(reason, 1.8e9)
    assert (state.category, state.clears) == (category, clears), state
    assert state.reason == reason and state.expected_start == 1.8e9 and state.label == CATEGORY_LABELS[category]
    assert (state.fix is None) == clears, state  # a fix exactly where the job cannot start as it is
    assert state.to_dict()["label"] == state.label


def test_a_reason_that_never_clears_says_so_with_the_keys_to_change():
    wall = queue_state("QOSMaxWallDurationPerJobLimit").describe()
    assert wall.startswith("pending: QOSMaxWallDurationPerJobLimit (over a per-job limit); it will not start as")
    assert "slurm.time" in wall and "slurm.qos" in wall
    budget = queue_state("AssocGrpGRESMinutes").describe()
    assert "allocation of this resource is used up" in budget and "slurm.account" in budget
    assert queue_state("Priority").describe() == "pending: Priority (priority)"


@given(st.text(max_size=200))
def test_any_reason_text_gets_a_state_and_never_raises(text):
    state = queue_state(text)
    assert state.category in CATEGORY_LABELS and isinstance(state.clears, bool)


def test_the_start_estimates_section_asks_squeue_start_in_epoch_seconds_and_its_answer_is_read():
    section = start_estimates_section(["12", "13"])
    assert "SLURM_TIME_FORMAT=%s squeue --noheader --start --jobs=12,13 '--format=%A|%S'" in section
    # recorded from the dev cluster (SLURM 22.05): a job with --begin, a held one
    out = "@@squeue 0\n12|x\n@@end\n@@start 0\n12|1796664476\n13|N/A\n@@end\n"
    assert parse_start_estimates(out) == {"12": 1796664476.0, "13": None}
    assert parse_start_estimates("@@start 1\nslurm_load_jobs error: Invalid job id specified\n@@end\n") is None
    assert parse_start_estimates("@@squeue 0\n@@end\n") is None


def test_estimates_are_asked_for_pending_jobs_at_most_once_per_interval_and_dropped_once_they_run():
    estimates = StartEstimates(600.0)
    assert estimates.due(["1", "2"], 0.0) == []  # no cycle has seen them pending yet: no ask
    pending = {"1": JobStatus("1", JobState.PENDING), "2": JobStatus("2", JobState.PENDING)}
    assert estimates.estimated(pending)["1"].expected_start is None  # the first cycle: pending, not yet asked
    assert estimates.due(["1", "2", "3"], 0.0) == ["1", "2"]  # the pending ones of the jobs polled next
    got = estimates.estimated(pending, ["1", "2"], {"1": 5000.0}, now=0.0)
    assert (got["1"].expected_start, got["2"].expected_start) == (5000.0, None)
    assert estimates.due(["1", "2"], 599.0) == [] and estimates.due(["1"], 600.0) == ["1"]
    kept = estimates.estimated(pending)  # a cycle without an ask keeps the estimate
    assert kept["1"].expected_start == 5000.0
    failed = estimates.estimated(pending, ["1"], None, now=600.0)  # squeue --start failed: kept, not re-asked
    assert failed["1"].expected_start == 5000.0 and estimates.due(["1"], 700.0) == []
    running = estimates.estimated({"1": JobStatus("1", JobState.RUNNING)})
    assert running["1"].expected_start is None and estimates.estimates == {}
    assert estimates.due(["1"], 5000.0) == []  # it runs: nothing pending, no ask however long since the last
    zero = StartEstimates(0.0)
    zero.estimated(pending)
    assert zero.due(["1"], 0.0) == []  # 0: never


def test_pending_jobs_are_counted_per_reason_most_first():
    queues = [{"reason": "Priority"}, None, {"reason": "Resources"}, {"reason": "Priority"}, {"reason": ""}]
    assert pending_counts(queues) == {"Priority": 2, "Resources": 1, "not yet scheduled": 1}
