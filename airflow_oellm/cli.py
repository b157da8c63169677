"""The `airflow-oellm` command: validate, plan, render, detect-platform, schema, events, analyze, convert,
evaluate.

Arguments that look like overrides (`key=value`, `+key=value`, `~key`) apply to every sweep
the command reads. Invalid input exits with status 1 and one line per problem on stderr:
`file:line: key.path: message`. Nothing here imports Airflow, so the command starts fast.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow_oellm.deprecation import ConfigDeprecationWarning

_OVERRIDE = re.compile(r"^(~|\+\+?)?[A-Za-z_][A-Za-z0-9_.\-]*(=|$)")


def _split_args(items: Sequence[str]) -> tuple[list[str], list[str]]:
    files, overrides = [], []
    for item in items:
        is_override = ("=" in item or item.startswith(("~", "+"))) and _OVERRIDE.match(item)
        (overrides if is_override else files).append(item)
    return files, overrides


def _fail(exc: Exception) -> int:
    from airflow_oellm.config.errors import ConfigError

    issues = exc.issues if isinstance(exc, ConfigError) else [exc]
    for issue in issues:
        print(f"error: {issue}", file=sys.stderr)
    return 1


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _load_one(args: argparse.Namespace, enforce_budget: bool = True) -> Any:
    """The sweep named on the command line, or an exit status."""
    from airflow_oellm.config import ConfigError, load_sweep

    files, overrides = _split_args([args.sweep, *args.overrides])
    if len(files) != 1:
        print(
            f"error: {args.command} takes one sweep file (other arguments must be key=value overrides)", file=sys.stderr
        )
        return 2
    try:
        return load_sweep(files[0], overrides, config_dirs=args.config_dir, enforce_budget=enforce_budget)
    except ConfigError as exc:
        return _fail(exc)


def _render_issue(experiment: Any, exc: Any) -> Any:
    """A RenderError as an Issue located in the file that set the key."""
    from airflow_oellm.config import Issue

    issue = experiment.origins.issue(exc.message, exc.key)
    return Issue(f"{issue.message} (experiment {experiment.name})", issue.key, issue.file, issue.line)


def cmd_plan(args: argparse.Namespace) -> int:
    from airflow_oellm.config import ConfigError
    from airflow_oellm.config.budget import limit_gpu_hours
    from airflow_oellm.config.loader import budget_issues, planned_hours
    from airflow_oellm.monitor.retention import disk_plan
    from airflow_oellm.slurm.timespec import time_limit_seconds

    sweep = _load_one(args, enforce_budget=False)  # the figures are shown, then the budget is checked
    if isinstance(sweep, int):
        return sweep
    try:
        planned = planned_hours(sweep.experiments)
        over_budget = budget_issues(sweep.experiments, whole_sweep=True, planned=planned)
    except ConfigError as exc:
        return _fail(exc)
    rows = []
    for e in sweep.experiments:
        hours = limit_gpu_hours(e.config.slurm)
        rows.append(
            {
                "name": e.name,
                "index": e.index,
                "dag_id": e.dag_id,
                "sweep": sweep.name,
                "platform": e.config.platform.name,
                "output_dir": e.paths.output_dir,
                "checkpoint_dir": e.paths.checkpoint_dir,
                "log_path": e.paths.log_path,
                "parameters": e.parameters,
                "nodes": e.config.slurm.nodes,
                "gpus_per_node": e.config.slurm.gpus_per_node,
                "time_limit_seconds": time_limit_seconds(e.config.slurm.time),
                "max_attempts": e.config.restart.max_attempts,
                "gpu_hours": hours,
                "gpu_hours_max": planned[e.name].training,
                "planned_gpu_hours": planned[e.name].as_record(),
                "gpu_hour_budget_per_experiment": e.config.project.gpu_hour_budget_per_experiment,
                "checkpoints": disk.record() if (disk := disk_plan(e.config)) is not None else None,
            }
        )
    if args.json:
        json.dump(rows, sys.stdout, indent=2, default=str)
        print()
    else:
        budget = sweep.experiments[0].config.project.gpu_hour_budget if sweep.experiments else None
        _print_plan(sweep, rows, budget)
    return _fail(ConfigError(over_budget)) if over_budget else 0


def _print_plan(sweep: Any, rows: list[dict[str, Any]], budget: float | None) -> None:
    from airflow_oellm.slurm.timespec import format_slurm_time

    keys = sweep.varying_keys

    def params(row: dict[str, Any]) -> str:
        values = row["parameters"]
        return " ".join(f"{_short(k)}={values[k]}" for k in keys if k in values) or "-"

    def resources(row: dict[str, Any]) -> str:
        limit = "UNLIMITED" if row["time_limit_seconds"] is None else format_slurm_time(row["time_limit_seconds"])
        gpus = f"{row['gpus_per_node']} GPU" if row["gpus_per_node"] else "CPU"
        return f"{row['nodes']} x {gpus} x {limit}"

    def planned(row: dict[str, Any]) -> str:
        limit = row["gpu_hour_budget_per_experiment"]
        total = row["planned_gpu_hours"]["total"]
        return f"{total:.1f}" + (f" / {limit:.1f}" if limit is not None else "")

    table = [("#", "experiment", "parameters", "nodes x GPUs x time", "GPU-h", "GPU-h max", "planned", "checkpoints")]
    for r in rows:
        table.append(
            (
                str(r["index"]),
                r["name"],
                params(r),
                resources(r),
                f"{r['gpu_hours']:.1f}",
                f"{r['gpu_hours_max']:.1f}",
                planned(r),
                r["checkpoints"]["text"] if r["checkpoints"] else "-",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    print(
        f"sweep {sweep.name} ({sweep.file}): {len(rows)} experiments, platform "
        f"{', '.join(sorted({r['platform'] for r in rows})) or '-'}"
    )
    for i, row in enumerate(table):
        print(
            "  ".join(
                cell.rjust(w) if j in (0, 4, 5, 6) else cell.ljust(w)
                for j, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    total = sum(r["gpu_hours"] for r in rows)
    total_max = sum(r["gpu_hours_max"] for r in rows)
    print(
        f"total: {len(rows)} experiments, {total:.1f} GPU-hours at the time limit "
        f"({total_max:.1f} if every attempt runs to its limit)"
    )
    disks = [r["checkpoints"] for r in rows if r["checkpoints"]]
    if disks:
        lower = any(d["bytes_each_complete"] is False for d in disks)
        print(
            "checkpoints: a training's own, at most at once (with retention: while conversions keep up; a "
            "cooldown's come on top)"
            + ("; >= : the layers only, the embeddings depend on the tokenizer's vocabulary" if lower else "")
        )
    planned_total = sum(r["planned_gpu_hours"]["total"] for r in rows)
    budget_text = f" of a budget of {budget:.1f} (project.gpu_hour_budget)" if budget is not None else ""
    print(
        f"planned: {planned_total:.1f} GPU-hours{budget_text}, with cooldowns, conversions and evaluations, "
        "every job at its time limit and every attempt"
    )


def cmd_render(args: argparse.Namespace) -> int:
    from airflow_oellm.config import ConfigError
    from airflow_oellm.jobscript.render import RenderError, render_sbatch

    sweep = _load_one(args)
    if isinstance(sweep, int):
        return sweep
    try:
        if args.experiment is None:
            if len(sweep.experiments) != 1:
                names = ", ".join(e.name for e in sweep.experiments[:10])
                more = " ..." if len(sweep.experiments) > 10 else ""
                print(
                    f"error: {sweep.file}: the sweep has {len(sweep.experiments)} experiments; "
                    f"pick one with --experiment NAME ({names}{more})",
                    file=sys.stderr,
                )
                return 1
            experiment = sweep.experiments[0]
        else:
            experiment = sweep.experiment(args.experiment)
        script = render_sbatch(experiment.materialize(), template_dirs=sweep.template_dirs)
    except ConfigError as exc:
        return _fail(exc)
    except RenderError as exc:
        return _fail(ConfigError([_render_issue(experiment, exc)]))
    if args.output:
        Path(args.output).write_text(script)
    else:
        sys.stdout.write(script)
    return 0


def _validate_file(path: str, overrides: list[str], config_dirs: list[str]) -> str:
    """One line of success text; raises ConfigError."""
    from airflow_oellm.config import ConfigError, load_sweep
    from airflow_oellm.config.compose import Composer, config_roots
    from airflow_oellm.config.milestones import plan
    from airflow_oellm.config.yamlio import load_yaml
    from airflow_oellm.jobscript.render import RenderError, render_run_scripts, render_sbatch

    data = load_yaml(path)
    if "project" not in data and "sweep" not in data:
        composer = Composer(config_roots(path, config_dirs))
        composer.compose_file(Path(path))
        return f"ok: {path} (config group file)"
    sweep = load_sweep(path, overrides, config_dirs=config_dirs)
    issues = []
    now = datetime.now(UTC)
    for e in sweep.experiments:
        try:
            render_sbatch(e.materialize(), template_dirs=sweep.template_dirs)
            config = e.runtime_config(now)  # the run's side jobs: cooldown points, conversions, evaluations
            render_run_scripts(config, plan(config))
        except RenderError as exc:
            issues.append(_render_issue(e, exc))
        except ConfigError as exc:
            # a planning problem names the key: point at the file and line that set it
            issues.extend(i if i.file else e.origins.issue(i.message, i.key) for i in exc.issues)
    if issues:
        raise ConfigError(list(dict.fromkeys(issues)))  # the same problem in every experiment: once
    return f"ok: {path} ({len(sweep.experiments)} experiments, sweep {sweep.name})"


def cmd_validate(args: argparse.Namespace) -> int:
    from airflow_oellm.config import ConfigError

    files, overrides = _split_args(args.files)
    if not files:
        print("error: validate needs at least one file", file=sys.stderr)
        return 2
    status = 0
    for path in files:
        try:
            print(_validate_file(path, overrides, args.config_dir))
        except ConfigError as exc:
            status = _fail(exc)
    return status


def cmd_detect_platform(args: argparse.Namespace) -> int:
    from airflow_oellm.config.platforms import detect_platform

    found = detect_platform()
    if args.json:
        print(json.dumps({"platform": found.name, "reason": found.reason}))
    elif args.explain:
        print(f"{found.name}: {found.reason}")
    else:
        print(found.name)
    return 0


def _configured_monitoring(path: str, config_dirs: list[str]) -> Any:
    """The typed `monitoring` section of a sweep (its first experiment) or of any config file; raises ConfigError."""
    import re as regex

    from airflow_oellm.config import ConfigError, Issue, load_sweep
    from airflow_oellm.config.compose import check_file_keys
    from airflow_oellm.config.schema import MonitoringConfig
    from airflow_oellm.config.validate import Validator
    from airflow_oellm.config.yamlio import key_line, load_yaml

    data = load_yaml(path)
    if "project" in data and "sweep" in data:
        return load_sweep(path, config_dirs=config_dirs).experiments[0].config.monitoring
    check_file_keys(path, data)
    validator = Validator()
    monitoring = validator.check(data.get("monitoring") or {}, MonitoringConfig, "monitoring")
    issues = [Issue(i.message, i.key, path, key_line(path, i.key)) for i in validator.issues]
    patterns = [
        (f"monitoring.log_events[{i}].pattern", e.pattern, e.pattern_type)
        for i, e in enumerate(monitoring.log_events if monitoring else [])
    ]
    for i, rule in enumerate(monitoring.rules if monitoring else []):
        patterns += [(f"monitoring.rules[{i}].{k}", getattr(rule, k), "regex") for k in ("pattern", "node_pattern")]
    for key, pattern, kind in patterns:
        if pattern is not None and kind == "regex":
            try:
                regex.compile(pattern)
            except regex.error as exc:
                issues.append(Issue(f"invalid regex: {exc}", key, path, key_line(path, key)))
    if issues:
        raise ConfigError(issues)
    return monitoring


def _outcome_arg(text: str) -> tuple[Any, int | None, str | None]:
    """`STATE[:EXIT_CODE]` (`FAILED:16`, `TIMEOUT`, `CANCELLED by 1001`) -> (state, exit code, cancelled by)."""
    from airflow_oellm.slurm.states import JobState

    state_text, _, code = text.partition(":")
    state = JobState.parse(state_text)
    if state is JobState.UNKNOWN or not (code == "" or code.strip().lstrip("-").isdigit()):
        raise argparse.ArgumentTypeError(
            f"expected STATE[:EXIT_CODE] with a SLURM state (COMPLETED, FAILED:16, TIMEOUT, ...), got {text!r}"
        )
    who = state_text.partition(" by ")[2]
    return state, int(code) if code.strip() else None, who.strip() or None


def cmd_events(args: argparse.Namespace) -> int:
    from airflow_oellm.config import ConfigError
    from airflow_oellm.monitor.anomalies import AnomalyDetector, AnomalySettings
    from airflow_oellm.monitor.attempts import attempt_rules
    from airflow_oellm.monitor.classify import NAN_INTERVALS, attempt_outcome, classify
    from airflow_oellm.monitor.events import event_specs, match_log
    from airflow_oellm.monitor.watch import TAIL_BYTES, empty_summary, summarize

    try:
        monitoring = _configured_monitoring(args.config, args.config_dir) if args.config else None
    except ConfigError as exc:
        return _fail(exc)
    try:
        data = Path(args.logfile).read_bytes()
    except OSError as exc:
        print(f"error: {args.logfile}: {exc.strerror}", file=sys.stderr)
        return 1
    configured = [vars(e) for e in monitoring.log_events] if monitoring else []
    summary = empty_summary()
    settings = AnomalySettings.from_config(monitoring.anomalies, monitoring.nan_intervals) if monitoring else None
    detector = AnomalyDetector(settings)
    for event in detector.process(match_log(data, event_specs(configured, builtins=not args.no_builtins))):
        summarize(summary, event)
        if args.json:
            print(
                json.dumps(
                    {
                        "name": event.name,
                        "groups": event.groups,
                        "line_no": event.line_no,
                        "offset": event.offset,
                        "metadata": event.metadata,
                    }
                )
            )
        else:
            groups = " ".join(f"{k}={v}" for k, v in event.groups.items())
            print(f"{event.line_no:>7}  {event.name:<18} {groups}")
    if args.outcome is None:
        return 0
    state, exit_code, cancelled_by = args.outcome
    saved = summary["checkpoints_saved"]
    # the watcher reads the tracker file; offline, the last save the log reports stands in for it
    after = max(saved) if saved else summary["resumed_from"]
    outcome = attempt_outcome(
        state,
        summary,
        data[-TAIL_BYTES:].decode("utf-8", errors="replace"),
        exit_code=exit_code,
        cancelled_by=cancelled_by,
        checkpoint_before=summary["resumed_from"],
        checkpoint_after=after,
        nan_limit=monitoring.nan_intervals if monitoring else NAN_INTERVALS,
    )
    verdict = classify(outcome, attempt_rules([vars(r) for r in monitoring.rules] if monitoring else []))
    conclusion = {**verdict.to_dict(), "resume_from": after if verdict.verdict == "retry" else None}
    if args.json:
        print(json.dumps(conclusion))
        return 0
    print(f"outcome: {verdict.verdict}: {verdict.reason}")
    print(f"exclude nodes: {', '.join(verdict.exclude_nodes) or '-'}")
    if verdict.verdict == "retry":
        where = f"checkpoint {after}" if after else "the start (no checkpoint in the log)"
        print(f"resumes from: {where}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from airflow_oellm.analysis.render import markdown, plots
    from airflow_oellm.analysis.sweep import analyse_reports
    from airflow_oellm.config.naming import ANALYSIS_DIR, REPORT_DIR

    root = Path(args.sweep_output_dir)
    if not root.is_dir():
        print(f"error: {root}: not a directory", file=sys.stderr)
        return 1
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(root.rglob(f"{REPORT_DIR}/report.json")):
        if ANALYSIS_DIR in path.relative_to(root).parts:
            continue
        try:
            report = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            print(f"warning: {path}: not read ({exc})", file=sys.stderr)
            continue
        if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
            print(f"warning: {path}: not an experiment report (no rows)", file=sys.stderr)
            continue
        sweep = report.get("sweep") if isinstance(report.get("sweep"), str) else None
        sweeps.setdefault(sweep or root.resolve().name, []).append(report)
    if not sweeps:
        print(f"error: no experiment report (*/{REPORT_DIR}/report.json) under {root}", file=sys.stderr)
        return 1
    results = {}
    for sweep, reports in sorted(sweeps.items()):
        analysis = analyse_reports(reports, bootstrap=args.bootstrap)
        out = Path(args.output) / sweep if args.output else root / ANALYSIS_DIR / sweep
        out.mkdir(parents=True, exist_ok=True)
        text = markdown(analysis, sweep)
        (out / "analysis.json").write_text(json.dumps(analysis, indent=2) + "\n")
        (out / "analysis.md").write_text(text)
        for name, data in plots(analysis, sweep).items():
            (out / name).write_bytes(data)
        results[sweep] = analysis
        if not args.json:
            print(text)
            print(f"written to {out}/")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from airflow_oellm.config.reference import schema_markdown

    sys.stdout.write(schema_markdown())
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from airflow_oellm.megatron.convert import convert_checkpoint

    try:
        result = convert_checkpoint(
            args.megatron_checkpoint,
            args.output_dir,
            iteration=args.iteration,
            model_type=args.model_type,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
        )
    except (OSError, ValueError) as exc:  # layout, read and unsupported-model errors are ValueErrors
        return _fail(exc)
    if args.json:
        print(json.dumps(result.__dict__))
    else:
        at = "release" if result.iteration is None else f"iteration {result.iteration}"
        print(
            f"converted {result.source} ({at}, {result.source_format}) to {result.output_dir}: "
            f"{result.architecture}, {result.tensors} tensors, {result.bytes / 1e6:.1f} MB {result.dtype} "
            f"in {len(result.files)} file(s), {result.seconds:.1f} s"
        )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from airflow_oellm.evaluation.run import evaluate

    try:
        document = evaluate(
            args.hf_dir,
            args.output_file,
            tasks=args.tasks.split(","),
            iteration=args.iteration,
            text_file=args.text_file,
            tokenizer_dir=args.tokenizer,
            include_path=args.include_path,
            window=args.window,
            batch_size=args.batch_size,
            dtype=args.dtype,
            device=args.device,
        )
    except (OSError, ValueError) as exc:
        return _fail(exc)
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in document["metrics"].items())
    at = "" if args.iteration is None else f" iteration {args.iteration}"
    print(f"evaluated{at} ({', '.join(document['tasks'])}): {metrics} -> {args.output_file}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from airflow_oellm.config import ConfigError, Issue
    from airflow_oellm.config.migrate import migrate

    try:
        migration = migrate(args.seed_files, name=args.name, output_dir=args.output_dir, config_dirs=args.config_dir)
    except ConfigError as exc:
        return _fail(exc)
    for note in migration.notes:
        print(f"note: {note}", file=sys.stderr)
    if not args.output:
        sys.stdout.write(migration.text())
        return 0
    try:
        Path(args.output).write_text(migration.text())
    except OSError as exc:
        return _fail(ConfigError(Issue(f"cannot write the sweep: {exc.strerror}", file=args.output)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="airflow-oellm",
        description="Plan, check and render LLM-training sweeps for SLURM clusters (the Airflow provider's CLI).",
    )
    parser.add_argument(
        "--config-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="extra config root searched before the project's and the built-in groups "
        "(repeatable; also $OELLM_CONFIG_PATH)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "validate",
        help="check sweep and config files; exit 1 with readable errors",
        description="Check sweep files (compose, expand, resolve and render every experiment) "
        "and config group files. Prints 'ok: FILE' per valid file; errors go to "
        "stderr as file:line: key: message, and the exit status is 1.",
    )
    p.add_argument("files", nargs="+", metavar="FILE_OR_OVERRIDE", help="YAML files, then key=value overrides")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "plan",
        help="list the experiments of a sweep with resources and GPU-hours",
        description="Expand a sweep and print its experiments: name, the swept parameters, "
        "nodes x GPUs x time limit and GPU-hours, with totals.",
    )
    p.add_argument("sweep", help="sweep YAML file")
    p.add_argument("overrides", nargs="*", help="key=value, +key=value, ~key, group=option")
    p.add_argument(
        "--json", action="store_true", help="print a JSON list (name, dag_id, output_dir, parameters, gpu_hours, ...)"
    )
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "render",
        help="print the sbatch script of one experiment",
        description="Render the sbatch script of one experiment of a sweep.",
    )
    p.add_argument("sweep", help="sweep YAML file")
    p.add_argument("overrides", nargs="*", help="key=value, +key=value, ~key, group=option")
    p.add_argument("--experiment", "-e", metavar="NAME", help="experiment name (see `plan`)")
    p.add_argument("--output", "-o", metavar="FILE", help="write the script here instead of stdout")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser(
        "detect-platform",
        help="print the HPC platform this machine belongs to",
        description="Detect the platform from $OELLM_PLATFORM, environment variables, "
        "host name patterns and filesystem markers. Prints 'unknown' if nothing matches.",
    )
    p.add_argument("--explain", action="store_true", help="also say which rule matched")
    p.add_argument("--json", action="store_true", help='print {"platform": ..., "reason": ...}')
    p.set_defaults(func=cmd_detect_platform)

    p = sub.add_parser(
        "schema",
        help="print the configuration reference (Markdown), generated from the schema",
        description="Print every configuration key with its type, default and meaning.",
    )
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser(
        "events",
        help="match log events in a log file, as the job watcher does",
        description="Run the same event matching as the training watcher over a log file: built-in Megatron events "
        "(iteration, validation, checkpoint_saved, faults, ...), the anomalies found in the iteration lines "
        "(loss_spike, loss_nan, grad_norm_spike, each with the checkpoint to rewind to) and the monitoring.log_events "
        "of --config. "
        "One line (or JSON object) per event; with --outcome, then the verdict the classifier would give (with "
        "--json, the last line is one object: verdict, reason, exclude_nodes, progress_free, resume_from).",
    )
    p.add_argument("logfile", help="a job log")
    p.add_argument(
        "--config",
        metavar="CONFIG",
        help="a sweep or config file: its monitoring.log_events, anomalies, rules and nan_intervals",
    )
    p.add_argument(
        "--outcome",
        metavar="STATE[:EXIT_CODE]",
        type=_outcome_arg,
        help="also say what the watcher would conclude if the job ended now in this SLURM state (FAILED:16, "
        "TIMEOUT, COMPLETED): verdict, reason, nodes to exclude, the checkpoint it resumes from",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per event: name, groups, line_no, ...")
    p.add_argument("--no-builtins", action="store_true", help="only the configured events")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser(
        "analyze",
        help="analyse a sweep's results: best settings per size, scaling-law fit, loss-vs-compute frontier",
        description="Read every experiment report (*/report/report.json) under a sweep's output directory, "
        "including one copied from a cluster, and analyse each sweep found: the best learning rate and batch size "
        "per model size, L(N, D) = E + A/N^alpha + B/D^beta with bootstrap intervals, the loss-vs-compute frontier, "
        "the best learning rate against N and compute-optimal predictions; each part is computed or says why not. "
        "Writes analysis.json, analysis.md and plots (PNG, SVG) to SWEEP_OUTPUT_DIR/_analysis/<sweep>/.",
    )
    p.add_argument("sweep_output_dir", metavar="SWEEP_OUTPUT_DIR", help="the sweep's project.base_output_dir")
    p.add_argument("--output", "-o", metavar="DIR", help="write DIR/<sweep>/ instead")
    p.add_argument("--bootstrap", type=int, default=200, metavar="N", help="bootstrap fits for the intervals")
    p.add_argument("--json", action="store_true", help="print {sweep: analysis} as JSON instead of Markdown")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "convert",
        help="convert a Megatron checkpoint to a HuggingFace model directory",
        description="Convert a Megatron-LM checkpoint (torch_dist or legacy torch, any TP x PP) of a Llama- or "
        "Qwen3-style model into HuggingFace safetensors + config.json, streaming one tensor at a time. Settings "
        "that HF cannot express are refused by name. The output appears atomically and replaces an earlier one.",
    )
    p.add_argument("--megatron-checkpoint", required=True, metavar="DIR", help="save directory or one iter_ dir")
    p.add_argument("--iteration", type=int, help="checkpoint iteration (default: latest_checkpointed_iteration.txt)")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="the HF model directory to write")
    p.add_argument(
        "--model-type", choices=["auto", "llama", "qwen3"], default="auto", help="auto: qwen3 when it has q/k norms"
    )
    p.add_argument(
        "--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto", help="auto: training precision"
    )
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (5GB, 512MiB, bytes)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "evaluate",
        help="evaluate a HuggingFace model directory offline and write a results JSON",
        description="Evaluate a converted checkpoint without network access: the built-in `perplexity` task "
        "(perplexity and bits per byte on a text file) and lm-evaluation-harness tasks (optional extra) such as "
        "local YAML tasks under --include-path. Writes iteration, tasks, metrics and timings as JSON.",
    )
    p.add_argument("--hf-dir", required=True, metavar="DIR", help="the converted model")
    p.add_argument("--output-file", required=True, metavar="FILE", help="results JSON to write (atomically)")
    p.add_argument("--iteration", type=int, help="the checkpoint's iteration, recorded in the results")
    p.add_argument("--tasks", default="perplexity", help="comma-separated: perplexity and/or lm-eval task names")
    p.add_argument("--text-file", metavar="FILE", help="text for perplexity (default: a short built-in sample)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory when the HF dir has none")
    p.add_argument("--include-path", metavar="DIR", help="directory of local lm-eval task YAML files")
    p.add_argument("--window", type=int, default=1024, help="perplexity context window in tokens")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:0, ...")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "migrate",
        help="write one sweep file from the seed tool's (oellm-autoexp) config files",
        description="Translate the seed tool's config files (sweep, project, slurm, monitoring with log_events, "
        "state_events and their actions, platform_auto defaults) into one sweep file: axes wired to config keys, "
        "conversion, evaluation suites, cooldowns, restarts, monitoring and platform settings. What has no "
        "counterpart is listed on stderr and atop the file as `note: file:line: key: reason`.",
    )
    p.add_argument("seed_files", nargs="+", metavar="SEED_FILE", help="the seed tool's YAML files, combined into one")
    p.add_argument("--output", "-o", metavar="OUT.yaml", help="write the sweep here instead of stdout")
    p.add_argument("--name", help="project name (default: the seed project's, else the seed file's name)")
    p.add_argument(
        "--output-dir",
        metavar="DIR",
        help="project.base_output_dir (default: the seed project's, else ${OELLM_OUTPUT_DIR:-/tmp/oellm-runs}/NAME)",
    )
    p.set_defaults(func=cmd_migrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `airflow-oellm plan ... | head` ends quietly
    parser = build_parser()
    # overrides may follow options (`plan x.yaml --json lr=1`): argparse leaves them over
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if not _OVERRIDE.match(a)]
    if stray or (extra and not hasattr(args, "overrides") and not hasattr(args, "files")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        if hasattr(args, "overrides"):
            args.overrides = [*args.overrides, *extra]
        else:
            args.files = [*args.files, *extra]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigDeprecationWarning)
        code = int(args.func(args))
    for warning in caught:
        if warning.category is not ConfigDeprecationWarning:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    for notice in dict.fromkeys(str(w.message) for w in caught if w.category is ConfigDeprecationWarning):
        print(f"warning: {notice}", file=sys.stderr)  # file:line: key: what to write instead
    return code


if __name__ == "__main__":
    sys.exit(main())
