"""SweepAnalysisOperator: the sweep DAG's `analysis` task, after its summary.

From the experiments' reports (their measurements per run and checkpoint): the best learning rate and batch
size per model size, the L(N, D) fit, the loss-vs-compute frontier and the best rate against N, each
computed or with the reason it is not (analysis/sweep.py). Written to the cluster as analysis.json,
analysis.md and plots under `<base_output_dir>/_analysis/<sweep>/`, the layout `airflow-oellm analyze`
writes offline, and returned as XCom (the dashboard's sweep page reads it).
"""

from __future__ import annotations

import json
from typing import Any

from airflow_oellm.hooks.slurm import task_cluster
from airflow_oellm.operators.report import SweepReportsOperator, write_files
from airflow_oellm.slurm.target import DEFAULT_SSH_CONN_ID, ClusterTarget


class SweepAnalysisOperator(SweepReportsOperator):
    """Analyse the sweep from its experiments' reports; write the analysis beside their outputs."""

    def __init__(
        self,
        *,
        sweep: str,
        output_dir: str,
        bootstrap: int = 200,  # analysis/scaling.BOOTSTRAP_SAMPLES, not imported: numpy and scipy load slowly
        ssh_conn_id: str | None = DEFAULT_SSH_CONN_ID,
        cluster: ClusterTarget | None = None,
        **kwargs: Any,
    ) -> None:
        cluster = task_cluster(ssh_conn_id, cluster, kwargs)
        super().__init__(**kwargs)
        self.sweep = sweep
        self.output_dir = output_dir
        self.bootstrap = bootstrap
        self.cluster = cluster

    def execute(self, context: Any) -> dict[str, Any]:
        from airflow_oellm.analysis.render import markdown, plots
        from airflow_oellm.analysis.sweep import analyse_reports

        found = self.reports(context["ti"])
        reports = [report for _, _, report in found if report]
        analysis = analyse_reports(reports, [name for name, _, _ in found], self.bootstrap)
        text = markdown(analysis, self.sweep)
        files = [
            (f"{self.output_dir}/analysis.json", json.dumps(analysis, indent=2).encode()),
            (f"{self.output_dir}/analysis.md", text.encode()),
            *((f"{self.output_dir}/{name}", data) for name, data in plots(analysis, self.sweep).items()),
        ]
        if not write_files(self.cluster, files):
            self.log.warning("could not write every analysis file to %s", self.output_dir)
        self.log.info("analysis of sweep %s (%s/):\n%s", self.sweep, self.output_dir, text)
        return {**analysis, "output": self.output_dir}
