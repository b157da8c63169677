"""Benchmark: expand and validate a large sweep, side by side with the naive OmegaConf loop.

    .venv/bin/python benchmarks/sweep_expansion.py [--points 1000] [--repeat 3] [--json OUT]

Ours: `load_sweep()` (compose once per group choice, fast interpolation, typed validation of every
point). Baseline: what tools built on OmegaConf do per point (oellm-autoexp, a Hydra-style loop):
`OmegaConf.merge(base, point)` then `to_container(resolve=True)`, with no validation at all.
Both read the same generated sweep file, which is written as an explicit list of points (more
than OmegaConf's default 10,000 YAML nodes at 1,000 points).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omegaconf import OmegaConf  # noqa: E402

from airflow_oellm.config import load_sweep  # noqa: E402
from airflow_oellm.config.compose import Composer, config_roots  # noqa: E402
from airflow_oellm.config.resolvers import frozen_time  # noqa: E402
from airflow_oellm.config.yamlio import MAX_YAML_NODES  # noqa: E402


def write_sweep(directory: Path, points: int) -> Path:
    """A sweep of `points` experiments given as an explicit list (like a generated study)."""
    lines = [
        "defaults:",
        "  - platform: devcluster",
        "  - model: 50M",
        "  - _self_",
        "project:",
        "  name: bench",
        "  base_output_dir: /scratch/bench",
        "sweep:",
        "  name_template: 'p{index:05d}_lr{lr}_gbs{global_batch_size}_s{seed}'",
        "  groups:",
        "    - type: list",
        "      configs:",
    ]
    for i in range(points):
        lines.append(
            f"        - {{backend.args.lr: {1e-4 * (1 + i % 10):.6g}, "
            f"backend.args.global_batch_size: {64 * (1 + i % 4)}, "
            f"vars.seed: {i}, backend.args.train_iters: {1000 + i}}}"
        )
    path = directory / "sweeps" / f"bench_{points}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def ours(path: Path) -> int:
    return len(load_sweep(path).experiments)


def baseline(path: Path) -> int:
    """Compose once (same composer), then OmegaConf merge + resolve per point, as upstream did."""
    primary = OmegaConf.to_container(OmegaConf.load(path, max_yaml_expanded_nodes=MAX_YAML_NODES))
    composed = Composer(config_roots(path)).compose(str(path), primary).data
    sweep = composed.pop("sweep")
    base = OmegaConf.create(composed)
    count = 0
    with frozen_time():
        for i, point in enumerate(sweep["groups"][0]["configs"]):
            overrides = OmegaConf.from_dotlist([f"{k}={v}" for k, v in point.items()])
            name = f"p{i:05d}"
            overrides.experiment = {
                "name": name,
                "output_dir": "/scratch/bench/" + name,
                "checkpoint_dir": "/scratch/bench/" + name + "/checkpoints",
                "log_dir": "/scratch/bench/" + name + "/logs",
            }
            OmegaConf.to_container(OmegaConf.merge(base, overrides), resolve=True)
            count += 1
    return count


def timed(fn, path: Path, repeat: int) -> tuple[list[float], list[float], int]:
    """Wall and CPU seconds of each run, and what the last run counted."""
    times, cpu, count = [], [], 0
    for _ in range(repeat):
        from airflow_oellm.config import yamlio

        yamlio._load_cached.cache_clear()  # every run reads the file, as a fresh process would
        start, cpu_start = time.perf_counter(), time.process_time()
        count = fn(path)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return times, cpu, count


def cli_seconds(args: list[str], repeat: int = 3) -> tuple[float, float]:
    """The fastest of `repeat` whole-process runs, wall and CPU seconds: a one-off on a loaded machine
    measures the load, and only the CPU time is the work whatever the load."""
    times, cpu = [], []
    for _ in range(repeat):
        start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-m", "airflow_oellm.cli", *args], check=True, capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append(time.perf_counter() - start)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return min(times), min(cpu)


def run(points: int, repeat: int, with_baseline: bool = True) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_sweep(Path(tmp), points)
        our_times, our_cpu, our_count = timed(ours, path, repeat)
        plan, plan_cpu = cli_seconds(["plan", str(path), "--json"])
        plan_27, plan_27_cpu = cli_seconds(["plan", str(REPO / "config" / "sweeps" / "scaling_study.yaml")])
        result = {
            "points": points,
            "ours_seconds": our_times,
            "ours_median": statistics.median(our_times),
            "ours_cpu_median": statistics.median(our_cpu),
            "ours_per_point_ms": 1000 * statistics.median(our_times) / points,
            "ours_count": our_count,
            "cli_plan_seconds": plan,
            "cli_plan_cpu_seconds": plan_cpu,
            "cli_plan_27_seconds": plan_27,
            "cli_plan_27_cpu_seconds": plan_27_cpu,
        }
        if with_baseline:
            base_times, _, base_count = timed(baseline, path, repeat)
            result.update(
                baseline_seconds=base_times,
                baseline_median=statistics.median(base_times),
                baseline_count=base_count,
                speedup=statistics.median(base_times) / statistics.median(our_times),
            )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    result = run(args.points, args.repeat)
    print(f"sweep of {result['points']} points (expand + compose + resolve + validate), median of {args.repeat}:")
    print(f"  airflow-oellm load_sweep : {result['ours_median']:.3f} s ({result['ours_per_point_ms']:.2f} ms/point)")
    print(f"  OmegaConf merge+resolve  : {result['baseline_median']:.3f} s (no validation)")
    print(f"  ratio baseline / ours    : {result['speedup']:.1f}x")
    print(f"  `airflow-oellm plan --json` on it, whole process: {result['cli_plan_seconds']:.2f} s")
    print(f"  `airflow-oellm plan` of the 27-experiment study, whole process: {result['cli_plan_27_seconds']:.2f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
