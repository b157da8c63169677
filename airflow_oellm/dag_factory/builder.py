"""Sweep -> DAGs: one DAG per experiment, one DAG per sweep that runs them all.

Experiment DAG (`oellm__<sweep>__<experiment>`):

    prepare -> train [-> sync_wandb]                         (SlurmSubmitOperator, deferred)
           -> checkpoint[iter N] : wait -> convert -> evaluate [-> sync_wandb]   (mapped over the run's milestones)
           -> cooldown[k]        : wait -> train [-> sync_wandb] -> convert -> evaluate
           -> report                                         (all done)

`sync_wandb` (offline W&B runs pushed from the login node) is there where the runs are offline and pushed.
           -> outcome                                        (fails the run if any task failed)

The branches wait beside the training (CheckpointSensors in the triggerer); their number comes
from `prepare` at run time, so a run with `--conf` overrides (another train_iters) gets the
checkpoints it will really have. Building a DAG does no I/O: everything was read from YAML.

`oellm_reconcile`, one for all sweeps: one task per cluster, each cancelling that cluster's orphaned jobs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import DAG, TriggerRule, task_group
from airflow.sdk.definitions.param import ParamsDict

from airflow_oellm.config import Experiment, Sweep
from airflow_oellm.config.early_stop import EarlyStopRule
from airflow_oellm.config.milestones import CONVERT, COOLDOWN, EVALUATE, SIDE_JOB_ATTEMPTS
from airflow_oellm.config.naming import (
    ANALYSIS_TASK,
    CHECKPOINT_GROUP,
    CONFIG_KEY,
    CONVERT_TASK,
    COOLDOWN_GROUP,
    COOLDOWN_PLAN_TASK,
    COOLDOWNS_KEY,
    EARLY_STOP_TASK,
    EVALUATE_TASK,
    MAINTENANCE_TAG,
    OELLM_TAG,
    OUTCOME_TASK,
    PREPARE_TASK,
    RECONCILE_DAG_ID,
    REPORT_TASK,
    SUMMARY_TASK,
    SWEEP_DAG_TAG,
    SYNC_TASK,
    TRAIN_TASK,
    WAIT_TASK,
    analysis_dir,
    model_tag,
    platform_tag,
    run_part_task,
    sweep_dag_id,
    sweep_tag,
)
from airflow_oellm.config.schema import RootConfig
from airflow_oellm.config.tracking import wandb_run
from airflow_oellm.operators.analysis import SweepAnalysisOperator
from airflow_oellm.operators.early_stop import SweepEarlyStopSensor
from airflow_oellm.operators.prepare import (
    OVERRIDES_PARAM,
    CooldownPlanOperator,
    PrepareExperimentOperator,
    run_params,
)
from airflow_oellm.operators.reconcile import CancelOrphanedJobsOperator
from airflow_oellm.operators.report import ExperimentReportOperator, RunOutcomeOperator, SweepSummaryOperator
from airflow_oellm.operators.submit import SlurmSubmitOperator, restart_policy
from airflow_oellm.operators.tracking import WandbSyncOperator
from airflow_oellm.sensors import CheckpointSensor
from airflow_oellm.slurm.target import ClusterTarget

MAX_DOC_CONFIG = 20_000  # characters of resolved config shown in the DAG's documentation


def _start_date(text: str) -> datetime:
    date = datetime.fromisoformat(text)
    return date if date.tzinfo else date.replace(tzinfo=UTC)


def experiment_tags(sweep: Sweep, exp: Experiment) -> list[str]:
    cfg = exp.config
    tags = [OELLM_TAG, sweep_tag(sweep.name), platform_tag(cfg.platform.name)]
    model = exp.parameters.get("model") or cfg.vars.get("model_size")
    if model:
        tags.append(model_tag(model))
    return list(dict.fromkeys([*tags, *cfg.project.tags, *cfg.dag.tags]))


def experiment_doc(sweep: Sweep, exp: Experiment) -> str:
    cfg = exp.config
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in exp.parameters.items())
    args = cfg.backend.args
    config = json.dumps(exp.resolved, indent=1, default=str)
    if len(config) > MAX_DOC_CONFIG:
        config = config[:MAX_DOC_CONFIG] + "\n... (see provenance/resolved.json in the output directory)"
    return (
        f"### {exp.name}\n\nExperiment {exp.index} of sweep **{sweep.name}** (`{sweep.file}`) on "
        f"**{cfg.platform.name}**: {cfg.slurm.nodes} node(s) x {cfg.slurm.gpus_per_node} GPU(s), time limit "
        f"{cfg.slurm.time}, up to {cfg.restart.max_attempts} attempts.\n\n"
        f"Output: `{exp.paths.output_dir}` (checkpoints `{exp.paths.checkpoint_dir}`, logs `{exp.paths.log_path}`)\n\n"
        f"train_iters {args.get('train_iters')}, save_interval {args.get('save_interval')}, lr {args.get('lr')}; "
        f"{len(cfg.cooldowns)} cooldown(s); evaluation suites "
        f"{', '.join(s.name for s in cfg.evaluation.suites) if cfg.evaluation.enabled else 'none'}.\n\n"
        f"| sweep key | value |\n|---|---|\n{rows}\n\n"
        f'Trigger with `--conf \'{{"backend.args.train_iters": 500, "{OVERRIDES_PARAM}": ["backend.args.lr=1e-4"]}}\'`.'
        f"\n\n<details><summary>Resolved config</summary>\n\n```json\n{config}\n```\n</details>\n"
    )


@dataclass(frozen=True)
class TaskKwargs:
    """Keyword arguments the tasks of one experiment DAG share, by kind of task."""

    cluster: dict[str, Any]  # where jobs run
    sensor: dict[str, Any]  # a checkpoint wait beside a training
    training: dict[str, Any]  # a training or a cooldown's training: the restart policy
    side_job: dict[str, Any]  # a conversion or an evaluation
    wandb_sync: dict[str, Any] | None  # a push of offline W&B runs; None: the experiment's runs are not pushed


def platform_target(cfg: RootConfig) -> ClusterTarget:
    platform = cfg.platform
    return ClusterTarget(platform.ssh_conn_id, platform.local_commands, platform.batch_system)


def task_kwargs(sweep: Sweep, cfg: RootConfig) -> TaskKwargs:
    cluster = {"cluster": platform_target(cfg)}
    templates = {"template_dirs": [str(d) for d in sweep.template_dirs]}
    deferrable = {"deferrable": cfg.dag.deferrable}
    restart = restart_policy(cfg)
    wandb = wandb_run(cfg)
    sensor = {
        **cluster,
        "poll_interval": cfg.monitoring.poll_interval_seconds,
        **deferrable,
        **({} if cfg.dag.deferrable else {"mode": "reschedule"}),
        "retries": 1,  # its first check runs on the worker, over SSH: one outage there is no verdict
        "retry_delay": restart["retry_delay"],
    }
    return TaskKwargs(
        cluster=cluster,
        sensor=sensor,
        training={**cluster, **deferrable, **restart, **templates},
        side_job={
            **cluster,
            **deferrable,
            **templates,
            "retries": SIDE_JOB_ATTEMPTS - 1,
            "retry_delay": restart["retry_delay"],
        },
        wandb_sync={
            **cluster,
            "retries": SIDE_JOB_ATTEMPTS - 1,
            "retry_delay": restart["retry_delay"],
            "trigger_rule": TriggerRule.ALL_DONE,  # whatever became of the jobs, what they logged goes up
        }
        if wandb is not None and wandb.synced
        else None,
    )


def wait_for(kw: TaskKwargs, checkpoint_dir: Any, iteration: Any, output_dir: Any) -> CheckpointSensor:
    """Waits beside the parent's training for its checkpoint; skips if the training fails for good."""
    return CheckpointSensor(
        task_id=WAIT_TASK,
        checkpoint_dir=checkpoint_dir,
        iteration=iteration,
        output_dir=output_dir,
        training_task_id=TRAIN_TASK,
        on_training_failure="skip",
        map_index_template="{{ task.iteration }}",
        **kw.sensor,
    )


def convert_and_evaluate(
    config: Any, kw: TaskKwargs, iteration: Any, suites: Any, cooldown: Any
) -> tuple[SlurmSubmitOperator, SlurmSubmitOperator]:
    label = {"map_index_template": "{{ task.job['iteration'] }}"}
    job = {"kind": CONVERT, "iteration": iteration, "cooldown": cooldown}
    convert = SlurmSubmitOperator(task_id=CONVERT_TASK, experiment=config, job=job, **label, **kw.side_job)
    job = {"kind": EVALUATE, "iteration": iteration, "suites": suites, "cooldown": cooldown}
    evaluate = SlurmSubmitOperator(task_id=EVALUATE_TASK, experiment=config, job=job, **label, **kw.side_job)
    convert >> evaluate
    return convert, evaluate


def checkpoint_group(config: Any, kw: TaskKwargs) -> Any:
    """The task group mapped over a run's CheckpointBranch entries (its parameters are their keys)."""

    @task_group(group_id=CHECKPOINT_GROUP)
    def checkpoint(
        iteration: Any, label: Any, suites: Any, cooldown: Any, checkpoint_dir: Any, output_dir: Any
    ) -> None:
        convert, evaluate = convert_and_evaluate(config, kw, iteration, suites, cooldown)
        wait_for(kw, checkpoint_dir, iteration, output_dir) >> convert
        if kw.wandb_sync is not None:
            evaluate >> WandbSyncOperator(task_id=SYNC_TASK, experiment=config, **kw.wandb_sync)

    return checkpoint


def cooldown_group(config: Any, kw: TaskKwargs, conversion: bool) -> Any:
    """The task group mapped over a run's CooldownBranch entries (its parameters are their keys)."""

    @task_group(group_id=COOLDOWN_GROUP)
    def cooldown(
        index: Any,
        name: Any,
        at: Any,
        parent_checkpoint_dir: Any,
        parent_output_dir: Any,
        output_dir: Any,
        checkpoint_dir: Any,
        final_iteration: Any,
        suites: Any,
    ) -> None:
        job = {"kind": COOLDOWN, "cooldown": index}
        template = "from {{ task.job['cooldown'] }}"
        trained = SlurmSubmitOperator(
            task_id=TRAIN_TASK, experiment=config, job=job, map_index_template=template, **kw.training
        )
        wait_for(kw, parent_checkpoint_dir, at, parent_output_dir) >> trained
        if kw.wandb_sync is not None:
            trained >> WandbSyncOperator(task_id=SYNC_TASK, experiment=config, job=job, **kw.wandb_sync)
        if conversion:
            trained >> convert_and_evaluate(config, kw, final_iteration, suites, index)[0]

    return cooldown


def experiment_dag(sweep: Sweep, exp: Experiment, config_dirs: list[str] | None = None) -> DAG:
    cfg = exp.config
    kw = task_kwargs(sweep, cfg)
    # a swept key is what the experiment is: it stays out of the form (an override of it is refused)
    params = run_params(exp.resolved, [k for k in cfg.dag.params if k not in exp.parameters])
    defaults = {k: p.value for k, p in params.items() if k != OVERRIDES_PARAM}
    with DAG(
        dag_id=exp.dag_id,
        schedule=cfg.dag.schedule,
        start_date=_start_date(cfg.dag.start_date),
        catchup=cfg.dag.catchup,
        max_active_runs=1,  # two runs of one experiment would share its output directory
        max_active_tasks=cfg.dag.max_active_tasks,
        tags=experiment_tags(sweep, exp),
        doc_md=experiment_doc(sweep, exp),
        default_args={"owner": cfg.project.owner},
    ) as dag:
        prepare = PrepareExperimentOperator(
            task_id=PREPARE_TASK,
            sweep_file=sweep.file,
            sweep_overrides=sweep.overrides,
            experiment_name=exp.name,
            config_dirs=config_dirs or [],
            param_defaults=defaults,
            scheduled=cfg.dag.schedule is not None,
            checkpoint_branch=cfg.conversion.enabled,
            **kw.cluster,
        )
        config = prepare.output[CONFIG_KEY]
        train = prepare >> SlurmSubmitOperator(task_id=TRAIN_TASK, experiment=config, **kw.training)
        ends: list[Any] = [train]
        if kw.wandb_sync is not None:
            ends.append(train >> WandbSyncOperator(task_id=SYNC_TASK, experiment=config, **kw.wandb_sync))
        if cfg.conversion.enabled:
            ends.append(checkpoint_group(config, kw).expand_kwargs(prepare.output))
        if cfg.cooldowns:
            plan = CooldownPlanOperator(task_id=COOLDOWN_PLAN_TASK, cooldowns=prepare.output[COOLDOWNS_KEY])
            ends.append(cooldown_group(config, kw, cfg.conversion.enabled).expand_kwargs(plan.output))
        ends >> ExperimentReportOperator(task_id=REPORT_TASK, sweep=sweep.name, **kw.cluster)
        outcome = RunOutcomeOperator(task_id=OUTCOME_TASK)
        outcome.set_upstream([t for t in dag.tasks if t is not outcome])
    # Airflow deep-copies a DAG's params into each task it creates (half the build time, measured);
    # a run reads the DAG's own params anyway (merged with the run's conf), so they come last.
    dag.params = ParamsDict(params)
    return dag


def sweep_dag(sweep: Sweep) -> DAG:
    """`oellm__<sweep>`: runs every experiment DAG of the sweep and waits for them."""
    from airflow.configuration import conf
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator

    first = sweep.experiments[0].config if sweep.experiments else None
    with DAG(
        dag_id=sweep_dag_id(sweep.name),
        schedule=None,
        start_date=_start_date(first.dag.start_date) if first else datetime(2026, 1, 1, tzinfo=UTC),
        catchup=False,
        max_active_runs=1,
        tags=[OELLM_TAG, sweep_tag(sweep.name), SWEEP_DAG_TAG],
        doc_md=f"### Sweep {sweep.name}\n\nRuns the {len(sweep.experiments)} experiment DAGs of `{sweep.file}`, "
        "waits for them and summarises them (task `summary`: one row per experiment); each experiment "
        "writes its full report to `<output>/report/`.",
    ) as dag:
        # one mapped task may not have more than [core] max_map_length instances: a bigger sweep runs
        # its experiments from several (run_1, run_2, ...), each over a part of the list in order
        ids = [e.dag_id for e in sweep.experiments]
        size = max(conf.getint("core", "max_map_length", fallback=1024), 1)
        parts = [ids[i : i + size] for i in range(0, len(ids), size)] or [[]]
        runs = [
            TriggerDagRunOperator.partial(
                task_id=run_part_task(n, len(parts)),
                wait_for_completion=True,
                deferrable=True,
                poke_interval=first.monitoring.poll_interval_seconds if first else 60,
                reset_dag_run=False,
                map_index_template="{{ task.trigger_dag_id }}",
            ).expand(trigger_dag_id=part)
            for n, part in enumerate(parts, start=1)
        ]
        reports = {
            "experiments": {e.dag_id: e.name for e in sweep.experiments},
            "trigger_task_id": [r.task_id for r in runs],
            "part_size": size,
        }
        notifications = asdict(first.notifications) if first and first.notifications.notify else None
        summary = SweepSummaryOperator(task_id=SUMMARY_TASK, sweep=sweep.name, notifications=notifications, **reports)
        ends = [*runs, summary]
        if first and sweep.early_stop:
            ends.append(
                early_stop_sensor(sweep, sweep.early_stop, first, reports["trigger_task_id"], size, notifications)
            )
            ends[-1] >> summary  # the summary and the analysis say which points it stopped
        if first:
            ends.append(
                SweepAnalysisOperator(
                    task_id=ANALYSIS_TASK,
                    sweep=sweep.name,
                    output_dir=analysis_dir(first.project.base_output_dir, sweep.name),
                    cluster=platform_target(first),
                    **reports,
                )
            )
            summary >> ends[-1]
        ends >> RunOutcomeOperator(task_id=OUTCOME_TASK)
        runs >> summary
    return dag


def early_stop_sensor(
    sweep: Sweep,
    rule: EarlyStopRule,
    first: RootConfig,
    trigger_task_ids: list[str],
    size: int,
    notifications: dict[str, Any] | None = None,
) -> SweepEarlyStopSensor:
    """The sweep's `early_stop` task, beside its trigger tasks: stops its losing points at each rung."""
    experiments = {}
    for e in sweep.experiments:
        args = e.config.backend.args
        experiments[e.dag_id] = {
            "name": e.name,
            "parameters": e.parameters,
            "output_dir": e.paths.output_dir,
            "train_iters": args.get("train_iters") if isinstance(args.get("train_iters"), int) else None,
            "gpus": e.config.slurm.nodes * e.config.slurm.gpus_per_node,
        }
    return SweepEarlyStopSensor(
        task_id=EARLY_STOP_TASK,
        rule=rule.to_dict(),
        experiments=experiments,
        state_path=f"{analysis_dir(first.project.base_output_dir, sweep.name)}/early_stop.json",
        trigger_task_id=trigger_task_ids,
        part_size=size,
        cluster=platform_target(first),
        poll_interval=first.monitoring.poll_interval_seconds,
        sweep=sweep.name,
        notifications=notifications,
    )


DEFAULT_RECONCILE_INTERVAL_MINUTES = 15


def reconcile_interval() -> timedelta | None:
    """`[oellm] reconcile_interval_minutes` (0: no schedule, the DAG runs when triggered)."""
    from airflow.configuration import conf

    minutes = conf.getint("oellm", "reconcile_interval_minutes", fallback=DEFAULT_RECONCILE_INTERVAL_MINUTES)
    if minutes < 0:
        raise ValueError(f"[oellm] reconcile_interval_minutes must be >= 0, not {minutes}")
    return timedelta(minutes=minutes) if minutes else None


def cluster_dag_ids(sweeps: Sequence[Sweep]) -> dict[ClusterTarget, list[str]]:
    """The experiment DAGs of the sweeps, by the cluster they run on."""
    targets: dict[ClusterTarget, list[str]] = {}
    for sweep in sweeps:
        for exp in sweep.experiments:
            targets.setdefault(platform_target(exp.config), []).append(exp.dag_id)
    return targets


def reconcile_dag(targets: Mapping[ClusterTarget, Sequence[str]]) -> DAG:
    """`oellm_reconcile`: per cluster (its experiment DAGs), cancel the jobs no task will follow."""
    interval = reconcile_interval()
    with DAG(
        dag_id=RECONCILE_DAG_ID,
        schedule=interval,
        start_date=datetime(2026, 1, 1, tzinfo=UTC),
        catchup=False,
        max_active_runs=1,
        is_paused_upon_creation=False,  # it is what stops orphaned jobs: on from the start
        tags=[OELLM_TAG, MAINTENANCE_TAG],
        doc_md="### Orphaned jobs\n\nCancels the jobs whose task was marked failed or success, or whose DAG "
        "run was marked failed, while no triggerer followed them (docs/reliability.md, 'Orphaned jobs'). "
        f"One task per cluster; {'every ' + str(interval) if interval else 'only when triggered'} "
        "(`[oellm] reconcile_interval_minutes`).",
    ) as dag:
        for target, dag_ids in sorted(targets.items(), key=lambda item: item[0].key):
            CancelOrphanedJobsOperator(
                task_id="cancel_orphans_" + re.sub(r"[^A-Za-z0-9_.-]", "_", target.key), cluster=target, dag_ids=dag_ids
            )
    return dag
