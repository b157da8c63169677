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
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import BaseOperator, Variable
from airflow.sdk.definitions.template import literal
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from airflow_oellm.config.errors import ConfigError
from airflow_oellm.config.milestones import EVALUATE, evaluation_files, job_config, resume_own_checkpoint, typed
from airflow_oellm.config.schema import RootConfig
from airflow_oellm.hooks.slurm import SlurmHook
from airflow_oellm.monitor.classify import (
    DEFAULT_RULES,
    FATAL,
    NAN_INTERVALS,
    RETRY,
    SUCCESS,
    Classification,
    attempt_outcome,
    classify,
    progress_guard,
    rules_from_config,
)
from airflow_oellm.monitor.events import event_specs
from airflow_oellm.monitor.watch import PROGRESS_CURVE, JobWatch, WatchState, thinned
from airflow_oellm.pause_points import pause_point
from airflow_oellm.slurm.identity import JobIdentity, monitor_state_path, task_status_path
from airflow_oellm.slurm.operations import CycleRequest, SubmissionConflict
from airflow_oellm.slurm.render import JobSpec, render_sbatch
from airflow_oellm.slurm.states import JobStatus
from airflow_oellm.triggers.base import settle_deadline
from airflow_oellm.triggers.job import PROGRESS_XCOM_KEY, SlurmJobTrigger

HISTORY_KEY = "oellm_attempts"
MAX_ATTEMPT_FAULTS = 5  # fault lines kept per attempt in the history


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


def typed_config(experiment: Mapping[str, Any]) -> RootConfig:
    try:
        return typed(dict(experiment))
    except ConfigError as exc:
        raise AirflowFailException(f"invalid experiment config: {exc}") from None


class SlurmSubmitOperator(BaseOperator):
    """Submit a SLURM job over SSH exactly once and (by default) wait for it in the triggerer.

    :param ssh_conn_id: Airflow SSH connection to the cluster's login node.
    :param local: run SLURM commands on this machine instead (Airflow on a login node).
    :param batch_system: `slurm`, or `local-process` to run the job as a local background process (no SLURM).
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
    :param secret_variables: environment variable -> Airflow Variable key; values reach the job's
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

    def __init__(
        self,
        *,
        ssh_conn_id: str | None = "ssh_default",
        local: bool = False,
        batch_system: str = "slurm",
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
        super().__init__(**kwargs)
        if (experiment is None) == (script is None):
            raise ValueError(f"{self.task_id}: give either experiment= or script=")
        if script is not None and not output_dir:
            raise ValueError(f"{self.task_id}: script= needs output_dir=")
        self.ssh_conn_id = ssh_conn_id
        self.local = local
        self.batch_system = batch_system
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

    def _settings(self) -> dict[str, Any]:
        """Paths and monitoring settings, from the experiment config where one is given."""
        if self.experiment is not None:
            config = dict(self.experiment)
            if self.job:
                try:
                    config = job_config(config, dict(self.job))
                except ConfigError as exc:
                    raise AirflowFailException(f"cannot build {dict(self.job)}: {exc}") from None
            cfg = typed_config(config)
            e, m = cfg.experiment, cfg.monitoring
            args_save = cfg.backend.args.get("save") if cfg.backend.name == "megatron" else None
            return {
                "config": cfg,
                "training": cfg.backend.name == "megatron" if self.expects_training is None else self.expects_training,
                "output_dir": e.output_dir,
                "name": self.job_name or e.name,
                "log_path": e.log_path,
                "script_dir": e.script_dir,
                "checkpoint_dir": self.checkpoint_dir or args_save,
                "events": [*(vars(x) for x in m.log_events), *self.log_events],
                "inactivity": self.inactivity_threshold or m.inactivity_threshold_seconds,
                "nan_limit": m.nan_intervals if cfg.backend.name == "megatron" else 0,
                "output_paths": [*m.output_paths, *self.output_paths],
                "poll_interval": self.poll_interval or m.poll_interval_seconds,
            }
        output = self.output_dir.rstrip("/")
        name = self.job_name or self.task_id
        return {
            "config": None,
            "training": bool(self.expects_training),
            "output_dir": output,
            "name": name,
            "log_path": self.log_path or f"{output}/logs/{name}-%j.out",
            "script_dir": f"{output}/scripts",
            "checkpoint_dir": self.checkpoint_dir,
            "events": self.log_events,
            "inactivity": self.inactivity_threshold,
            "nan_limit": 0,
            "output_paths": self.output_paths,
            "poll_interval": self.poll_interval or 60.0,
        }

    def _hook(self) -> SlurmHook:
        return SlurmHook(self.ssh_conn_id, local=self.local, batch_system=self.batch_system)

    # ---------------------------------------------------------------- submit

    def execute(self, context: Any) -> Any:
        if self.job and self.job.get("kind") == EVALUATE and not self.job.get("suites"):
            # a cooldown's branch converts its final checkpoint whatever its suites; none may be due
            raise AirflowSkipException("no evaluation suite is due for this checkpoint")
        ti = context["ti"]
        s = self._settings()
        store = context.get("task_state_store")
        history = (store.get(HISTORY_KEY) if store is not None else None) or {"attempts": [], "exclude": []}
        identity = JobIdentity(
            ti.dag_id,
            ti.run_id,
            ti.task_id,
            ti.map_index if ti.map_index is not None else -1,
            ti.try_number,
            s["output_dir"],
        )
        hook = self._hook()
        try:
            script_path = f"{s['script_dir']}/{s['name']}-try{ti.try_number}.sbatch"
            try:
                before = hook.read_tracker(s["checkpoint_dir"]) if s["checkpoint_dir"] else None
                script = self._script(s, history["exclude"], before if isinstance(before, int) else None)
                hook.mkdirs([s["output_dir"], s["log_path"].rsplit("/", 1)[0], s["script_dir"]])
                hook.upload(script_path, script, mode="0700")
                secrets = {env: Variable.get(key) for env, key in self.secret_variables.items()}
                outcome = hook.submit_once(identity, script_path, options=self.sbatch_options, secrets=secrets)
                pause_point("after-sbatch", ti.dag_id)  # tests kill the worker here: the job id is not saved yet
            except Exception as exc:
                # sensors beside this task must learn that no job is coming (this try, or ever)
                final = isinstance(exc, SubmissionConflict | AirflowFailException)
                final = final or ti.try_number > (self.retries or 0)
                with contextlib.suppress(Exception):
                    self._write_status(
                        hook, s, ti, "failed" if final else "retrying", None, None, reason=f"submission failed: {exc}"
                    )
                if isinstance(exc, SubmissionConflict):
                    raise AirflowFailException(str(exc)) from None
                raise
            log_path = s["log_path"].replace("%j", outcome.job_id)
            self._job_id = outcome.job_id
            self.log.info("%s job %s (try %d) -> log %s", outcome.kind, outcome.job_id, ti.try_number, log_path)
            attempt = {
                "try": ti.try_number,
                "job_id": outcome.job_id,
                "submission": outcome.kind,
                "log_path": log_path,
                "checkpoint_before": before if isinstance(before, int) else None,
                "submitted_at": time.time(),
            }
            history["attempts"] = [a for a in history["attempts"] if a["try"] != ti.try_number] + [attempt]
            if store is not None:
                store.set(HISTORY_KEY, history)
            ti.xcom_push(key="job_id", value=outcome.job_id)
            ti.xcom_push(key="log_path", value=log_path)
            ti.xcom_push(key="script_path", value=script_path)
            self._write_status(hook, s, ti, "running", outcome.job_id, log_path)
        finally:
            hook.close()
        if not self.wait_for_completion:
            return {"job_id": outcome.job_id, "log_path": log_path, "script_path": script_path}
        trigger_args = {
            "job_id": outcome.job_id,
            "log_path": log_path,
            "state_path": monitor_state_path(identity),
            "ssh_conn_id": self.ssh_conn_id,
            "local": self.local,
            "batch_system": self.batch_system,
            "events": s["events"],
            "inactivity_threshold": s["inactivity"],
            "nan_limit": s["nan_limit"],
            "output_paths": s["output_paths"],
            "poll_interval": s["poll_interval"],
            "progress_to": {
                "dag_id": ti.dag_id,
                "run_id": ti.run_id,
                "task_id": ti.task_id,
                "map_index": ti.map_index if ti.map_index is not None else -1,
            },
        }
        if self.deferrable:
            trigger = SlurmJobTrigger(**trigger_args, fire_after=settle_deadline())
            self.defer(trigger=trigger, method_name="execute_complete")
        return self._finish(context, self._watch_here(trigger_args, ti))

    def _script(self, s: dict[str, Any], exclude: Sequence[str], own_checkpoint: int | None) -> str:
        if s["config"] is None:
            return self.script
        cfg = resume_own_checkpoint(s["config"], own_checkpoint)
        return render_sbatch(cfg, JobSpec(job_name=s["name"], exclude=list(exclude)), template_dirs=self.template_dirs)

    def _write_status(
        self,
        hook: SlurmHook,
        s: dict[str, Any],
        ti: Any,
        state: str,
        job_id: str | None,
        log_path: str | None,
        **extra: Any,
    ) -> None:
        """The task's status on the cluster, for sensors that run beside it (same DAG run only)."""
        status = {
            "state": state,
            "run_id": ti.run_id,
            "try": ti.try_number,
            "job_id": job_id,
            "log_path": log_path,
            "updated": time.time(),
            **extra,
        }
        hook.upload(task_status_path(s["output_dir"], ti.task_id), json.dumps(status))

    def _watch_here(self, args: dict[str, Any], ti: Any) -> dict[str, Any]:
        """The same watch as the trigger, polling from the worker (deferrable=False)."""
        hook = self._hook()
        published = None
        try:
            watch = JobWatch(
                event_specs(args["events"]),
                WatchState(args["job_id"], args["log_path"]),
                inactivity_threshold=args["inactivity_threshold"],
                now=time.time(),
                nan_limit=args["nan_limit"],
            )
            while True:
                cycle = hook.poll_cycle(
                    [args["job_id"]], CycleRequest(reads=[watch.read_request()], stats=args["output_paths"])
                )
                step = watch.apply(
                    time.time(),
                    cycle.statuses[args["job_id"]],
                    cycle.chunks[0],
                    dict(zip(args["output_paths"], cycle.mtimes, strict=True)),
                )
                for line in step.lines:
                    self.log.info("[job %s] %s", args["job_id"], line)
                if step.skipped:
                    self.log.warning(
                        "[job %s] the log grows faster than it is read: skipped %d bytes", args["job_id"], step.skipped
                    )
                if step.stop_reason:
                    self.log.warning("job %s: %s: cancelling it", args["job_id"], step.stop_reason)
                    watch.state.cancelled_by_us = True
                    hook.cancel([args["job_id"]])
                if step.finished:
                    return {"kind": "finished", **watch.result(hook.read_range(*watch.tail_request()).data)}
                status = cycle.statuses[args["job_id"]]
                if watch.progress_mark(status) != published:
                    ti.xcom_push(key=PROGRESS_XCOM_KEY, value=watch.progress(status, time.time()))
                    published = watch.progress_mark(status)
                time.sleep(args["poll_interval"])
        finally:
            hook.close()

    # ---------------------------------------------------------------- after the job

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        return self._finish(context, event)

    def _finish(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        ti = context["ti"]
        s = self._settings()
        store = context.get("task_state_store")
        history = (store.get(HISTORY_KEY) if store is not None else None) or {"attempts": [], "exclude": []}
        if event.get("kind") == "error":
            raise AirflowException(
                f"lost contact with the cluster while following job {event.get('job_id')}: {event.get('message')}"
            )
        status = JobStatus.from_dict(event["status"]) if event.get("status") else JobStatus.not_found(event["job_id"])
        summary = event.get("summary") or {}
        attempt = next(
            (a for a in history["attempts"] if a["try"] == ti.try_number),
            {"try": ti.try_number, "job_id": event["job_id"], "checkpoint_before": None},
        )
        hook = self._hook()
        try:
            after = hook.read_tracker(s["checkpoint_dir"]) if s["checkpoint_dir"] else None
            outcome = attempt_outcome(
                status.state,
                summary,
                event.get("tail", ""),
                exit_code=status.exit_code,
                cancelled_by=status.cancelled_by,
                hang=bool(event.get("hang")),
                cancelled_by_us=bool(event.get("cancelled_by_us")),
                checkpoint_before=attempt.get("checkpoint_before"),
                checkpoint_after=after if isinstance(after, int) else None,
                training=s["training"],
                nan_limit=s["config"].monitoring.nan_intervals if s["config"] else NAN_INTERVALS,
            )
            configured = [vars(r) for r in s["config"].monitoring.rules] if s["config"] else []
            rules = [*rules_from_config([*self.classification_rules, *configured]), *DEFAULT_RULES]
            verdict = classify(outcome, rules)
            if verdict.verdict == RETRY and s["training"] and not verdict.progress_free:
                # a resume the rerun state machine asked for saves no new checkpoint by design
                earlier = [a for a in history["attempts"] if a["try"] != ti.try_number and not a.get("progress_free")]
                checkpoints = [(earlier or [attempt])[0].get("checkpoint_before")]
                checkpoints += [a.get("checkpoint_after") for a in earlier] + [outcome.checkpoint_after]
                guard = progress_guard(checkpoints)
                if guard:
                    verdict = Classification(FATAL, f"{verdict.reason}; {guard}", verdict.exclude_nodes)
            # a job that resumed at the very end (its predecessor stopped right after the last
            # iteration) logs no iteration: it is where it resumed
            last_iteration = summary.get("last_iteration")
            if last_iteration is None:
                last_iteration = summary.get("resumed_from") or None
            attempt.update(
                start=status.start,
                end=status.end,
                gpu_hours=gpu_hours(status, s["config"]),
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
            )
            history["attempts"] = [a for a in history["attempts"] if a["try"] != ti.try_number] + [attempt]
            history["exclude"] = list(dict.fromkeys([*history["exclude"], *verdict.exclude_nodes]))
            if store is not None:
                store.set(HISTORY_KEY, history)
            result = {
                "job_ids": [a["job_id"] for a in history["attempts"]],
                "final_state": status.state.value,
                "classification": verdict.to_dict(),
                "last_iteration": last_iteration,
                "checkpoint": outcome.checkpoint_after,
                "events": summary.get("counts", {}),
                "summary": summary,
                "attempts": history["attempts"],
            }
            self.log.info(
                "job %s ended %s: %s (%s)",
                event["job_id"],
                status.raw_state or status.state.value,
                verdict.verdict,
                verdict.reason,
            )
            if verdict.verdict == SUCCESS:
                if self.job and self.job.get("kind") == EVALUATE:
                    result["metrics"] = self._evaluation_metrics(hook)
                self._write_status(
                    hook, s, ti, "completed", event["job_id"], event.get("log_path"), iteration=result["checkpoint"]
                )
                return result
            last_try = ti.try_number > (self.retries or 0)
            final = verdict.verdict == FATAL or last_try
            self._write_status(
                hook,
                s,
                ti,
                "failed" if final else "retrying",
                event["job_id"],
                event.get("log_path"),
                reason=verdict.reason,
                iteration=result["checkpoint"],
            )
        finally:
            hook.close()
        ti.xcom_push(key="result", value=result)
        message = f"job {event['job_id']} {status.state.value}: {verdict.reason}"
        if verdict.exclude_nodes:
            message += f"; excluding {', '.join(verdict.exclude_nodes)} next time"
        if verdict.verdict == FATAL:
            raise AirflowFailException(f"{message} (not retried)")
        raise AirflowException(f"{message} (retrying: resumes from the latest checkpoint)")

    def _evaluation_metrics(self, hook: SlurmHook) -> dict[str, Any]:
        """Suite -> metrics of the finished evaluation job (kept in its XCom for the dashboard)."""
        files = evaluation_files(dict(self.experiment), dict(self.job))
        cycle = hook.poll_cycle([], CycleRequest(reads=[(path, 0, 1 << 20) for path in files.values()]))
        metrics = {}
        for suite, chunk in zip(files, cycle.chunks, strict=True):
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


def gpu_hours(status: JobStatus, cfg: RootConfig | None) -> float | None:
    """Hours the job ran (sacct start to end) times the GPUs it held."""
    if cfg is None or not status.start or not status.end:
        return None
    try:
        seconds = (datetime.fromisoformat(status.end) - datetime.fromisoformat(status.start)).total_seconds()
    except ValueError:
        return None
    return round(max(seconds, 0) / 3600 * cfg.slurm.nodes * cfg.slurm.gpus_per_node, 4)


def restart_policy(experiment: Mapping[str, Any] | RootConfig) -> dict[str, Any]:
    """`retries` and `retry_delay` for the operator from an experiment's restart section."""
    cfg = experiment if isinstance(experiment, RootConfig) else typed_config(experiment)
    return {
        "retries": max(cfg.restart.max_attempts - 1, 0),
        "retry_delay": timedelta(seconds=cfg.restart.retry_delay_seconds),
    }
