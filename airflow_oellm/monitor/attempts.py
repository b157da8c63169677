"""What one attempt of a job task means, decided without Airflow.

`job_settings` reads what a task needs to know about its job (paths, watch settings, rules) from the
experiment config it was given, or from its own arguments for a plain script. `decide_attempt` takes
an ended job's event, the checkpoint it left and the task's attempt history, and returns the verdict
(success, retry, fatal), the attempt's record, the new history, the task's result and the state the
sensors beside the task must see. The submit operator only stores, pushes and raises what it returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from airflow_oellm.config.errors import ConfigError
from airflow_oellm.config.milestones import job_config, retention_branches, typed
from airflow_oellm.config.naming import job_paths, script_file
from airflow_oellm.config.schema import RootConfig
from airflow_oellm.monitor.accounting import attempt_used_gpu_hours
from airflow_oellm.monitor.anomalies import AnomalySettings, Divergence
from airflow_oellm.monitor.classify import (
    DEFAULT_RULES,
    FATAL,
    NAN_INTERVALS,
    RETRY,
    STOPPED,
    SUCCESS,
    Classification,
    Rule,
    attempt_outcome,
    classify,
    progress_guard,
    rules_from_config,
)
from airflow_oellm.monitor.outage import DEFAULT_MAX_OUTAGE_SECONDS, max_outage_seconds
from airflow_oellm.monitor.records import AttemptHistory, AttemptRecord, TrainingState
from airflow_oellm.monitor.retention import RetentionSettings
from airflow_oellm.monitor.watch import PROGRESS_CURVE, merged_curve, thinned
from airflow_oellm.notifications import hears
from airflow_oellm.slurm.identity import stop_request_path
from airflow_oellm.slurm.pending import DEFAULT_START_ESTIMATE_INTERVAL
from airflow_oellm.slurm.states import JobState, JobStatus

MAX_ATTEMPT_FAULTS = 5  # fault lines kept per attempt in the history
DEFAULT_POLL_INTERVAL = 60.0  # seconds, for a script job without a config


class JobSettingsError(ValueError):
    """A task's experiment config, or the side job asked of it, cannot be built (the message says which)."""


@dataclass(frozen=True)
class JobSettings:
    """Where a task's job writes and how it is watched and judged."""

    config: RootConfig | None  # None: a plain script
    training: bool  # success needs Megatron's "training is done" and the progress guard applies
    output_dir: str
    name: str
    log_path: str  # with SLURM's %j
    script_dir: str
    checkpoint_dir: str | None
    events: list[dict[str, Any]]
    inactivity: float | None
    # NaN intervals that make the watch stop a job (0: it never does: not Megatron's log) and that
    # make the classifier call an ended one diverged; two settings, as they have always been
    stop_nan_limit: int
    classify_nan_limit: int
    anomalies: AnomalySettings  # the spike rules the watch applies to the iteration lines
    max_rewinds: int  # rewinds of a diverged training (0: none; the watch then stops no job for a spike)
    skip_data: bool  # a rewound training skips the batches of the divergence
    exclude_diverged_nodes: bool  # ... and avoids the nodes the diverged job ran on
    lowered_rate: tuple[float, int] | None  # ... and trains (multiplier, iterations) at a lowered learning rate
    retention: RetentionSettings | None  # checkpoint retention while it trains (None: every one kept)
    retention_branches: dict[int, list[str]]  # the status files of the branches from each checkpoint
    output_paths: list[str]
    poll_interval: float
    gpus: int | None  # what the job holds, for its GPU-hours (None: unknown, a plain script)
    max_outage: float | None  # seconds a watch waits out an unreachable cluster (None: for ever)
    on_outage: str | None  # dotted path of platform.on_outage.callback
    notify_outage_after: float | None  # seconds of outage before the callback and `outage` alerts (None: neither)
    rules: list[Rule]  # the task's own rules, then the config's, then the defaults
    # an experiment's training: where its sweep's early stopping asks it to stop (read with each poll cycle)
    stop_request_path: str | None = None
    start_estimate_interval: float = DEFAULT_START_ESTIMATE_INTERVAL  # seconds between `squeue --start` (0: never)

    def script_path(self, try_number: int) -> str:
        return f"{self.script_dir}/{script_file(self.name, try_number)}"


def attempt_rules(config_rules: Sequence[Mapping[str, Any]], own: Sequence[Mapping[str, Any]] = ()) -> list[Rule]:
    """A task's classification rules: its own first, then its config's, then the defaults."""
    return [*rules_from_config([*own, *config_rules]), *DEFAULT_RULES]


def job_settings(
    *,
    experiment: Mapping[str, Any] | None,
    job: Mapping[str, Any] | None,
    task_id: str,
    expects_training: bool | None = None,
    job_name: str | None = None,
    output_dir: str | None = None,
    log_path: str | None = None,
    checkpoint_dir: str | None = None,
    log_events: Sequence[Mapping[str, Any]] = (),
    classification_rules: Sequence[Mapping[str, Any]] = (),
    inactivity_threshold: float | None = None,
    output_paths: Sequence[str] = (),
    poll_interval: float | None = None,
) -> JobSettings:
    """A task's settings: from `experiment` (and `job`, a side job of it) when given, else from its own
    arguments (a script in `output_dir`)."""
    own_events = [dict(e) for e in log_events]
    if experiment is None:
        output = (output_dir or "").rstrip("/")
        name = job_name or task_id
        paths = job_paths(name, output)
        return JobSettings(
            config=None,
            training=bool(expects_training),
            output_dir=output,
            name=name,
            log_path=log_path or paths["log_path"],
            script_dir=paths["script_dir"],
            checkpoint_dir=checkpoint_dir,
            events=own_events,
            inactivity=inactivity_threshold,
            stop_nan_limit=0,
            classify_nan_limit=NAN_INTERVALS,
            anomalies=AnomalySettings.from_config(),
            max_rewinds=0,
            skip_data=False,
            exclude_diverged_nodes=False,
            lowered_rate=None,
            retention=None,
            retention_branches={},
            output_paths=list(output_paths),
            poll_interval=poll_interval or DEFAULT_POLL_INTERVAL,
            gpus=None,
            max_outage=DEFAULT_MAX_OUTAGE_SECONDS,
            on_outage=None,
            notify_outage_after=None,
            rules=attempt_rules([], classification_rules),
        )
    config = dict(experiment)
    if job:
        try:
            config = job_config(config, dict(job))
        except ConfigError as exc:
            raise JobSettingsError(f"cannot build {dict(job)}: {exc}") from None
    try:
        cfg = typed(config)
    except ConfigError as exc:
        raise JobSettingsError(f"invalid experiment config: {exc}") from None
    megatron = cfg.backend.name == "megatron"
    # an experiment's own training may be asked to stop by its sweep's early stopping (a cooldown is not)
    stoppable = megatron and not job
    e, m, notifier = cfg.experiment, cfg.monitoring, cfg.platform.on_outage
    retention = RetentionSettings.from_config(cfg.retention) if megatron else None
    branches = {}
    if retention is not None and not job:  # the training's checkpoints have branches; a cooldown's last is kept
        try:
            branches = retention_branches(config)
        except ConfigError as exc:
            raise JobSettingsError(f"invalid experiment config: {exc}") from None
    return JobSettings(
        config=cfg,
        training=megatron if expects_training is None else expects_training,
        output_dir=e.output_dir,
        name=job_name or e.name,
        log_path=e.log_path,
        script_dir=e.script_dir,
        checkpoint_dir=checkpoint_dir or (cfg.backend.args.get("save") if megatron else None),
        events=[*(vars(x) for x in m.log_events), *own_events],
        inactivity=inactivity_threshold or m.inactivity_threshold_seconds,
        stop_nan_limit=m.nan_intervals if megatron else 0,
        classify_nan_limit=m.nan_intervals,
        anomalies=AnomalySettings.from_config(m.anomalies, m.nan_intervals),
        max_rewinds=m.anomalies.rewind.max_rewinds if megatron else 0,
        skip_data=m.anomalies.rewind.skip_data,
        exclude_diverged_nodes=m.anomalies.rewind.exclude_nodes,
        lowered_rate=(remedy.multiplier, remedy.iterations) if (remedy := m.anomalies.rewind.learning_rate) else None,
        retention=retention,
        retention_branches=branches,
        output_paths=[*m.output_paths, *output_paths],
        poll_interval=poll_interval or m.poll_interval_seconds,
        start_estimate_interval=m.start_estimate_interval_seconds,
        gpus=cfg.slurm.nodes * cfg.slurm.gpus_per_node,
        max_outage=max_outage_seconds(cfg.platform.max_outage),
        on_outage=notifier.callback,
        notify_outage_after=(
            max_outage_seconds(notifier.after)
            if notifier.callback or hears([asdict(n) for n in cfg.notifications.notify], "outage")
            else None
        ),
        rules=attempt_rules([vars(r) for r in m.rules], classification_rules),
        stop_request_path=stop_request_path(e.output_dir) if stoppable else None,
    )


def training_state_after(verdict: str, try_number: int, retries: int) -> TrainingState:
    """The state the sensors beside a task see once a try ended with `verdict` (a failed submission
    is a RETRY, or FATAL when retrying cannot help)."""
    if verdict == SUCCESS:
        return TrainingState.COMPLETED
    if verdict == STOPPED:
        return TrainingState.STOPPED
    if verdict == FATAL or try_number > retries:
        return TrainingState.FAILED
    return TrainingState.RETRYING


@dataclass(frozen=True)
class AttemptDecision:
    classification: Classification
    attempt: AttemptRecord
    history: AttemptHistory
    result: dict[str, Any]  # the task's return value on success, its `result` XCom otherwise
    training_state: TrainingState

    @property
    def status_fields(self) -> dict[str, Any]:
        """What the status file says besides the state: the checkpoint, and why when it did not succeed."""
        fields: dict[str, Any] = {"iteration": self.result["checkpoint"]}
        if self.classification.verdict != SUCCESS:
            fields = {"reason": self.classification.reason, **fields}
        return fields


def decide_attempt(
    history: AttemptHistory,
    try_number: int,
    retries: int,
    ended: Mapping[str, Any],
    checkpoint_after: int | None,
    settings: JobSettings,
) -> AttemptDecision:
    """The verdict on a try whose job has ended (`ended`: the watch's finished event, see
    `JobWatch.result`), with the checkpoint the job left."""
    status = JobStatus.from_dict(ended["status"]) if ended.get("status") else JobStatus.not_found(ended["job_id"])
    summary = ended.get("summary") or {}
    # the submission's record; lost with the task's store, the attempt is judged from what is known
    attempt = history.get(try_number) or AttemptRecord(try_number, ended["job_id"])
    outcome = attempt_outcome(
        status.state,
        summary,
        ended.get("tail", ""),
        exit_code=status.exit_code,
        cancelled_by=status.cancelled_by,
        hang=bool(ended.get("hang")),
        cancelled_by_us=bool(ended.get("cancelled_by_us")),
        checkpoint_before=attempt.checkpoint_before,
        checkpoint_after=checkpoint_after,
        training=settings.training,
        nan_limit=settings.classify_nan_limit,
    )
    divergence, stopped = ended.get("divergence"), ended.get("stopped_early")
    rewind = None
    if isinstance(stopped, Mapping) and settings.training and not outcome.training_done:
        verdict = Classification(STOPPED, str(stopped.get("reason") or "stopped early"))
    elif divergence and settings.training and not outcome.training_done:
        verdict, rewind = rewind_verdict(history, try_number, Divergence.from_dict(divergence), ended, settings)
    else:
        verdict = classify(outcome, settings.rules)
        lowered = history.learning_rate(attempt.checkpoint_before)
        stop_at = lowered[1] if lowered else None
        told = status.state is JobState.COMPLETED and outcome.checkpoint_after == stop_at
        if verdict.verdict == RETRY and stop_at is not None and told:
            # the job a rewind lowered the learning rate of stopped where it was told to (--exit-interval)
            reason = f"learning rate x{lowered[0]:g} until {stop_at} done: the next job trains at the configured one"
            verdict = replace(verdict, reason=reason)
    if verdict.verdict == RETRY and settings.training and not verdict.progress_free:
        # a resume the rerun state machine asked for saves no new checkpoint by design
        earlier = [a for a in history.attempts if a.try_number != try_number and not a.progress_free]
        checkpoints = [(earlier or [attempt])[0].checkpoint_before]
        checkpoints += [a.checkpoint_after for a in earlier] + [outcome.checkpoint_after]
        guard = progress_guard(checkpoints)
        if guard:
            verdict = Classification(FATAL, f"{verdict.reason}; {guard}", verdict.exclude_nodes)
    # a job that resumed at the very end (its predecessor stopped right after the last
    # iteration) logs no iteration: it is where it resumed
    last_iteration = summary.get("last_iteration")
    if last_iteration is None:
        last_iteration = summary.get("resumed_from") or None
    attempt = replace(
        attempt,
        start=status.start,
        end=status.end,
        gpu_hours=attempt_used_gpu_hours(status.start, status.end, settings.gpus),
        state=status.state.value,
        raw_state=status.raw_state,
        exit_code=status.exit_code,
        verdict=verdict.verdict,
        reason=verdict.reason,
        progress_free=verdict.progress_free,
        checkpoint_after=outcome.checkpoint_after,
        last_iteration=last_iteration,
        resumed_from=summary.get("resumed_from"),
        # what the dashboard draws of earlier attempts (their XComs go with their try)
        loss_curve=thinned(summary.get("loss_curve", []), PROGRESS_CURVE),
        validation=summary.get("validation", []),
        checkpoints_saved=summary.get("checkpoints_saved", []),
        faults=summary.get("faults", [])[:MAX_ATTEMPT_FAULTS],
        iteration_ms=summary.get("iteration_ms"),
        rewind=rewind,
        nodes=status.nodes,
        excluded_nodes=list(verdict.exclude_nodes),
    )
    history = history.put(attempt).excluding(verdict.exclude_nodes)
    attempts = history.to_dict()["attempts"]
    result = {
        "job_ids": jobs_of(attempts),
        "final_state": status.state.value,
        "classification": verdict.to_dict(),
        "last_iteration": last_iteration,
        # after a rewind the training is back at its target: where it resumes, what the sensors wait from
        "checkpoint": (rewind["rewind_to"] or 0) if rewind else outcome.checkpoint_after,
        "events": summary.get("counts", {}),
        "summary": summary,
        "attempts": attempts,
    }
    state = training_state_after(verdict.verdict, try_number, retries)
    return AttemptDecision(verdict, attempt, history, result, state)


def rewind_verdict(
    history: AttemptHistory, try_number: int, d: Divergence, ended: Mapping[str, Any], settings: JobSettings
) -> tuple[Classification, dict[str, Any] | None]:
    """A diverged training: rewound (a retry that resumes from the checkpoint before the divergence and
    skips its batches), or failed once `max_rewinds` rewinds were used; and the attempt's rewind record.
    Either way the save directory goes back to that checkpoint (the operator does it), so that no resume,
    a manual one included, loads the diverged weights."""
    done = [a for a in history.rewinds if a.try_number != try_number]
    skipped = d.skipped() if settings.skip_data else []
    target = f"checkpoint {d.rewind_to}" if d.rewind_to else "the start"
    lowered = None
    if settings.lowered_rate is not None:
        multiplier, iterations = settings.lowered_rate
        until = lowered_until(d.rewind_to or 0, iterations, [*history.skipped_iterations(), *skipped])
        lowered = {"multiplier": multiplier, "until": until}
    record = {
        "id": f"rewind-{len(done) + 1}-job{ended['job_id']}",
        **d.to_dict(),
        "skipped": [skipped[0], skipped[-1]] if skipped else None,
        "discarded": None,
        "learning_rate": None,
    }
    if len(done) >= settings.max_rewinds:
        reason = f"the loss diverged ({d.describe()}, no recovery) after {len(done)} rewind(s)"
        earlier = "; ".join(str(a.reason) for a in done)
        reason = f"{reason}: {earlier}" if earlier else reason
        return Classification(FATAL, f"{reason}; the save directory is back at {target}"), record
    record["learning_rate"] = lowered
    reason = f"rewind: {d.describe()} -> {target}"
    if skipped:
        reason += f", skipping {skipped[0]}-{skipped[-1]}"
    if lowered:
        reason += f", learning rate x{lowered['multiplier']:g} until {lowered['until']}"
    nodes = (ended.get("status") or {}).get("nodes") if settings.exclude_diverged_nodes else None
    if nodes:  # a SLURM node list (`nid[001-004]`): --exclude takes it as it is
        reason += f", avoiding {nodes}"
    # a rewind loses progress by design: the progress guard does not hold it against the training
    return Classification(RETRY, reason, (nodes,) if nodes else (), progress_free=True), record


def lowered_until(rewind_to: int, iterations: int, skipped: Sequence[int]) -> int:
    """The iteration a rewound training's lowered learning rate ends at: the last of `iterations` trained
    iterations after `rewind_to`, the `skipped` ones not counted. The job stops there (`--exit-interval`), and it
    can: Megatron checks that only on the iterations it trains."""
    until = rewind_to + iterations
    for iteration in sorted(set(skipped)):
        if rewind_to < iteration <= until:
            until += 1
    return until


def loss_baseline(history: AttemptHistory, resumes_from: int | None, settings: JobSettings) -> list[float]:
    """The training's last losses at or before the checkpoint a new job resumes from, without what rewinds
    discarded: the new job's spike detector starts from them (as many as its baseline holds)."""
    window = max((r.window for r in settings.anomalies.rules if r.event == "loss_spike"), default=0)
    if not resumes_from or not window:
        return []
    kept, _ = history.rewound_curves()
    losses = [loss for iteration, loss in merged_curve(kept) if iteration <= resumes_from]
    return losses[-window:]


def lost_contact_result(history: AttemptHistory, message: str) -> dict[str, Any]:
    """What a try that lost the cluster leaves as its `result`: the attempts so far, so that the report
    counts their GPU-hours and curves as the dashboard does from the history, and why nothing more is known."""
    attempts = history.to_dict()["attempts"]
    return {"job_ids": jobs_of(attempts), "attempts": attempts, "lost_contact": message}


def jobs_of(attempts: Sequence[Mapping[str, Any]]) -> list[str]:
    """The jobs the attempts ran, each once: a try that took over an earlier try's job (that try died
    before judging it) is a second record of the same job."""
    return list(dict.fromkeys(a["job_id"] for a in attempts if a.get("job_id")))
