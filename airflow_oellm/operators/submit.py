"""SlurmSubmitOperator: submit a training job exactly once, follow it, and turn its end into
success, an Airflow retry (resume from the checkpoint) or a fatal failure.

    train = SlurmSubmitOperator(task_id="train", ssh_conn_id="lumi", experiment=prepare.output["config"])

The job is described either by a resolved experiment config (rendered with the platform's sbatch
template) or by a script text plus an output directory. Retries resubmit into the same output
directory, so Megatron resumes from `latest_checkpointed_iteration.txt`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator, Connection, Variable
from airflow.sdk.definitions.template import literal
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException
from airflow.sdk.log import mask_secret

from airflow_oellm.config.errors import ConfigError
from airflow_oellm.config.milestones import (
    EVALUATE,
    evaluation_files,
    resume_own_checkpoint,
    skipping_iterations,
    typed,
    with_learning_rate,
)
from airflow_oellm.config.naming import (
    HISTORY_KEY,
    JOB_ID_KEY,
    LOG_PATH_KEY,
    PROGRESS_KEY,
    RESULT_KEY,
    SCRIPT_PATH_KEY,
    TRAIN_TASK,
    script_key,
)
from airflow_oellm.config.schema import RootConfig
from airflow_oellm.config.secrets import SecretError, resolve_secrets
from airflow_oellm.hooks.alerting import OutageAlerts, dashboard_link, send_alert
from airflow_oellm.hooks.slurm import SlurmHook, task_cluster
from airflow_oellm.jobscript.render import JobSpec, render_sbatch
from airflow_oellm.links.tracking import TensorBoardLink, WandbRunLink
from airflow_oellm.monitor.attempts import (
    JobSettings,
    JobSettingsError,
    decide_attempt,
    job_settings,
    loss_baseline,
    lost_contact_result,
    training_state_after,
)
from airflow_oellm.monitor.classify import FATAL, RETRY, STOPPED, SUCCESS
from airflow_oellm.monitor.early_stop import STOP_REQUEST_LIMIT, StopRequest
from airflow_oellm.monitor.records import AttemptHistory, AttemptRecord, TrainingState, TrainingStatus
from airflow_oellm.monitor.retention import retention_notice
from airflow_oellm.monitor.watch import STATE_READ_LIMIT, JobFollower, WatchState
from airflow_oellm.notifications import Alert, first_to_tell, notifier_callable, tell
from airflow_oellm.pause_points import pause_point
from airflow_oellm.slurm.commands import SlurmCommandError
from airflow_oellm.slurm.identity import JobIdentity, monitor_state_path, task_status_path
from airflow_oellm.slurm.operations import PollUpdate, SubmissionConflict
from airflow_oellm.slurm.pending import StartEstimates
from airflow_oellm.slurm.states import JobState
from airflow_oellm.slurm.target import DEFAULT_SSH_CONN_ID, ClusterTarget
from airflow_oellm.triggers.base import settle_deadline
from airflow_oellm.triggers.job import SlurmJobTrigger


def _references(value: Any) -> bool:
    """Holds an XCom or mapped-argument reference (it has `resolve`, as Airflow's templater checks)."""
    if isinstance(value, Mapping):
        return any(_references(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_references(v) for v in value)
    return callable(getattr(value, "resolve", None))


def as_data(value: Any) -> Any:
    """A plain mapping is taken literally (no Jinja inside configs); references resolve at run time."""
    if isinstance(value, Mapping) and not _references(value):
        return literal(dict(value))
    return value


def looked_up_secrets(references: Mapping[str, str]) -> dict[str, str]:
    """Secret references (`var:<key>`, `conn:<id>/<field>`) looked up now, each value masked in every log of
    this process; one that cannot be found fails the task."""
    try:
        values = resolve_secrets(references, Variable.get, Connection.get)
    except SecretError as exc:
        raise AirflowFailException(str(exc)) from None
    for value in values.values():
        mask_secret(value)
    return values


def typed_config(experiment: Mapping[str, Any]) -> RootConfig:
    try:
        return typed(dict(experiment))
    except ConfigError as exc:
        raise AirflowFailException(f"invalid experiment config: {exc}") from None


class SlurmSubmitOperator(BaseOperator):
    """Submit a SLURM job over SSH exactly once and (by default) wait for it in the triggerer.

    :param ssh_conn_id: Airflow SSH connection to the cluster's login node (the usual case).
    :param cluster: where jobs run, any `ClusterTarget` instead: this machine's shell (Airflow on a login
        node) or local background processes (no SLURM).
    :param experiment: a resolved experiment config (what `airflow-oellm` plans); renders the script.
        Not Jinja-rendered (it is data); an XCom reference resolves at run time.
    :param job: run a side job of `experiment` instead of its training: `{"kind": "cooldown" | "convert" |
        "evaluate", "iteration": n, "suite": name, "cooldown": i}` (see config/milestones.py).
    :param expects_training: success needs Megatron's "training is done" line (default: for a
        Megatron experiment; False for commands and scripts, whose COMPLETED is success).
    :param script: a complete sbatch script instead of `experiment` (needs `output_dir`).
    :param output_dir: the job's stable output directory (with `script`).
    :param log_path: SLURM log path with `%j`; default `<output_dir>/logs/<job_name>-%j.out`.
    :param sbatch_options: extra `sbatch` command-line options.
    :param secret_variables: environment variable -> `var:<Variable key>` or `conn:<id>/<field>` (a bare
        value is a Variable key), beside the config's `platform.secrets`; values reach the job's
        environment on stdin, never a script, log or XCom.
    :param log_events: extra log events (the seed guide's format); Megatron's are built in.
    :param classification_rules: rules tried before the defaults (verdict, reason, states, pattern, when).
    :param inactivity_threshold: seconds of RUNNING without log growth or progress that make a hang.
    :param output_paths: files whose modification time also counts as activity.
    :param checkpoint_dir: Megatron's save directory (progress guard, resume accounting).
    :param poll_interval: seconds between status polls.
    :param wait_for_completion: follow the job until it ends (else return after submitting).
    :param deferrable: wait in the triggerer (no worker slot held); False polls from the worker.
    """

    template_fields: Sequence[str] = (
        "experiment",
        "job",
        "script",
        "output_dir",
        "log_path",
        "job_name",
        "sbatch_options",
        "checkpoint_dir",
    )
    template_fields_renderers = {"script": "bash"}
    ui_color = "#e8f1fa"
    operator_extra_links = (WandbRunLink(), TensorBoardLink())

    def __init__(
        self,
        *,
        ssh_conn_id: str | None = DEFAULT_SSH_CONN_ID,
        cluster: ClusterTarget | None = None,
        experiment: Mapping[str, Any] | Any | None = None,
        job: Mapping[str, Any] | Any | None = None,
        expects_training: bool | None = None,
        script: str | None = None,
        output_dir: str | None = None,
        job_name: str | None = None,
        log_path: str | None = None,
        sbatch_options: Sequence[str] = (),
        secret_variables: Mapping[str, str] | None = None,
        log_events: Sequence[Mapping[str, Any]] = (),
        classification_rules: Sequence[Mapping[str, Any]] = (),
        inactivity_threshold: float | None = None,
        output_paths: Sequence[str] = (),
        checkpoint_dir: str | None = None,
        poll_interval: float | None = None,
        wait_for_completion: bool = True,
        deferrable: bool = True,
        template_dirs: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        cluster = task_cluster(ssh_conn_id, cluster, kwargs)
        super().__init__(**kwargs)
        if (experiment is None) == (script is None):
            raise ValueError(f"{self.task_id}: give either experiment= or script=")
        if script is not None and not output_dir:
            raise ValueError(f"{self.task_id}: script= needs output_dir=")
        self.cluster = cluster
        # a config is data, not a template: only XCom references in it are resolved
        self.experiment = as_data(experiment)
        self.job = as_data(job)
        self.expects_training = expects_training
        self.script = script
        self.output_dir = output_dir
        self.job_name = job_name
        self.log_path = log_path
        self.sbatch_options = list(sbatch_options)
        self.secret_variables = dict(secret_variables or {})
        self.log_events = [dict(e) for e in log_events]
        self.classification_rules = [dict(r) for r in classification_rules]
        self.inactivity_threshold = inactivity_threshold
        self.output_paths = list(output_paths)
        self.checkpoint_dir = checkpoint_dir
        self.poll_interval = poll_interval
        self.wait_for_completion = wait_for_completion
        self.deferrable = deferrable
        self.template_dirs = [str(d) for d in template_dirs]  # a project's templates/, before the package's

    # ---------------------------------------------------------------- settings

    def _settings(self) -> JobSettings:
        try:
            return job_settings(
                experiment=self.experiment,
                job=self.job,
                task_id=self.task_id,
                expects_training=self.expects_training,
                job_name=self.job_name,
                output_dir=self.output_dir,
                log_path=self.log_path,
                checkpoint_dir=self.checkpoint_dir,
                log_events=self.log_events,
                classification_rules=self.classification_rules,
                inactivity_threshold=self.inactivity_threshold,
                output_paths=self.output_paths,
                poll_interval=self.poll_interval,
            )
        except JobSettingsError as exc:
            raise AirflowFailException(str(exc)) from None

    def _secrets(self, s: JobSettings) -> dict[str, str]:
        """The job's secrets, looked up now: the config's `platform.secrets`, then this task's own (a bare
        value there is a Variable key, as in 0.1). Masked in every log of this process."""
        references = dict(s.config.platform.secrets) if s.config is not None else {}
        for env, text in self.secret_variables.items():
            references[env] = text if text.startswith(("var:", "conn:")) else f"var:{text}"
        return looked_up_secrets(references)

    def _hook(self) -> SlurmHook:
        return SlurmHook(cluster=self.cluster)

    # ---------------------------------------------------------------- submit

    def execute(self, context: Any) -> Any:
        if self.job and self.job.get("kind") == EVALUATE and not self.job.get("suites"):
            # a cooldown's branch converts its final checkpoint whatever its suites; none may be due
            raise AirflowSkipException("no evaluation suite is due for this checkpoint")
        ti = context["ti"]
        s = self._settings()
        store = context.get("task_state_store")
        history = AttemptHistory.from_dict(store.get(HISTORY_KEY) if store is not None else None)
        map_index = ti.map_index if ti.map_index is not None else -1
        identity = JobIdentity(ti.dag_id, ti.run_id, ti.task_id, map_index, ti.try_number, s.output_dir)
        hook = self._hook()
        try:
            script_path = s.script_path(ti.try_number)
            try:
                history = self._finish_rewinds(hook, s, history, store)
                self._resume_if_stopped(hook, s, history, ti)
                before = self._checkpoint(hook, s)
                script = self._script(s, history, before)
                hook.mkdirs([s.output_dir, s.log_path.rsplit("/", 1)[0], s.script_dir])
                hook.upload(script_path, script, mode="0700")
                if store is not None:  # the experiment page shows what each try submitted
                    store.set(script_key(ti.try_number), script)
                secrets = self._secrets(s)
                if s.on_outage:
                    try:
                        notifier_callable(s.on_outage)  # refused now, not found missing during an outage
                    except ImportError as exc:
                        raise AirflowFailException(str(exc)) from None
                # jobs a try has judged; the latest earlier try's job, ended and judged by none, is taken over
                decided = [a.job_id for a in history.attempts if a.ended and a.job_id] if store is not None else None
                outcome = hook.submit_once(
                    identity, script_path, options=self.sbatch_options, secrets=secrets, decided=decided
                )
                if (
                    outcome.kind == "ended"
                    and hook.job_status(outcome.job_id).state is JobState.CANCELLED
                    and not self._cancelled_by_its_watch(hook, s, identity, outcome.job_id, outcome.try_number)
                ):
                    # stopped with its task (marked failed, an orphan): a try that runs again trains again;
                    # a job its own watch stopped (a hang, a divergence) is judged like any ended job
                    self.log.info(
                        "job %s of try %s was cancelled while no try followed it: submitting a new one",
                        outcome.job_id,
                        outcome.try_number,
                    )
                    outcome = hook.submit_once(
                        identity,
                        script_path,
                        options=self.sbatch_options,
                        secrets=secrets,
                        decided=[*(decided or ()), outcome.job_id],
                    )
                pause_point("after-sbatch", ti.dag_id)  # tests kill the worker here: the job id is not saved yet
            except Exception as exc:
                # sensors beside this task must learn that no job is coming (this try, or ever)
                hopeless = isinstance(exc, SubmissionConflict | AirflowFailException)
                state = training_state_after(FATAL if hopeless else RETRY, ti.try_number, self.retries or 0)
                with contextlib.suppress(Exception):
                    self._write_status(hook, s, ti, state, None, None, reason=f"submission failed: {exc}")
                if isinstance(exc, SubmissionConflict):
                    raise AirflowFailException(str(exc)) from None
                raise
            log_path = s.log_path.replace("%j", outcome.job_id)
            self._job_id = outcome.job_id
            self.log.info("%s job %s (try %d) -> log %s", outcome.kind, outcome.job_id, ti.try_number, log_path)
            watched = identity
            if outcome.kind == "ended" and outcome.try_number is not None:
                self.log.info("job %s of try %d ended unjudged: taking its result", outcome.job_id, outcome.try_number)
                earlier = history.get(outcome.try_number)
                before = earlier.checkpoint_before if earlier is not None else None
                watched = replace(identity, try_number=outcome.try_number)  # its watch state, where it stopped
            attempt = AttemptRecord(ti.try_number, outcome.job_id, before, outcome.kind, log_path, time.time(), s.gpus)
            if store is not None:
                store.set(HISTORY_KEY, history.put(attempt).to_dict())
            ti.xcom_push(key=JOB_ID_KEY, value=outcome.job_id)
            ti.xcom_push(key=LOG_PATH_KEY, value=log_path)
            ti.xcom_push(key=SCRIPT_PATH_KEY, value=script_path)
            self._write_status(hook, s, ti, TrainingState.RUNNING, outcome.job_id, log_path)
        finally:
            hook.close()
        if not self.wait_for_completion:
            return {"job_id": outcome.job_id, "log_path": log_path, "script_path": script_path}
        trigger_args = self._watch_args(s, watched, outcome.job_id, log_path)
        trigger_args["loss_baseline"] = loss_baseline(history, before, s) if s.training else []
        if self.deferrable:
            trigger = SlurmJobTrigger(**trigger_args, fire_after=settle_deadline())
            self.defer(trigger=trigger, method_name="execute_complete")
        return self._finish(context, self._watch_here(trigger_args, ti))

    def _resume_if_stopped(self, hook: SlurmHook, s: JobSettings, history: AttemptHistory, ti: Any) -> None:
        """A try after one the sweep's early stopping stopped (a skipped task is not retried: a user cleared it
        to train on): its stop request stands no more, and the sweep never stops a point twice at one rung."""
        last = next((a for a in reversed(history.attempts) if a.ended), None)
        cleared = last.verdict == STOPPED if last is not None else ti.try_number > 1  # the history may be gone
        if not s.stop_request_path or not cleared:
            return
        request = StopRequest.from_json(hook.read_range(s.stop_request_path, 0, STOP_REQUEST_LIMIT).data)
        if request is not None and request.standing_for(ti.run_id):
            hook.write_files([(s.stop_request_path, replace(request, resumed=True).to_json())])
            self.log.info("training on after %s: the task was cleared", request.reason)

    @staticmethod
    def _cancelled_by_its_watch(
        hook: SlurmHook, s: JobSettings, identity: JobIdentity, job_id: str, try_number: int | None
    ) -> bool:
        """Whether the watch of the try that submitted `job_id` cancelled it (its saved state says so)."""
        if try_number is None:
            return False
        saved = hook.read_range(monitor_state_path(replace(identity, try_number=try_number)), 0, STATE_READ_LIMIT)
        state = WatchState.from_json(saved.data, job_id, s.log_path.replace("%j", job_id)) if saved.data else None
        return state is not None and state.cancelled_by_us

    def _watch_args(self, s: JobSettings, identity: JobIdentity, job_id: str, log_path: str) -> dict[str, Any]:
        """What follows the job: the trigger's arguments, or the worker's own polling loop's."""
        return {
            "job_id": job_id,
            "log_path": log_path,
            "state_path": monitor_state_path(identity),
            "cluster": self.cluster,
            "events": s.events,
            "inactivity_threshold": s.inactivity,
            "nan_limit": s.stop_nan_limit,
            "anomalies": s.anomalies.to_dict(),
            "rewind": s.training and s.max_rewinds > 0 and bool(s.checkpoint_dir),
            "retention": s.retention.to_dict() if s.training and s.retention and s.checkpoint_dir else None,
            "checkpoint_dir": s.checkpoint_dir,
            "branches": {str(k): v for k, v in s.retention_branches.items()},
            "status_path": task_status_path(s.output_dir, identity.task_id),
            # what _write_status wrote at submission: the watch adds `suspect_from` while the loss is wrong
            "status": TrainingStatus(
                TrainingState.RUNNING, identity.run_id, identity.try_number, job_id, log_path, time.time()
            ).to_json(),
            "output_paths": s.output_paths,
            "poll_interval": s.poll_interval,
            "start_estimate_interval": s.start_estimate_interval,
            "max_outage": s.max_outage,
            "on_outage": s.on_outage,
            "notify_outage_after": s.notify_outage_after,
            "outage_alerts": outage_alerts.to_dict() if (outage_alerts := self._outage_alerts(s)) else None,
            "stop_request_path": s.stop_request_path,
            "progress_to": {
                "dag_id": identity.dag_id,
                "run_id": identity.run_id,
                "task_id": identity.task_id,
                "map_index": identity.map_index,
            },
        }

    def _script(self, s: JobSettings, history: AttemptHistory, own_checkpoint: int | None) -> str:
        if s.config is None:
            return self.script
        cfg = resume_own_checkpoint(s.config, own_checkpoint)
        if s.skip_data:  # what the rewinds skipped stays skipped, whichever job gets there
            cfg = skipping_iterations(cfg, history.skipped_iterations())
        rate = history.learning_rate(own_checkpoint)
        if rate is not None:  # a rewind lowered it: lowered for its iterations, then the configured one again
            cfg = with_learning_rate(cfg, *rate)
        spec = JobSpec(job_name=s.name, exclude=list(history.exclude))
        return render_sbatch(cfg, spec, template_dirs=self.template_dirs)

    def _finish_rewinds(self, hook: SlurmHook, s: JobSettings, history: AttemptHistory, store: Any) -> AttemptHistory:
        """Set the save directory back for every rewind not yet done (a worker that died after deciding it left
        it undone; run again, a rewind finishes what an interrupted one left), and record what moved."""
        for attempt in history.rewinds:
            rewind = dict(attempt.rewind or {})
            if rewind.get("discarded") is not None or not s.checkpoint_dir:
                continue
            discard = f"{s.checkpoint_dir.rstrip('/')}/discarded/{rewind['id']}"
            rewind["discarded"] = hook.rewind_checkpoints(s.checkpoint_dir, rewind.get("rewind_to") or 0, discard)
            self.log.warning(
                "%s: the save directory is back at %s; moved to %s: %s",
                rewind["id"],
                rewind.get("rewind_to") or "no checkpoint",
                discard,
                rewind["discarded"] or "nothing",
            )
            history = history.put(replace(attempt, rewind=rewind))
            if store is not None:
                store.set(HISTORY_KEY, history.to_dict())
        return history

    @staticmethod
    def _checkpoint(hook: SlurmHook, s: JobSettings) -> int | None:
        """The job's latest checkpoint iteration (Megatron's tracker file), if it has one."""
        found = hook.read_tracker(s.checkpoint_dir) if s.checkpoint_dir else None
        return found if isinstance(found, int) else None

    def _write_status(
        self,
        hook: SlurmHook,
        s: JobSettings,
        ti: Any,
        state: TrainingState,
        job_id: str | None,
        log_path: str | None,
        reason: str | None = None,
        iteration: int | None = None,
    ) -> None:
        """The task's status on the cluster, for sensors that run beside it (same DAG run only)."""
        status = TrainingStatus(state, ti.run_id, ti.try_number, job_id, log_path, time.time(), reason, iteration)
        hook.upload(task_status_path(s.output_dir, ti.task_id), status.to_json())

    def _watch_here(self, args: dict[str, Any], ti: Any) -> dict[str, Any]:
        """The trigger's watch (the same JobFollower), polling from the worker (deferrable=False)."""
        job_id = args["job_id"]
        follower = JobFollower.from_args(args, self.cluster.name)
        hook = self._hook()
        cycles = failures = 0
        estimates = StartEstimates(args.get("start_estimate_interval") or 0.0)
        try:
            while True:
                request, cycles = follower.request(), cycles + 1
                try:
                    start_of = estimates.due([job_id], time.time())
                    cycle = hook.poll_cycle([job_id], request, start_of=start_of)
                    statuses = estimates.estimated(cycle.statuses, start_of, cycle.start_estimates, time.time())
                    update = PollUpdate.from_cycle(job_id, request, replace(cycle, statuses=statuses), cycles)
                    failures = 0
                except SlurmCommandError as exc:
                    failures += 1
                    update = PollUpdate.failed(job_id, exc, cycles, failures)
                step = follower.on_update(update, time.time())
                for level, notice in step.notices:
                    self.log.log(level, notice)
                for line in step.lines:
                    self.log.info("[job %s] %s", job_id, line)
                for level, notice in step.later:
                    self.log.log(level, notice)
                callback = args["on_outage"]  # told before an error or an end returns: gave_up, ended
                if step.notify and callback and first_to_tell(callback, self.cluster.key, step.notify):
                    tell(callback, step.notify, self.log)
                alerts = OutageAlerts.from_dict(args["outage_alerts"]) if args["outage_alerts"] else None
                if step.notify and alerts and first_to_tell(alerts.key, self.cluster.key, step.notify):
                    alerts.send(step.notify, self.log)
                if step.error:
                    return {"kind": "error", "job_id": job_id, "message": step.error}
                if step.cancel and step.kill:
                    hook.kill([job_id])
                elif step.cancel:
                    hook.cancel([job_id])
                if step.delete:
                    self._retain(hook, job_id, args["checkpoint_dir"], step.delete)
                if step.finished:
                    return follower.result(self._read_tail(hook, follower))
                if step.publish is not None:
                    ti.xcom_push(key=PROGRESS_KEY, value=step.publish)
                if step.publish_outage is not None:  # the try's first polls failed: no progress to keep yet
                    ti.xcom_push(key=PROGRESS_KEY, value={"outage": step.publish_outage})
                if not step.poll_again:
                    time.sleep(args["poll_interval"])
        finally:
            hook.close()

    def _retain(self, hook: SlurmHook, job_id: str, checkpoint_dir: str, deletions: Any) -> None:
        """Retention, as the trigger does it: a failure is logged, and the next save tries again."""
        try:
            deleted, kept = hook.delete_checkpoints(checkpoint_dir, deletions)
            self.log.info("job %s: %s", job_id, retention_notice(checkpoint_dir, deleted, kept))
        except Exception as exc:
            self.log.warning("retention could not delete checkpoints of job %s: %s", job_id, exc)

    def _read_tail(self, hook: SlurmHook, follower: JobFollower) -> bytes:
        """Save the final watch state and read the log's end (as the trigger does)."""
        try:
            return hook.poll_cycle([], follower.final_request()).chunks[0].data
        except Exception as exc:  # the event carries the summary; the tail only sharpens classification
            self.log.warning("could not save the state / read the log end of job %s: %s", follower.job_id, exc)
            return b""

    # ---------------------------------------------------------------- after the job

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        pause_point("before-judging", context["ti"].dag_id)  # tests kill the worker here: the job ended unjudged
        return self._finish(context, event)

    def _finish(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        ti = context["ti"]
        store = context.get("task_state_store")
        history = AttemptHistory.from_dict(store.get(HISTORY_KEY) if store is not None else None)
        if event.get("kind") == "error":
            message = f"lost contact with the cluster while following job {event.get('job_id')}: {event.get('message')}"
            ti.xcom_push(key=RESULT_KEY, value=lost_contact_result(history, message))
            raise AirflowException(message)
        s = self._settings()
        hook = self._hook()
        try:
            after = self._checkpoint(hook, s)
            decision = decide_attempt(history, ti.try_number, self.retries or 0, event, after, s)
            if store is not None:
                store.set(HISTORY_KEY, decision.history.to_dict())
            verdict, attempt, result = decision.classification, decision.attempt, decision.result
            if attempt.rewind:
                try:
                    rewound = self._finish_rewinds(hook, s, decision.history, store)
                    result["attempts"] = rewound.to_dict()["attempts"]  # with what the rewind moved
                except SlurmCommandError as exc:  # the next try does it before it submits
                    self.log.warning("the rewind is not done yet: %s", exc)
            job_id, log_path = event["job_id"], event.get("log_path")
            ended = attempt.raw_state or attempt.state
            self.log.info("job %s ended %s: %s (%s)", job_id, ended, verdict.verdict, verdict.reason)
            if verdict.verdict == SUCCESS and self.job and self.job.get("kind") == EVALUATE:
                result["metrics"] = self._evaluation_metrics(hook)
            self._write_status(hook, s, ti, decision.training_state, job_id, log_path, **decision.status_fields)
        finally:
            hook.close()
        if verdict.verdict == SUCCESS:
            return result
        ti.xcom_push(key=RESULT_KEY, value=result)
        if verdict.verdict == STOPPED:  # by the sweep's early stopping: not a failure; clearing it trains on
            raise AirflowSkipException(f"job {job_id} {attempt.state}: {verdict.reason}")
        message = f"job {job_id} {attempt.state}: {verdict.reason}"
        if verdict.exclude_nodes:
            message += f"; excluding {', '.join(verdict.exclude_nodes)} next time"
        if event.get("hang"):  # its watch cancelled it: no progress for monitoring.inactivity_threshold_seconds
            self._alert(s, ti, "stalled", message)
        if verdict.verdict == FATAL:
            self._alert(s, ti, "training_fatal", message)
            raise AirflowFailException(f"{message} (not retried)")
        if decision.training_state is TrainingState.FATAL:  # a retryable end on the last try
            self._alert(s, ti, "retries_exhausted", f"{message} (try {ti.try_number} of {(self.retries or 0) + 1})")
        raise AirflowException(f"{message} (retrying: resumes from the latest checkpoint)")

    @staticmethod
    def _outage_alerts(s: JobSettings) -> OutageAlerts | None:
        """The sweep's notifiers that hear of outages, as the watch needs them."""
        return OutageAlerts.of(s.config.notifications, s.config.experiment.sweep) if s.config is not None else None

    def _alert(self, s: JobSettings, ti: Any, event: str, reason: str) -> None:
        """Tell the experiment's notifiers (`notifications`) what happened to this task's job."""
        if s.config is None or not s.config.notifications.notify:
            return
        notifications = asdict(s.config.notifications)
        what = s.config.experiment.name or s.name
        if self.task_id != TRAIN_TASK:
            what = f"{what} ({self.task_id})"
        link = dashboard_link(notifications, dag_id=ti.dag_id, run_id=ti.run_id)
        send_alert(notifications, Alert(event, s.config.experiment.sweep, what, reason, link), self.log)

    def _evaluation_metrics(self, hook: SlurmHook) -> dict[str, Any]:
        """Suite -> metrics of the finished evaluation job (kept in its XCom for the dashboard)."""
        files = evaluation_files(dict(self.experiment), dict(self.job))
        chunks = hook.read_ranges([(path, 0, 1 << 20) for path in files.values()])
        metrics = {}
        for suite, chunk in zip(files, chunks, strict=True):
            try:
                metrics[suite] = json.loads(chunk.data.decode()).get("metrics", {}) if chunk.size else {}
            except ValueError:
                self.log.warning("unreadable evaluation result %s", chunk.path)
        return metrics

    def on_kill(self) -> None:
        """Killed while polling from the worker: the job goes too (deferred tasks: the trigger's on_kill)."""
        job_id = getattr(self, "_job_id", None)
        if job_id:
            hook = self._hook()
            try:
                hook.cancel([job_id])
            finally:
                hook.close()


def restart_policy(experiment: Mapping[str, Any] | RootConfig) -> dict[str, Any]:
    """`retries` and `retry_delay` for the operator from an experiment's restart section."""
    cfg = experiment if isinstance(experiment, RootConfig) else typed_config(experiment)
    return {
        "retries": max(cfg.restart.max_attempts - 1, 0),
        "retry_delay": timedelta(seconds=cfg.restart.retry_delay_seconds),
    }
