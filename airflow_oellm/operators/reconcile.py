"""CancelOrphanedJobsOperator: cancel the jobs on one cluster that no task will follow again.

It runs on a worker, needs no triggerer, and is what stops a job whose task was marked failed while no
triggerer ran its trigger (see airflow_oellm/monitor/orphans.py for the rule). One `squeue` of the SSH
user's jobs; Airflow is asked for task states only when one of them carries this provider's comment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from airflow_oellm.hooks.slurm import SlurmHook
from airflow_oellm.monitor.orphans import find_orphans, queued_task_keys, task_instances
from airflow_oellm.slurm.identity import COMMENT_PREFIX
from airflow_oellm.slurm.target import ClusterTarget


class CancelOrphanedJobsOperator(BaseOperator):
    """Cancel the jobs of the DAGs `dag_ids` on `cluster` whose task instance finished, or was reset in a
    finished DAG run. Returns the cancelled jobs: `[{"job_id", "task", "reason"}]`."""

    template_fields: Sequence[str] = ()
    ui_color = "#f0e4d7"

    def __init__(
        self,
        *,
        dag_ids: Sequence[str],
        ssh_conn_id: str | None = None,
        cluster: ClusterTarget | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.cluster = ClusterTarget.choose(ssh_conn_id, cluster)
        self.dag_ids = list(dag_ids)

    def execute(self, context: Any) -> list[dict[str, str]]:
        hook = SlurmHook(cluster=self.cluster)
        try:
            jobs = hook.find_jobs(comment_prefix=f"{COMMENT_PREFIX}/")
            queued = queued_task_keys(jobs)
            if not queued:
                self.log.info("no job of this provider is queued or running on %s", self.cluster.describe())
                return []
            ti = context["ti"]
            tasks = [ref for dag_id in self.dag_ids for ref in task_instances(dag_id, ti.get_task_states(dag_id))]
            # a run's state matters only for a reset task instance that owns a queued job
            reset = {(t.dag_id, t.run_id) for t in tasks if t.state is None and t.key in queued}
            orphans = find_orphans(jobs, tasks, {key: ti.get_dagrun_state(*key) for key in reset})
            for orphan in orphans:  # logged first: a job that ends meanwhile may make scancel fail
                self.log.warning("cancelling job %s: %s", orphan.job_id, orphan.reason)
            if orphans:
                hook.cancel([o.job_id for o in orphans])
        finally:
            hook.close()
        self.log.info("%d job(s) of this provider on %s, %d orphaned", len(jobs), self.cluster.describe(), len(orphans))
        return [{"job_id": o.job_id, "task": o.task.describe(), "reason": o.reason} for o in orphans]
