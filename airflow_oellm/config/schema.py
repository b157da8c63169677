"""The typed configuration schema: every key a config file may set, its type, default and meaning.

`validate.py` checks plain containers against these dataclasses (strictly: unknown keys and
wrong types are errors) and builds the typed objects. The `doc` metadata feeds the generated
configuration reference (`airflow-oellm schema --markdown`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

REQUIRED: Any = dataclasses.MISSING

Scalar = str | int | float | bool


def opt(default: Any = REQUIRED, doc: str = "", *, factory: Any = None) -> Any:
    """A schema field with documentation."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclass
class ProjectConfig:
    name: str = opt(doc="Project name; also the default W&B project and the start of default names.")
    base_output_dir: str = opt(
        doc="Absolute directory on the cluster; each experiment writes to `<base_output_dir>/<name>`."
    )
    description: str = opt("", "Free text shown in the DAG documentation.")
    owner: str = opt("oellm", "Airflow owner of the generated DAGs.")
    tags: list[str] = opt(doc="Extra Airflow tags for the generated DAGs.", factory=list)
    gpu_hour_budget: float | None = opt(
        None,
        "GPU-hours the whole sweep may plan: one run of every experiment, every job (training, cooldowns, "
        "conversions, evaluations) at its time limit and every attempt. Over it, the sweep is refused.",
    )
    gpu_hour_budget_per_experiment: float | None = opt(
        None, "GPU-hours one experiment run may plan, counted the same way; a run whose overrides exceed it is refused."
    )


@dataclass
class ContainerConfig:
    runtime: Literal["none", "apptainer", "singularity"] = opt(
        "none", "Container runtime that wraps the training command."
    )
    image: str | None = opt(None, "Container image (path to a .sif file).")
    binds: list[str] = opt(doc="Bind mounts, `src[:dst[:opts]]`.", factory=list)
    args: list[str] = opt(doc="Extra arguments for `<runtime> exec`.", factory=list)


DEFAULT_NOTIFY_OUTAGE_AFTER = 900


@dataclass
class OutageNotifierConfig:
    callback: str | None = opt(
        None,
        "Dotted path of what to call about an outage (`mylab.alerts.slack_outage`): a function or an Airflow "
        "notifier, called in the triggerer as `callback(context)` with `event` (`started`, `ended`, "
        "`gave_up`), `message` and `outage` (cluster, since, kind, advice, error, failures, seconds, watches). "
        "Once per cluster and outage in each triggerer, however many jobs wait.",
    )
    after: int | str = opt(
        DEFAULT_NOTIFY_OUTAGE_AFTER,
        "How long an outage lasts before `callback` hears of it (seconds or a SLURM time string): polls "
        "fail and recover by themselves within minutes.",
    )


@dataclass
class PlatformConfig:
    name: str = opt("base", "Platform name (lumi, leonardo, juwels, jupiter, marenostrum, local, ...).")
    description: str = opt("", "What this platform is.")
    template: str = opt(
        "base.sbatch.j2", "sbatch template (file name under the package's or a config root's templates/)."
    )
    modules: list[str] = opt(doc="Environment modules loaded with `module load` (validated names).", factory=list)
    setup: list[str] = opt(
        doc="Trusted shell lines run before the launch. They may use `$VARS` from `env`, "
        "but no `${...}` config interpolation (values reach the script only through quoted `env`).",
        factory=list,
    )
    env: dict[str, Scalar] = opt(
        doc="Environment exported in the job script. Values are quoted; only `$NAME` and `${NAME}` "
        "references expand at job time (write `\\${NAME}` in YAML). Command substitution stays inert.",
        factory=dict,
    )
    container: ContainerConfig = opt(doc="Container settings.", factory=ContainerConfig)
    ssh_conn_id: str = opt("ssh_default", "Airflow SSH connection to this cluster's login node.")
    batch_system: Literal["slurm", "local-process"] = opt(
        "slurm",
        "`slurm`, or `local-process`: jobs run as background processes on the Airflow machine, no SLURM "
        "(sbatch options that need a cluster are ignored; `backend.launcher` must be `none`).",
    )
    local_commands: bool = opt(
        False, "Run SLURM commands on the Airflow machine itself (Airflow on a login node), not over SSH."
    )
    secrets: dict[str, str] = opt(
        doc="Environment variables jobs get from Airflow, by reference: `var:<variable key>` or "
        "`conn:<connection id>/<login|password|host|schema|port|extra.<key>>`. Looked up at submission; "
        "the values reach the job on sbatch's stdin, never a file, log, XCom or rendered script.",
        factory=dict,
    )
    max_outage: int | str = opt(
        "3-00:00:00",
        "How long a waiting task waits out an unreachable cluster (maintenance, an expired SSH certificate): "
        "seconds or a SLURM time string (`1-00:00:00`), `UNLIMITED` for ever. Meanwhile its log, progress and "
        "the dashboard say since when and why; after it, the try ends as lost contact and its retry adopts "
        "the job.",
    )
    on_outage: OutageNotifierConfig = opt(doc="Who hears of an outage, and when.", factory=OutageNotifierConfig)
    compute_internet: bool = opt(
        True,
        "Whether compute nodes reach the internet. Where they do not (JUWELS, JUPITER, Leonardo, MareNostrum 5), "
        "jobs run W&B offline and `tracking.wandb.sync` pushes their runs from the login node.",
    )
    requires: list[str] = opt(
        doc="Config keys this site cannot run without (`slurm.account`, `slurm.qos`): a sweep that leaves one "
        "unset is refused by `validate`, `plan` and the DAG factory, before anything reaches a queue.",
        factory=list,
    )


@dataclass
class SlurmConfig:
    partition: str | None = opt(None, "`--partition`.")
    account: str | None = opt(None, "`--account`.")
    qos: str | None = opt(None, "`--qos`.")
    nodes: int = opt(1, "`--nodes`.")
    gpus_per_node: int = opt(0, "GPUs per node (`--gpus-per-node` when > 0; also used for GPU-hours).")
    ntasks_per_node: int = opt(1, "`--ntasks-per-node`.")
    cpus_per_task: int | None = opt(None, "`--cpus-per-task`.")
    mem: str | None = opt(None, "`--mem`, e.g. `480G` or `0` (all memory).")
    time: int | str = opt(3600, "Time limit per submission: seconds, or a SLURM time string (`2:00:00`, `1-00:00:00`).")
    constraint: str | None = opt(None, "`--constraint`.")
    exclude: list[str] = opt(doc="Nodes never to run on (`--exclude`).", factory=list)
    exclusive: bool = opt(False, "`--exclusive`.")
    signal: str | None = opt(
        "TERM@120",
        "`--signal`: sent to the job steps this many seconds before the time limit, so Megatron's "
        "`--exit-signal-handler` saves a checkpoint.",
    )
    open_mode: Literal["append", "truncate"] = opt("append", "`--open-mode`; `append` keeps the log across a requeue.")
    directives: dict[str, Scalar | None] = opt(
        doc="Any other `#SBATCH` option: `true` gives a bare flag, `false`/`null` leaves it out.",
        factory=dict,
    )
    extra_directives: list[str] = opt(
        doc="Literal `#SBATCH --option[=value]` lines (the seed guide's `sbatch_extra_directives`).",
        factory=list,
    )


@dataclass
class SrunConfig:
    cpu_bind: str | None = opt(None, "`srun --cpu-bind`.")
    args: dict[str, Scalar | None] = opt(
        doc="Other `srun` options: `true` gives a bare flag, `false`/`null` leaves it out.", factory=dict
    )


@dataclass
class BackendConfig:
    name: Literal["megatron", "command"] = opt(
        "megatron", "`megatron`: `entrypoint` with `args` as `--flags`; `command`: run `command` as given."
    )
    launcher: Literal["torchrun", "srun", "none"] = opt(
        "torchrun",
        "`torchrun`: one torchrun per node under srun; `srun`: one task per GPU; "
        "`none`: run in the batch shell (CPU jobs, tests).",
    )
    python: str = opt("python", "Python interpreter inside the job.")
    megatron_path: str | None = opt(None, "Megatron-LM checkout on the cluster; `entrypoint` is relative to it.")
    entrypoint: str = opt("pretrain_gpt.py", "Training script.")
    workdir: str | None = opt(None, "Directory the launch runs in (default: the experiment's output dir).")
    args: dict[str, Any] = opt(
        doc="Megatron arguments: `train_iters: 1000` gives `--train-iters 1000`; `true` gives a bare "
        "flag; `false`/`null` leaves it out; a list gives several values.",
        factory=dict,
    )
    command: list[str] = opt(doc="argv for `name: command` (each element quoted).", factory=list)


# Keys of the seed tool's format (oellm-autoexp) that have another form here: named in the error.
SEED_KEYS = {
    "actions": "event actions are Airflow tasks here: `conversion:`, `evaluation:` and `cooldowns:` "
    "build the checkpoint and cooldown branches (docs/dags.md); a SlurmLogSensor waits for any log event",
    "state_events": "job states are classified by SlurmSubmitOperator: `restart:` and classification rules "
    "(docs/operators.md)",
    "class_name": "configs are plain data here: drop `class_name` (`airflow-oellm migrate FILE` translates a "
    "seed-tool file)",
    "axes": "a sweep's axes go under `sweep:` (`sweep: {axes: ...}`); `airflow-oellm migrate FILE` translates a "
    "seed-tool sweep file",
    "base_values": "a sweep's base values go under `sweep:` (`sweep: {base_values: ...}`); `airflow-oellm migrate "
    "FILE` translates a seed-tool sweep file",
}


@dataclass
class LogEventConfig:
    name: str = opt(doc="Event name.")
    pattern: str = opt(doc="Regex (or substring) matched against each new log line.")
    pattern_type: Literal["regex", "substring"] = opt("regex", "How `pattern` is matched.")
    extract_groups: dict[str, str] = opt(
        doc="Event field -> named group of the regex (`checkpoint_iteration: iteration`).", factory=dict
    )
    metadata: dict[str, Any] = opt(doc="Static fields attached to every event.", factory=dict)


@dataclass
class ClassificationRuleConfig:
    """How an ended job is judged: every condition given must hold; rules are tried in order, before the built-in
    ones (docs/operators.md lists them)."""

    verdict: Literal["success", "retry", "fatal"] = opt(doc="What the job's end means.")
    reason: str = opt(doc="Shown in the task log and the UI; `{detail}` takes the pattern's `detail` group.")
    states: list[str] = opt(doc="SLURM states (`FAILED`, `TIMEOUT`, ...); empty: any.", factory=list)
    exit_codes: list[int] = opt(doc="Exit codes of the job; empty: any.", factory=list)
    pattern: str | None = opt(None, "Regex searched in the end of the job's log (multi-line).")
    when: (
        Literal[
            "hang",
            "not_training",
            "training_done",
            "unfinished_progress",
            "unfinished_no_progress",
            "startup",
            "user_cancel",
            "nan",
        ]
        | None
    ) = opt(None, "A fact the watcher knows: a hang, training done, progress made, the first iterations, a NaN loss...")
    node_pattern: str | None = opt(None, "Regex whose `node` group names a node to exclude from the next submission.")


@dataclass
class LossSpikeConfig:
    """A spike rule over one iteration-line field (docs/anomalies.md gives the reasoning behind the defaults)."""

    window: int = opt(
        50,
        "Normal log intervals in the running baseline: its level is the median of the last 5, its noise the robust "
        "spread of the changes from one interval to the next.",
    )
    min_history: int = opt(10, "Normal log intervals the baseline needs before any value is judged.")
    threshold_sigmas: float = opt(
        6.0,
        "A value is high when it exceeds the baseline's level by this many times its noise (a robust standard "
        "deviation) and by `min_rise`.",
    )
    min_rise: float = opt(
        0.05, "The least rise over the level, as a fraction of it, that is high (a floor for a flat baseline)."
    )
    sustain: int = opt(2, "High log intervals in a row that make a spike (it begins at the first).")
    recover_within: int | None = opt(
        20,
        "Log intervals after its start within which a spike must be back under the threshold, else it is "
        "unrecovered (null: never).",
    )


@dataclass
class GradNormSpikeConfig(LossSpikeConfig):
    threshold_sigmas: float = opt(
        10.0, "A grad norm is high when it exceeds the level by this many times the noise and by `min_rise`."
    )
    min_rise: float = opt(1.0, "The least rise over the level, as a fraction of it, that is high (1.0: twice it).")
    sustain: int = opt(1, "High log intervals in a row that make a spike.")
    recover_within: int | None = opt(None, "Log intervals within which a grad-norm spike must recover (null: never).")


@dataclass
class LearningRateRemedyConfig:
    """The rewound training's learning rate, lowered for a while: Megatron's scheduler from the configured
    `lr` and `min_lr` times `multiplier` (`--override-opt_param-scheduler`), in a job that stops after
    `iterations` (`--exit-interval`, with a save). The next job goes on at the configured rate, and so does
    every later one: the checkpoint holds the lowered rate, which `--override-opt_param-scheduler` replaces."""

    multiplier: float = opt(0.5, "Factor on `backend.args.lr` and `min_lr` (not 1: that changes nothing).")
    iterations: int = opt(
        100,
        "Iterations trained at the lowered rate after the checkpoint the training was rewound to (the skipped "
        "ones not counted).",
    )


@dataclass
class RewindConfig:
    """What happens when the loss diverges: an unrecovered loss spike, or a NaN loss for
    `monitoring.nan_intervals` log intervals."""

    max_rewinds: int = opt(
        2,
        "Rewinds per training run: the job is stopped without a save, the checkpoints after the last good one are "
        "moved aside (`checkpoints/discarded/<rewind>/`) and the training resumes from it. Once they are used up, "
        "a divergence fails the training. 0: never rewind (an unrecovered spike is then only an event, and a NaN "
        "loss fails the training).",
    )
    skip_data: bool = opt(
        True,
        "The rewound training skips the batches from the last normal log interval to where the divergence was "
        "acted on (`--iterations-to-skip`, Megatron core 0.12+).",
    )
    exclude_nodes: bool = opt(
        False,
        "The rewound training avoids the nodes the diverged job ran on (a faulty GPU can corrupt results without "
        "an error); for the rest of the training, as after a node failure.",
    )
    learning_rate: LearningRateRemedyConfig | None = opt(
        None,
        "The rewound training's learning rate, lowered for some iterations (one job of its own, an attempt of "
        "`restart.max_attempts`); null (the default): the configured rate. `{}`: half of it for 100 iterations.",
    )


@dataclass
class AnomaliesConfig:
    """Loss spikes, grad-norm spikes and NaN losses, found in the iteration lines while training runs."""

    loss_spike: LossSpikeConfig | None = opt(
        doc="When the loss spikes (events `loss_spike`, `loss_spike_recovered`, `loss_spike_unrecovered`); "
        "null: never judged.",
        factory=LossSpikeConfig,
    )
    grad_norm_spike: GradNormSpikeConfig | None = opt(
        doc="When the grad norm spikes (events `grad_norm_spike`, ...); null: never judged.",
        factory=GradNormSpikeConfig,
    )
    rewind: RewindConfig = opt(doc="Rewinding a diverged training to its last good checkpoint.", factory=RewindConfig)
    rewind_margin: int = opt(
        0,
        "Iterations before the last normal log interval that a rewind target must lie: the checkpoint named is "
        "the last one saved at or before that.",
    )


@dataclass
class MonitoringConfig:
    poll_interval_seconds: int = opt(60, "Seconds between status polls of the job.")
    start_estimate_interval_seconds: int = opt(
        600,
        "Seconds between two asks for the pending jobs' expected starts (`squeue --start`, one command for all "
        "of a cluster's pending jobs, none while no job pends); 0: never.",
    )
    inactivity_threshold_seconds: int = opt(
        1800, "A RUNNING job with no log growth and no iteration progress for this long is a hang."
    )
    output_paths: list[str] = opt(doc="Extra files whose modification time counts as activity.", factory=list)
    log_events: list[LogEventConfig] = opt(doc="Regex events matched in the job log.", factory=list)
    nan_intervals: int = opt(
        3,
        "Log intervals in a row with a NaN or infinite loss (or grad norm) after which the training counts as "
        "diverged: its job is cancelled and the task fails, not retried (0: never).",
    )
    anomalies: AnomaliesConfig = opt(
        doc="Loss spikes, grad-norm spikes and NaN losses: events in `airflow-oellm events` and the task log.",
        factory=AnomaliesConfig,
    )
    rules: list[ClassificationRuleConfig] = opt(
        doc="Your rules for how a job's end is judged (success, retry, fatal), tried before the built-in ones; "
        "`airflow-oellm events LOG --outcome STATE` tries them on a log.",
        factory=list,
    )


@dataclass
class RestartConfig:
    max_attempts: int = opt(3, "Submissions per training task, the first included (Airflow retries + 1).")
    retry_delay_seconds: int = opt(60, "Delay before a retryable failure is resubmitted.")


@dataclass
class JobResources:
    """Resources of a side job (conversion, evaluation); unset values come from `slurm`."""

    time: int | str = opt(3600, "Time limit: seconds or a SLURM time string.")
    nodes: int = opt(1, "`--nodes`.")
    gpus_per_node: int = opt(0, "GPUs per node (0: CPU only).")
    cpus_per_task: int | None = opt(None, "`--cpus-per-task` (default: the training's).")
    mem: str | None = opt(None, "`--mem`.")
    partition: str | None = opt(None, "`--partition` (default: the training's).")


@dataclass
class ConversionConfig:
    enabled: bool = opt(True, "Convert selected checkpoints to HuggingFace format.")
    command: list[str] = opt(
        doc="Converter argv on the cluster; `--megatron-checkpoint`, `--iteration`, `--output-dir`, "
        "`--model-type`, `--dtype` and `--max-shard-size` are appended.",
        factory=lambda: ["airflow-oellm", "convert"],
    )
    model_type: Literal["auto", "llama", "qwen3"] = opt("auto", "HF architecture to write.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = opt(
        "auto", "Weights dtype of the HF model (auto: the training precision)."
    )
    max_shard_size: str = opt("5GB", "safetensors shard size.")
    resources: JobResources = opt(doc="Resources of a conversion job.", factory=JobResources)


@dataclass
class EvalSuiteConfig:
    name: str = opt(doc="Suite name (`quick`, `full`, `benchmark`, ...); results go to `<suite>.json`.")
    when: Literal["every", "interval", "final"] = opt(
        "every", "Which checkpoints: every checkpoint, every `every_iterations`, or the final one only."
    )
    every_iterations: int | None = opt(None, "With `when: interval`: iterations between evaluated checkpoints.")
    tasks: list[str] = opt(doc="Evaluation tasks (`perplexity`, lm-eval task names).", factory=lambda: ["perplexity"])
    args: list[str] = opt(doc="Extra arguments for the evaluation command.", factory=list)


@dataclass
class EvaluationConfig:
    enabled: bool = opt(True, "Evaluate converted checkpoints.")
    command: list[str] = opt(
        doc="Evaluation argv on the cluster; `--hf-dir`, `--output-file`, `--iteration` and `--tasks` are appended.",
        factory=lambda: ["airflow-oellm", "evaluate"],
    )
    suites: list[EvalSuiteConfig] = opt(
        doc="The seed guide's tiers: quick on every checkpoint, full every k iterations, a benchmark suite at the end.",
        factory=lambda: [EvalSuiteConfig(name="quick")],
    )
    resources: JobResources = opt(doc="Resources of an evaluation job.", factory=JobResources)


@dataclass
class RetentionConfig:
    """Deleting a training's older checkpoints while it runs, to stay within quota. The watch deletes them
    after each complete save; never the newest `keep_last`, a multiple of `keep_every`, the one the tracker
    names, one a rewind could load, or one a branch (conversion, cooldown) has not completed from."""

    keep_last: int = opt(2, "The newest complete checkpoints kept.")
    keep_every: int = opt(
        0,
        "Iterations: a checkpoint at a multiple of it is kept for good (0: none); a multiple of "
        "`backend.args.save_interval`.",
    )


@dataclass
class CooldownConfig:
    at: int = opt(doc="Checkpoint iteration the cooldown starts from (must be a checkpoint).")
    name: str | None = opt(None, "Suffix of the cooldown's name (default `cooldown_<at>`).")
    train: bool = opt(True, "Train (false: only evaluate checkpoint `at`, the seed guide's 10k case).")
    overrides: list[str] = opt(
        doc="Dotted overrides on top of the parent's resolved config (`backend.args.lr=1e-5`, ...).", factory=list
    )
    suites: list[str] | None = opt(
        None, "Evaluation suites on the cooldown's final checkpoint (default: every configured suite)."
    )


@dataclass
class DagConfig:
    schedule: str | None = opt(
        None, "Airflow schedule (cron or preset); scheduled runs get their own output dir per logical date."
    )
    start_date: str = opt("2026-01-01", "First logical date (ISO date).")
    catchup: bool = opt(False, "Create runs for missed intervals when unpaused.")
    tags: list[str] = opt(doc="Extra DAG tags.", factory=list)
    params: list[str] = opt(
        doc="Config keys shown as typed fields in the trigger form (values of the resolved config as defaults).",
        factory=lambda: ["backend.args.train_iters", "backend.args.lr", "backend.args.save_interval", "slurm.time"],
    )
    max_active_tasks: int = opt(64, "Tasks of one run active at once.")
    deferrable: bool = opt(
        True,
        "Wait in the triggerer (no worker slot held). False: the training polls from its worker and the "
        "sensors re-poke in `reschedule` mode (deployments without a triggerer, `dag.test()`).",
    )


@dataclass
class ExperimentInfo:
    """Filled in by the sweep planner for each experiment; read-only for config files."""

    name: str = opt("", "Stable experiment name (from `sweep.name_template`).")
    index: int = opt(0, "Position of the experiment in the expanded sweep.")
    sweep: str = opt("", "Sweep name (file stem unless `sweep.name` is set).")
    dag_id: str = opt("", "Airflow DAG id of the experiment.")
    output_dir: str = opt("", "`<project.base_output_dir>/<name>`.")
    checkpoint_dir: str = opt("", "`<output_dir>/checkpoints`.")
    log_dir: str = opt("", "`<output_dir>/logs`.")
    log_path: str = opt("", "`<log_dir>/<name>-%j.out` (SLURM fills in the job id).")
    script_dir: str = opt("", "`<output_dir>/scripts`.")
    provenance_dir: str = opt("", "`<output_dir>/provenance`.")
    parameters: dict[str, Any] = opt(doc="The sweep values of this experiment.", factory=dict)


AlertEvent = Literal[
    "training_fatal", "retries_exhausted", "stalled", "early_stop", "sweep_finished", "outage", "budget_reached"
]


@dataclass
class NotifierConfig:
    webhook: str | None = opt(
        None,
        "POST each alert as JSON to this URL (its `text` is what Slack, Mattermost and Teams incoming webhooks "
        "show), or to the URL a secret reference holds (`var:<key>`, `conn:<id>/<field>`): a webhook URL is a "
        "secret.",
    )
    notifier: str | None = opt(
        None,
        "Or the dotted path of an Airflow notifier class (`airflow.providers.smtp.notifications.smtp.SmtpNotifier`"
        ", any provider's `BaseNotifier`), a notifier instance or a function, called with a context holding "
        "`message` (use `{{ message }}` in its templates) and `alert`.",
    )
    args: dict[str, Any] = opt(doc="Keyword arguments the notifier class is made with.", factory=dict)
    events: list[AlertEvent] = opt(
        doc="What it hears of (default: everything): `training_fatal`, `retries_exhausted`, `stalled` (a hang its "
        "watch cancelled), `early_stop` (a point the sweep's rung stopped), `sweep_finished` (with the summary "
        "table), `outage` (the cluster unreachable for `platform.on_outage.after`, reachable again, or a watch "
        "that gave up: once per sweep and outage), `budget_reached` (a run refused: its plan is over a GPU-hour "
        "budget).",
        factory=list,
    )


@dataclass
class NotificationsConfig:
    notify: list[NotifierConfig] = opt(doc="Who hears of what.", factory=list)
    dashboard_url: str | None = opt(
        None,
        "The dashboard's address, for the link in each alert (`https://airflow.example.org/oellm`); default: "
        "Airflow's `[api] base_url` with `/oellm`.",
    )


WANDB_CLOUD_APP = "https://wandb.ai"


@dataclass
class WandbConfig:
    entity: str | None = opt(
        None,
        "W&B entity (user or team) the runs belong to: `WANDB_ENTITY` of the jobs, and part of the run's link. "
        "Unset: the API key's default entity, and no link (its address needs the entity).",
    )
    host: str | None = opt(
        None,
        f"A W&B server's address (`https://wandb.example.org`): `WANDB_BASE_URL` of the jobs and of the sync, "
        f"and where the run links point. Unset: W&B's cloud ({WANDB_CLOUD_APP}).",
    )
    mode: Literal["auto", "online", "offline"] = opt(
        "auto",
        "`auto`: offline where `platform.compute_internet` is false, else online; `online` or `offline` to choose.",
    )
    sync: bool = opt(
        True,
        "For offline runs: push them from the login node (`wandb sync`, over the cluster's SSH connection, "
        "with `platform.secrets` such as `WANDB_API_KEY`) after each checkpoint branch and at the end.",
    )
    sync_command: list[str] = opt(
        doc="The command that syncs one offline run directory on the login node, given it as last argument "
        "(a virtualenv's `wandb`, or `[bash, -lc, 'module load wandb && wandb sync \"$0\"']`).",
        factory=lambda: ["wandb", "sync"],
    )


@dataclass
class TensorBoardConfig:
    url: str | None = opt(
        None,
        "The page of a TensorBoard server that shows a log directory, `{logdir}` standing for it (URL-quoted): "
        "the TensorBoard link. Unset: the link opens the experiment's dashboard page, which names the "
        "directory and how to view it.",
    )


@dataclass
class TrackingConfig:
    wandb: WandbConfig = opt(
        doc="Weights & Biases, for a Megatron training with `backend.args.wandb_project`: one W&B run per "
        "training or cooldown across all its attempts (`WANDB_RUN_ID` made from its output directory, "
        "`WANDB_RESUME=allow`).",
        factory=WandbConfig,
    )
    tensorboard: TensorBoardConfig = opt(
        doc="TensorBoard, for a Megatron training with `backend.args.tensorboard_dir`.", factory=TensorBoardConfig
    )


@dataclass
class RootConfig:
    project: ProjectConfig = opt(doc="Project identity and output location.")
    platform: PlatformConfig = opt(doc="Cluster-specific environment.", factory=PlatformConfig)
    slurm: SlurmConfig = opt(doc="Resources and `#SBATCH` directives.", factory=SlurmConfig)
    srun: SrunConfig = opt(doc="`srun` options for the launch.", factory=SrunConfig)
    backend: BackendConfig = opt(doc="What runs: Megatron or a command.", factory=BackendConfig)
    monitoring: MonitoringConfig = opt(doc="Log watching and hang detection.", factory=MonitoringConfig)
    restart: RestartConfig = opt(doc="Retry policy after retryable failures.", factory=RestartConfig)
    vars: dict[str, Any] = opt(
        doc="Free variables for interpolation (`${vars.x}`); bare sweep axis names land here.", factory=dict
    )
    sweep: dict[str, Any] = opt(doc="The sweep definition (checked by the sweep expander).", factory=dict)
    conversion: ConversionConfig = opt(doc="Megatron -> HuggingFace conversion jobs.", factory=ConversionConfig)
    evaluation: EvaluationConfig = opt(doc="Evaluation jobs on converted checkpoints.", factory=EvaluationConfig)
    cooldowns: list[CooldownConfig] = opt(doc="Cooldown runs branched off the training at checkpoints.", factory=list)
    retention: RetentionConfig | None = opt(
        None, "Checkpoint retention; null (the default): every checkpoint is kept. `{}` keeps the last 2."
    )
    dag: DagConfig = opt(doc="How the experiment's Airflow DAG is built.", factory=DagConfig)
    notifications: NotificationsConfig = opt(
        doc="Alerts: a training failed, retries ran out, a job stalled, the sweep finished, ...",
        factory=NotificationsConfig,
    )
    tracking: TrackingConfig = opt(
        doc="W&B and TensorBoard: run identity, offline mode and sync, links.", factory=TrackingConfig
    )
    experiment: ExperimentInfo = opt(doc="Set by the planner; read-only.", factory=ExperimentInfo)


# `class_name` tags of the seed tool's format that mean what the section already is: accepted and ignored.
SEED_CLASS_NAMES: dict[type, str] = {ProjectConfig: "Project"}

# Top-level keys a config file may not set: the planner owns them.
PROTECTED_SECTIONS = frozenset({"experiment"})
