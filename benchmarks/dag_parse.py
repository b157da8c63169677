"""Benchmark: DagBag time of a DAG file registering 100 and 1,000 experiment DAGs, side by side with
astronomer's dag-factory and a plain Python loop building DAGs of the same shape.

    .venv/bin/python benchmarks/dag_parse.py [--counts 100 1000] [--repeat 3] [--json OUT]

Ours: the project's thin DAG file over one sweep YAML of N experiments (each DAG: prepare, train,
mapped checkpoint group wait/convert/evaluate, cooldown plan + mapped cooldown group of four tasks,
report, outcome = 12 tasks; configs composed, resolved and validated from YAML).
dag-factory: one YAML with N DAG entries of 12 tasks in two task groups with the same edges, loaded
with `load_yaml_dags` (it reads the YAML and instantiates each operator by class path).
Plain loop: Python building the same N 12-task DAGs directly (Airflow's own floor).

Each measurement is `DagBag(dag_folder=...)` in a fresh interpreter (imports of Airflow itself are
outside the timing; the DAG file's own imports are inside). "Marginal" is the cost of one more DAG:
(T(max N) - T(min N)) / (max N - min N), which cancels the fixed costs. A worker that runs one task
parses with Airflow's parsing context set to its DAG: that is measured at the largest N too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from airflow_oellm.config import naming

REPO = Path(__file__).resolve().parents[1]

MEASURE = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
start, cpu_start = time.perf_counter(), time.process_time()
bag = DagBag(dag_folder=sys.argv[1])
seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
tasks = sum(len(d.tasks) for d in bag.dags.values())
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "dags": len(bag.dag_ids), "tasks": tasks,
                  "errors": {k: v[-2000:] for k, v in bag.import_errors.items()}}))
"""

OURS_SWEEP = """\
defaults: [{{platform: devcluster}}, {{model: 50M}}, _self_]
project: {{name: bench, base_output_dir: /scratch/bench}}
backend: {{args: {{train_iters: 20000, save_interval: 1000}}}}
evaluation:
  suites: [{{name: quick}}, {{name: full, when: interval, every_iterations: 5000}}, {{name: final, when: final}}]
cooldowns: [{{at: 10000, overrides: [backend.args.lr=1.0e-5]}}]
sweep:
  name_template: "lr{{lr}}_s{{seed}}"
  axes:
    backend.args.lr: [{lrs}]
    backend.args.seed: [{seeds}]
"""

OURS_DAG_FILE = """\
from airflow_oellm.dag_factory import load_dags  # airflow DAG file

globals().update(load_dags([{sweeps!r}]))
"""

DAG_FACTORY_FILE = """\
from dagfactory import load_yaml_dags  # airflow DAG file

load_yaml_dags(globals_dict=globals(), config_filepath={path!r})
"""

EMPTY = "airflow.providers.standard.operators.empty.EmptyOperator"
BASH = "airflow.providers.standard.operators.bash.BashOperator"
PYTHON_SENSOR = "airflow.providers.standard.sensors.bash.BashSensor"

# task id, operator, group, upstream: the experiment DAG's shape
SHAPE = [
    ("prepare", BASH, None, []),
    ("train", BASH, None, ["prepare"]),
    ("wait", PYTHON_SENSOR, "checkpoint", ["prepare"]),
    ("convert", BASH, "checkpoint", ["wait"]),
    ("evaluate", BASH, "checkpoint", ["convert"]),
    ("cooldown_plan", EMPTY, None, ["prepare"]),
    ("cd_wait", PYTHON_SENSOR, "cooldown", ["cooldown_plan"]),
    ("cd_train", BASH, "cooldown", ["cd_wait"]),
    ("cd_convert", BASH, "cooldown", ["cd_train"]),
    ("cd_evaluate", BASH, "cooldown", ["cd_convert"]),
    ("report", EMPTY, None, ["train", "evaluate", "cd_evaluate"]),
    ("outcome", EMPTY, None, ["prepare", "train", "evaluate", "cd_evaluate", "report"]),
]

PLAIN_LOOP_FILE = """\
from datetime import datetime

from airflow.providers.standard.operators.bash import BashOperator
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.sensors.bash import BashSensor
from airflow.sdk import DAG, TaskGroup

KINDS = {{"BashOperator": BashOperator, "EmptyOperator": EmptyOperator, "BashSensor": BashSensor}}
SHAPE = {shape!r}

for i in range({count}):
    with DAG(f"plain_{{i:05d}}", schedule=None, start_date=datetime(2026, 1, 1), max_active_runs=1,
             tags=["bench"], default_args={{"owner": "bench", "retries": 1}}) as dag:
        groups = {{g: TaskGroup(g) for g in ("checkpoint", "cooldown")}}
        tasks = {{}}
        for task_id, kind, group, upstream in SHAPE:
            args = {{"bash_command": f"echo {{task_id}}"}} if kind == "BashOperator" else {{}}
            if kind == "BashSensor":
                args = {{"bash_command": "true", "poke_interval": 60}}
            task = KINDS[kind](task_id=task_id, task_group=groups.get(group), **args)
            for name in upstream:
                tasks[name] >> task
            tasks[task_id] = task
    globals()[dag.dag_id] = dag
"""


def dag_factory_yaml(count: int) -> str:
    lines = [
        "default:",
        "  default_args: {owner: bench, retries: 1, start_date: 2026-01-01}",
        "  schedule: null",
        "  max_active_runs: 1",
        "  tags: [bench]",
    ]
    for i in range(count):
        lines += [f"factory_{i:05d}:", "  task_groups:", "    checkpoint: {}", "    cooldown: {}", "  tasks:"]
        for task_id, kind, group, upstream in SHAPE:
            task = [f"    - task_id: {task_id}", f"      operator: {kind}"]
            if kind == BASH:
                task.append(f"      bash_command: echo {task_id}")
            if kind == PYTHON_SENSOR:
                task += ["      bash_command: 'true'", "      poke_interval: 60"]
            if group:
                task.append(f"      task_group_name: {group}")
            if upstream:
                task.append(f"      dependencies: [{', '.join(upstream)}]")
            lines += task
    return "\n".join(lines) + "\n"


def write_variants(root: Path, count: int) -> dict[str, Path]:
    folders = {}
    # ours: N = len(lrs) * len(seeds) experiments
    seeds = 10 if count >= 10 else 1
    lrs = ", ".join(f"{1e-4 * (1 + i):.4g}" for i in range(count // seeds))
    sweeps = root / f"ours_{count}" / "sweeps"
    sweeps.mkdir(parents=True)
    (sweeps / "bench.yaml").write_text(OURS_SWEEP.format(lrs=lrs, seeds=", ".join(map(str, range(seeds)))))
    dags = root / f"ours_{count}" / "dags"
    dags.mkdir()
    (dags / "oellm_bench.py").write_text(OURS_DAG_FILE.format(sweeps=str(sweeps)))
    folders["ours"] = dags

    dags = root / f"dag_factory_{count}" / "dags"
    dags.mkdir(parents=True)
    config = dags.parent / "bench.yaml"  # outside the DAG folder: the DagBag does not read YAML
    config.write_text(dag_factory_yaml(count))
    (dags / "factory_bench.py").write_text(DAG_FACTORY_FILE.format(path=str(config)))
    folders["dag_factory"] = dags

    dags = root / f"plain_{count}" / "dags"
    dags.mkdir(parents=True)
    shape = [(t, k.rsplit(".", 1)[1], g, u) for t, k, g, u in SHAPE]
    (dags / "plain_bench.py").write_text(PLAIN_LOOP_FILE.format(shape=shape, count=count))
    folders["plain_loop"] = dags
    return folders


# dag-factory lives outside the venv (scripts/install.sh): its Airflow plugin stays out of other processes
BENCH_DEPS = Path(sys.prefix) / "bench-deps"


def measure(folder: Path, env: dict[str, str] | None = None) -> dict:
    environment = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    if folder.parent.name.startswith("dag_factory"):
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DEPS), environment.get("PYTHONPATH")]))
    environment.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder)],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(f"{folder}: import errors: {result['errors']}")
    return result


def first_dag_id(folder: Path) -> str:
    text = (folder.parent / "sweeps" / "bench.yaml").read_text()
    lr = text.split("backend.args.lr: [", 1)[1].split(",", 1)[0]
    return naming.dag_id("bench", f"lr{lr}_s0")


def run(counts: list[int], repeat: int = 3) -> dict:
    with tempfile.TemporaryDirectory(prefix="oellm-dag-parse-") as tmp:
        home = Path(tmp) / "airflow-home"
        home.mkdir()
        os.environ.setdefault("AIRFLOW_HOME", str(home))
        results: dict = {"counts": counts, "repeat": repeat, "variants": {}}
        for count in counts:
            folders = write_variants(Path(tmp), count)
            for name, folder in folders.items():
                runs = [measure(folder) for _ in range(repeat)]
                assert runs[0]["dags"] >= count, (name, runs[0])
                entry = results["variants"].setdefault(name, {})
                entry[str(count)] = {
                    "seconds": statistics.median(r["seconds"] for r in runs),
                    "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
                    "dags": runs[0]["dags"],
                    "tasks": runs[0]["tasks"],
                }
            if count == max(counts):
                dag_id = first_dag_id(folders["ours"])
                runs = [measure(folders["ours"], {"_AIRFLOW_PARSING_CONTEXT_DAG_ID": dag_id}) for _ in range(repeat)]
                assert runs[0]["dags"] == 1, runs[0]
                results["worker_one_dag_seconds"] = statistics.median(r["seconds"] for r in runs)
                results["worker_one_dag_cpu_seconds"] = statistics.median(r["cpu_seconds"] for r in runs)
        low, high = str(min(counts)), str(max(counts))
        for entry in results["variants"].values():
            if low != high:
                span = entry[high]["dags"] - entry[low]["dags"]
                entry["marginal_ms_per_dag"] = 1000 * (entry[high]["seconds"] - entry[low]["seconds"]) / span
                cpu = entry[high]["cpu_seconds"] - entry[low]["cpu_seconds"]
                entry["marginal_cpu_ms_per_dag"] = 1000 * cpu / span
            entry["ms_per_dag"] = {n: 1000 * e["seconds"] / e["dags"] for n, e in entry.items() if n.isdigit()}
        ours = results["variants"]["ours"]
        if "marginal_ms_per_dag" in ours:
            results["ratios_marginal"] = {
                f"{name}/ours": entry["marginal_ms_per_dag"] / ours["marginal_ms_per_dag"]
                for name, entry in results["variants"].items()
                if name != "ours"
            }
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = run(args.counts, args.repeat)
    for name, entry in results["variants"].items():
        cells = ", ".join(f"{n} DAGs {entry[n]['seconds']:.2f} s" for n in map(str, args.counts))
        marginal = entry.get("marginal_ms_per_dag")
        print(f"{name:12s} {cells}" + (f"; marginal {marginal:.2f} ms/DAG" if marginal is not None else ""))
    if "worker_one_dag_seconds" in results:
        print(f"worker parse of one DAG out of {max(args.counts)}: {results['worker_one_dag_seconds']:.3f} s")
    for ratio, value in results.get("ratios_marginal", {}).items():
        print(f"{ratio}: {value:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
