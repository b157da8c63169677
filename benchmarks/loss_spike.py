"""A real loss spike of the tiny trainer, caught and rewound by the product's own code, against the same run
without the bad data: how late the spike is found, and the final loss of each.

    .venv/bin/python benchmarks/loss_spike.py [--iterations 300] [--poisoned 2400:2560]

Three runs of examples/tiny_megatron/pretrain_gpt.py (defaults: 16 samples per batch, a save every 100):
- clean: no bad data;
- spiked: samples A to B-1 are bad (`--poisoned-samples`), the run trains through its divergence;
- rewound: the spiked run's log through the watcher's detector (AnomalyDetector); at the unrecovered spike, its
  save directory set back with the rewind the operator runs (megatron/checkpoints.rewind_script), and the
  training resumed from there with `--iterations-to-skip` over the Divergence's window, as the next job is.

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
from airflow_oellm.monitor.events import event_specs, match_log  # noqa: E402
from airflow_oellm.monitor.watch import UNRECOVERED  # noqa: E402

TRAINER = REPO / "examples" / "tiny_megatron" / "pretrain_gpt.py"
RESULTS = REPO / "benchmarks" / "results"
BATCH = 16  # the trainer's default global batch size


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
    args = parser.parse_args()
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
        rewound, rewound_s = train(
            work / "rewound", args.iterations, "--poisoned-samples", args.poisoned,
            "--iterations-to-skip", *map(str, skipped),
        )  # fmt: skip
    final = {name: losses(log)[args.iterations] for name, log in (("clean", clean), ("spiked", spiked),
                                                                  ("rewound", rewound))}  # fmt: skip
    rewound_anomalies = [e.name for e in AnomalyDetector().process(match_log(rewound.encode(), event_specs()))
                         if e.name.startswith("loss_spike")]  # fmt: skip
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
        "final_loss": final,
        "rewound_over_clean": final["rewound"] / final["clean"],
        "spiked_over_clean": final["spiked"] / final["clean"],
        "spikes_in_the_rewound_run": rewound_anomalies,
        "seconds": {"clean": round(clean_s, 1), "spiked": round(spiked_s, 1), "rewound": round(rewound_s, 1)},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "loss_spike.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
