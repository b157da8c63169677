"""A real loss spike of the tiny trainer, caught and rewound by the product's own code, against the same run
without the bad data: how late the spike is found, and the final loss of each.

    .venv/bin/python benchmarks/loss_spike.py [--iterations 300] [--poisoned 2400:2560] [--lowered 0.5:50]

Three runs of examples/tiny_megatron/pretrain_gpt.py (defaults: 16 samples per batch, a save every 100):
- clean: no bad data;
- spiked: samples A to B-1 are bad (`--poisoned-samples`), the run trains through its divergence;
- rewound: the spiked run's log through the watcher's detector (AnomalyDetector); at the unrecovered spike, its
  save directory set back with the rewind the operator runs (megatron/checkpoints.rewind_script), and the
  training resumed from there with `--iterations-to-skip` over the Divergence's window, as the next job is;
- rewound_lowered: the same, and the learning rate lowered (`rewind.learning_rate`, `--lowered MULTIPLIER:ITERATIONS`):
  a job with the lowered `--lr`/`--min-lr`, `--override-opt_param-scheduler` and `--exit-interval` at their
  end (monitor/attempts.lowered_until), then one at the configured rate with `--override-opt_param-scheduler`;
- lowered_only: the lowered rate without skipping the data (`skip_data: false`).

Writes benchmarks/results/loss_spike.json. The time from the spike to the rewound job running on the cluster is
measured by tests/operators/test_submit_operator.py::test_a_real_loss_spike_is_rewound_skipped_and_trained_through
(docs/reliability.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from airflow_oellm.megatron.checkpoints import parse_rewind, rewind_script  # noqa: E402
from airflow_oellm.monitor.anomalies import AnomalyDetector, Divergence  # noqa: E402
from airflow_oellm.monitor.attempts import lowered_until  # noqa: E402
from airflow_oellm.monitor.events import event_specs, match_log  # noqa: E402
from airflow_oellm.monitor.watch import UNRECOVERED  # noqa: E402

TRAINER = REPO / "examples" / "tiny_megatron" / "pretrain_gpt.py"
RESULTS = REPO / "benchmarks" / "results"
BATCH = 16  # the trainer's default global batch size
LR, MIN_LR = 3e-3, 3e-4  # the trainer's defaults


def train(save: Path, iterations: int, *flags: str) -> tuple[str, float]:
    argv = [sys.executable, str(TRAINER), "--train-iters", str(iterations), "--save", str(save), "--load", str(save),
            "--save-interval", "100", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "1", *flags]  # fmt: skip
    began = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return done.stdout, time.monotonic() - began


def losses(log: str) -> dict[int, float]:
    return {
        e.groups["iteration"]: e.groups["loss"] for e in match_log(log.encode(), event_specs()) if "loss" in e.groups
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--poisoned", default="2400:2560", help="bad samples A:B (A to B-1)")
    parser.add_argument("--lowered", default="0.5:50", help="rewind.learning_rate's multiplier:iterations")
    args = parser.parse_args()
    multiplier, iterations = float(args.lowered.split(":")[0]), int(args.lowered.split(":")[1])
    first_bad = int(args.poisoned.split(":")[0]) // BATCH + 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        clean, clean_s = train(work / "clean", args.iterations)
        spiked, spiked_s = train(work / "spiked", args.iterations, "--poisoned-samples", args.poisoned)
        anomalies = [e for e in AnomalyDetector().process(match_log(spiked.encode(), event_specs()))
                     if e.metadata.get("kind") == "anomaly"]  # fmt: skip
        spike = next(e.groups for e in anomalies if e.name == "loss_spike")
        acted = next(e for e in anomalies if e.name in UNRECOVERED)
        divergence = Divergence.of(UNRECOVERED[acted.name], acted.groups, acted.groups["detected_at"])
        # the rewind moves every save after the target aside: here the spiked run's, which trained to its end
        # (a job the watcher kills at detection leaves fewer)
        shutil.copytree(work / "spiked", work / "rewound")
        target = divergence.rewind_to or 0
        moved = subprocess.run(
            ["bash", "-c", rewind_script(str(work / "rewound"), target, str(work / "rewound" / "discarded" / "r1"))],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        skipped = divergence.skipped()
        skipping = ["--iterations-to-skip", *map(str, skipped)]
        rewound, rewound_s = train(work / "rewound", args.iterations, "--poisoned-samples", args.poisoned, *skipping)
        for name in ("rewound_lowered", "lowered_only"):
            shutil.copytree(work / "spiked", work / name)
            script = rewind_script(str(work / name), target, str(work / name / "discarded" / "r1"))
            subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
        until = {
            "rewound_lowered": lowered_until(target, iterations, skipped),
            "lowered_only": lowered_until(target, iterations, []),
        }
        lowered = {}
        for name, skips in (("rewound_lowered", skipping), ("lowered_only", [])):
            rates = ["--lr", str(LR * multiplier), "--min-lr", str(MIN_LR * multiplier)]
            stopping = ["--exit-interval", str(until[name])]
            first, first_s = train(work / name, args.iterations, "--poisoned-samples", args.poisoned,
                                   "--override-opt_param-scheduler", *rates, *stopping, *skips)  # fmt: skip
            then, then_s = train(work / name, args.iterations, "--poisoned-samples", args.poisoned,
                                 "--override-opt_param-scheduler", *skips)  # fmt: skip
            lowered[name] = (first + then, first_s + then_s)
    runs = {"clean": (clean, clean_s), "spiked": (spiked, spiked_s), "rewound": (rewound, rewound_s), **lowered}
    final = {name: losses(log)[args.iterations] for name, (log, _) in runs.items()}
    spikes = {
        name: [e.name for e in AnomalyDetector().process(match_log(log.encode(), event_specs()))
               if e.name.startswith("loss_spike")]
        for name, (log, _) in runs.items() if name not in ("clean", "spiked")
    }  # fmt: skip
    report = {
        "iterations": args.iterations,
        "poisoned_samples": args.poisoned,
        "first_bad_iteration": first_bad,
        "loss_spike": {"starts": spike["iteration"], "detected_at": spike["detected_at"]},
        "detection_delay_iterations": spike["detected_at"] - first_bad,
        "acted_on": {
            "event": acted.name,
            "at": divergence.detected_at,
            "delay_iterations": divergence.detected_at - first_bad,
        },
        "rewind_to": target,
        "moved_aside": parse_rewind(moved.stdout),
        "skipped": [skipped[0], skipped[-1]],
        "lowered_learning_rate": {"multiplier": multiplier, "iterations": iterations, "until": until},
        "final_loss": final,
        "over_clean": {name: loss / final["clean"] for name, loss in final.items() if name != "clean"},
        "spikes_after_the_rewind": spikes,
        "seconds": {name: round(seconds, 1) for name, (_, seconds) in runs.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "loss_spike.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
