"""SweepEarlyStopSensor: the sweep DAG's `early_stop` task, beside its `run` tasks (sweep.early_stop).

Each poke looks at every experiment's training (its progress and result XComs, its status file on the
cluster), reports each metric at each rung once, lets the rungs decide (monitor/early_stop.py) and asks
the losers to stop: a `StopRequest` file the follower of the training's job reads with its next cycle.
The rungs' state is kept on the cluster beside the sweep's analysis, so a restarted or rescheduled task
carries on where it was; another run of the sweep DAG starts afresh. It ends once no experiment trains,
returning the verdicts and the hours the stopped points did not spend.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from airflow_oellm.config.early_stop import EarlyStopRule
from airflow_oellm.config.naming import PROGRESS_KEY, RESULT_KEY, RUN_TASK, TRAIN_TASK
from airflow_oellm.hooks.alerting import dashboard_link, send_alert
from airflow_oellm.hooks.slurm import SlurmHook, task_cluster
from airflow_oellm.monitor.early_stop import (
    EarlyStopState,
    PointProgress,
    StopRequest,
    early_stop_round,
    saved_hours,
)
from airflow_oellm.monitor.records import AttemptHistory, TrainingStatus
from airflow_oellm.monitor.watch import merged_curve
from airflow_oellm.notifications import Alert
from airflow_oellm.operators.report import experiment_run_ids
from airflow_oellm.slurm.identity import stop_request_path, task_status_path
from airflow_oellm.slurm.target import DEFAULT_SSH_CONN_ID, ClusterTarget

ENDED_RUN_STATES = ("success", "failed")
# Below this poke interval the sensor pokes in place (a worker slot for the whole sweep, a test's or a demo's):
# rescheduled that often, Airflow may see the task scheduled again before the executor reports its poke done,
# and marks it failed (seen with the CeleryExecutor and 2 s pokes)
RESCHEDULE_FROM_SECONDS = 30.0
STATE_READ_LIMIT = 1 << 20
# a point ranked to stop once its training had ended (it finished while the rung waited for the others)
LATE = "; not stopped: its training had already ended"


class SweepEarlyStopSensor(BaseSensorOperator):
    """Stop the sweep's losing points at each rung of `rule` (`EarlyStopRule.to_dict()`).

    :param experiments: DAG id -> {"name", "parameters", "output_dir", "train_iters", "gpus"}, in the trigger
        tasks' map order.
    :param state_path: the rungs' state file on the cluster.
    """

    ui_color = "#fbeee6"

    def __init__(
        self,
        *,
        rule: Mapping[str, Any],
        experiments: Mapping[str, Mapping[str, Any]],
        state_path: str,
        trigger_task_id: str | Sequence[str] = RUN_TASK,
        part_size: int | None = None,
        ssh_conn_id: str | None = DEFAULT_SSH_CONN_ID,
        cluster: ClusterTarget | None = None,
        poll_interval: float = 60.0,
        sweep: str = "",
        notifications: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("poke_interval", poll_interval)
        # a worker slot for a moment each poke, not for the whole sweep
        kwargs.setdefault("mode", "reschedule" if poll_interval >= RESCHEDULE_FROM_SECONDS else "poke")
        kwargs.setdefault("retries", 2)  # a poke lost with its worker: the state on the cluster carries on
        cluster = task_cluster(ssh_conn_id, cluster, kwargs)
        super().__init__(**kwargs)
        self.rule = dict(rule)
        self.experiments = {dag_id: dict(info) for dag_id, info in experiments.items()}
        self.state_path = state_path
        self.trigger_task_ids = [trigger_task_id] if isinstance(trigger_task_id, str) else list(trigger_task_id)
        self.part_size = part_size or max(len(self.experiments), 1)
        self.cluster = cluster
        self.sweep = sweep
        self.notifications = dict(notifications) if notifications else None  # told of each point stopped

    def poke(self, context: Any) -> PokeReturnValue:
        ti = context["ti"]
        rule = EarlyStopRule.from_dict(self.rule)
        run_ids = experiment_run_ids(ti, list(self.experiments), self.trigger_task_ids, self.part_size)
        infos = list(self.experiments.values())
        hook = SlurmHook(cluster=self.cluster)
        try:
            reads = [(self.state_path, 0, STATE_READ_LIMIT)]
            reads += [(task_status_path(info["output_dir"], TRAIN_TASK), 0, 65536) for info in infos]
            saved, *statuses = hook.read_ranges(reads)
            members = {info["name"]: info["parameters"] for info in infos}
            state = EarlyStopState.from_json(saved.data, ti.run_id) or EarlyStopState.start(rule, ti.run_id, members)
            progress, results = {}, {}
            for (dag_id, info), status in zip(self.experiments.items(), statuses, strict=True):
                progress[info["name"]], results[info["name"]] = self._progress(ti, dag_id, run_ids[dag_id], status.data)
            new = early_stop_round(rule, state, progress, time.time())
            outputs = {info["name"]: info["output_dir"] for info in infos}
            stops = [v for v in new if v.stop and progress[v.experiment].training]
            runs = {info["name"]: run_ids[dag_id] for dag_id, info in self.experiments.items()}
            files = [
                (stop_request_path(outputs[v.experiment]), StopRequest(v.reason, v.rung, runs[v.experiment]).to_json())
                for v in stops
            ]
            if new or not saved.data:
                written = hook.write_files([*files, (self.state_path, state.to_json())])
                if not all(written):
                    raise RuntimeError(f"could not write the early stop's files: {[f for f, _ in files]}")
        finally:
            hook.close()
        dag_ids = {info["name"]: dag_id for dag_id, info in self.experiments.items()}
        for verdict in new:
            late = verdict.stop and not progress[verdict.experiment].training
            self.log.info("%s: %s%s", verdict.experiment, verdict.reason, LATE if late else "")
            if verdict.stop and not late and self.notifications:
                name = verdict.experiment
                link = dashboard_link(self.notifications, dag_id=dag_ids[name], run_id=runs[name])
                send_alert(self.notifications, Alert("early_stop", self.sweep, name, verdict.reason, link), self.log)
        if any(p.training for p in progress.values()):
            return PokeReturnValue(is_done=False)
        return PokeReturnValue(is_done=True, xcom_value=self._outcome(rule, state, results))

    @staticmethod
    def _progress(
        ti: Any, dag_id: str, run_id: str | None, status_data: bytes | None
    ) -> tuple[PointProgress, Mapping[str, Any]]:
        """An experiment's training as the sweep sees it now, and its result (once a try has ended)."""
        if run_id is None:
            return PointProgress(None, training=True), {}
        pull = {"dag_id": dag_id, "task_ids": TRAIN_TASK, "run_id": run_id}
        result = ti.xcom_pull(**pull) or ti.xcom_pull(**pull, key=RESULT_KEY) or {}
        live = (ti.xcom_pull(**pull, key=PROGRESS_KEY) or {}).get("summary") or {}
        status = TrainingStatus.from_json(status_data, run_id)
        run_state = ti.get_dagrun_state(dag_id, run_id)
        ended = str(getattr(run_state, "value", run_state)) in ENDED_RUN_STATES or (status and status.state.final)
        history = AttemptHistory.of_result(result)
        summary = result.get("summary") or {}
        validation = [p for a in history.attempts for p in a.validation or []]
        validation += [*(summary.get("validation") or []), *(live.get("validation") or [])]
        curve = merged_curve(
            [*(a.loss_curve for a in history.attempts), summary.get("loss_curve"), live.get("loss_curve")]
        )
        iterations = [i for i in (summary.get("last_iteration"), live.get("last_iteration")) if isinstance(i, int)]
        iterations += [a.last_iteration for a in history.attempts if isinstance(a.last_iteration, int)]
        return PointProgress(max(iterations, default=None), not ended, validation, curve), result

    def _outcome(
        self, rule: EarlyStopRule, state: EarlyStopState, results: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, Any]:
        """The verdicts, the points stopped and the hours they did not spend, against the whole sweep's."""
        infos = {info["name"]: info for info in self.experiments.values()}
        stopped, saved, planned = {}, [0.0, 0.0], [0.0, 0.0]
        for name, result in results.items():
            info = infos[name]
            pace = _iteration_ms(result)
            whole = saved_hours(info["train_iters"] or 0, 0, pace, info["gpus"])
            planned = [planned[0] + whole[0], planned[1] + whole[1]]
            if (result.get("classification") or {}).get("verdict") != "stopped":
                continue
            stopped[name] = result["classification"]["reason"]
            at = result.get("last_iteration") or 0
            spared = saved_hours(info["train_iters"] or 0, at, pace, info["gpus"])
            saved = [saved[0] + spared[0], saved[1] + spared[1]]
        late = {v.experiment: v.reason + LATE for v in state.verdicts() if v.stop and v.experiment not in stopped}
        outcome = {
            "rule": rule.to_dict(),
            "verdicts": [v.to_dict() for v in state.verdicts()],
            "stopped": stopped,
            "too_late": late,
            "saved": {
                "hours": saved[0],
                "gpu_hours": saved[1],
                "sweep_hours": planned[0],
                "sweep_gpu_hours": planned[1],
            },
        }
        counts = (len(stopped), len(late), saved[0], planned[0], saved[1], planned[1])
        self.log.info(
            "early stopping: %d point(s) stopped, %d ranked to stop after their training ended; %.3g of %.3g hours"
            " (%.3g of %.3g GPU-hours) not spent",
            *counts,
        )
        return outcome


def _iteration_ms(result: Mapping[str, Any]) -> float | None:
    """A training's pace: its last job's, else its attempts'."""
    pace = (result.get("summary") or {}).get("iteration_ms")
    if not pace:
        paces = [a.iteration_ms for a in AttemptHistory.of_result(result).attempts if a.iteration_ms]
        pace = paces[-1] if paces else None
    return pace
