"""The tiny trainer (examples/tiny_megatron/pretrain_gpt.py) behaves like Megatron-LM where the
product looks: log lines the watcher parses, loss that falls, exact resume, --ckpt-step cooldowns
with --override-opt_param-scheduler, SIGTERM handling, fault knobs, convertible checkpoints, and a
genuine loss spike from bad data that `--iterations-to-skip` avoids."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from airflow_oellm.megatron.convert import convert_checkpoint
from airflow_oellm.monitor.anomalies import AnomalyDetector
from airflow_oellm.monitor.events import builtin_specs, match_log
from tests.conftest import REPO

TRAINER = REPO / "examples" / "tiny_megatron" / "pretrain_gpt.py"
SMALL = ["--seq-length", "64", "--micro-batch-size", "4", "--global-batch-size", "8", "--group-query-attention",
         "--untie-embeddings-and-output-weights", "--log-interval", "1"]  # fmt: skip

pytestmark = pytest.mark.demo


def train(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TRAINER), *SMALL, *flags],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )  # fmt: skip


def events(log: str) -> list:
    return match_log(log.encode(), builtin_specs())


def losses(log: str) -> dict[int, float]:
    return {e.groups["iteration"]: e.groups["loss"] for e in events(log) if e.name == "iteration"}


def test_trains_logs_like_megatron_and_resumes_exactly(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    whole = train("--train-iters", "60", "--save", str(tmp_path / "whole"), "--save-interval", "30")
    assert whole.returncode == 0, whole.stderr
    curve = losses(whole.stdout)
    assert sorted(curve) == list(range(1, 61)) and curve[60] < curve[1] - 1.5  # ln(384) = 5.95 -> visibly lower
    names = [e.name for e in events(whole.stdout)]
    assert {"fresh_start", "checkpoint_saved", "training_done"} <= set(names)

    # a job that ends at iteration 30 (as at a time limit), then its resubmission
    first = train("--train-iters", "60", "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "30",
                  "--exit-interval", "30")  # fmt: skip
    assert "[exiting program at iteration 30]" in first.stdout
    second = train("--train-iters", "60", "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "30")
    assert first.returncode == second.returncode == 0, second.stderr
    assert f"successfully loaded checkpoint from {ckpt} [ t 1/1, p 1/1 ] at iteration 30" in second.stdout
    resumed = losses(second.stdout)
    assert sorted(resumed) == list(range(31, 61))
    # model, optimizer moments, scheduler and data order are restored: the same curve as without a stop
    assert all(resumed[i] == pytest.approx(curve[i], rel=1e-5) for i in resumed)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "60"


def test_cooldown_from_a_checkpoint_lowers_the_loss(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    # the parent stays at its peak learning rate (WSD without decay); the cooldown decays over its last 60
    wsd = ["--lr", "1e-2", "--min-lr", "1e-5", "--lr-decay-style", "WSD", "--eval-iters", "16", "--log-interval", "10"]
    base = train("--train-iters", "200", "--save", str(parent), "--save-interval", "140", *wsd,
                 "--lr-wsd-decay-iters", "1")  # fmt: skip
    assert base.returncode == 0, base.stderr
    cooled = train("--train-iters", "200", "--load", str(parent), "--ckpt-step", "140", "--save",
                   str(tmp_path / "cool"), "--override-opt_param-scheduler", "--save-interval", "60", *wsd,
                   "--lr-wsd-decay-iters", "60")  # fmt: skip
    assert cooled.returncode == 0, cooled.stderr
    assert f"successfully loaded checkpoint from {parent} [ t 1/1, p 1/1 ] at iteration 140" in cooled.stdout
    final = {e.groups.get("split"): e.groups["loss"] for e in events(cooled.stdout) if e.name == "validation"}
    parent_final = {e.groups.get("split"): e.groups["loss"] for e in events(base.stdout) if e.name == "validation"}
    # the same tokens seen (iteration 200 both), but the cooldown decayed its learning rate
    assert final["validation"] < parent_final["validation"] - 0.05, (final, parent_final)
    assert sorted(losses(cooled.stdout)) == list(range(150, 201, 10))


def test_sigterm_saves_and_exits(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    argv = [sys.executable, str(TRAINER), *SMALL, "--train-iters", "10000", "--save", str(ckpt), "--load", str(ckpt),
            "--save-interval", "10000", "--exit-signal-handler", "--iter-seconds", "0.05"]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    assert process.stdout is not None
    for line in process.stdout:
        if "iteration        5/" in line or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGTERM)
    out = process.stdout.read()
    assert process.wait(timeout=60) == 0
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert saved >= 5 and f"successfully saved checkpoint from iteration {saved:7d}" in out
    assert "[exiting program after receiving SIGTERM.]" in out


@pytest.mark.parametrize(
    ("knob", "line"),
    [("CRASH", "RuntimeError: simulated crash"), ("OOM", "CUDA out of memory"), ("NCCL", "Watchdog caught collective"),
     ("NODE_FAIL", "Communication connection failure")],
)  # fmt: skip
def test_fault_knobs_fire_once_per_save_directory(knob: str, line: str, tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    flags = ("--train-iters", "8", "--save", ckpt, "--load", ckpt, "--save-interval", "4")
    failed = train(*flags, env={f"FAKE_{knob}_AT": "6"})
    assert failed.returncode == 1 and line in failed.stdout
    assert max(losses(failed.stdout)) == 5
    healthy = train(*flags, env={f"FAKE_{knob}_AT": "6"})  # the rerun resumes from 4 and is healthy
    assert healthy.returncode == 0 and "at iteration 4" in healthy.stdout and max(losses(healthy.stdout)) == 8


@pytest.mark.convert
def test_trained_checkpoint_converts_to_a_model_with_the_trainers_logits(tmp_path: Path) -> None:
    sys.path.insert(0, str(TRAINER.parent))
    import megatron_checkpoint
    from gpt_model import GPTConfig, TinyGPT

    ckpt = tmp_path / "ckpt"
    done = train("--train-iters", "20", "--save", str(ckpt), "--save-interval", "20", "--qk-layernorm")
    assert done.returncode == 0, done.stderr
    model = TinyGPT(GPTConfig(qk_layernorm=True))
    megatron_checkpoint.load(ckpt, 20, model, None)
    result = convert_checkpoint(ckpt, tmp_path / "hf", dtype="float32")
    assert result.architecture == "Qwen3ForCausalLM" and result.iteration == 20
    assert "tokenizer.json" in result.tokenizer_files  # saved with the checkpoint, copied by the converter
    text = "At Oulu the sky is clear, the low is"
    tokens = AutoTokenizer.from_pretrained(tmp_path / "hf")(text, return_tensors="pt")["input_ids"]
    assert tokens.tolist() == [list(text.encode())]  # the trainer's own tokenization
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max().item() <= 1e-5


def test_hang_knob_stops_output_and_progress(tmp_path: Path) -> None:
    argv = [sys.executable, str(TRAINER), *SMALL, "--train-iters", "50", "--save", str(tmp_path / "ckpt")]
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "FAKE_HANG_AT": "3"}
    )
    try:
        assert process.stdout is not None
        seen = []
        for line in process.stdout:
            seen.append(line)
            if "iteration        2/" in line:
                break
        time.sleep(3)  # a hang is silence that lasts: three times the iteration time here
        assert process.poll() is None  # alive, silent, going nowhere: only an inactivity watchdog ends it
        readable, _, _ = select.select([process.stdout.fileno()], [], [], 0.1)
        assert not readable  # nothing printed since iteration 2
    finally:
        process.kill()
        process.wait()


@pytest.mark.anomalies
def test_poisoned_samples_make_a_real_spike_that_skipping_their_iterations_avoids(tmp_path: Path) -> None:
    """Samples 400-439 (iterations 51-55 at 8 per batch) are bad: the weights diverge, the loss spikes and stays
    up; the watcher's detector finds it and names checkpoint 40. A rewind there that skips 51-55 trains on as
    if the bad data had never been there: the same curve up to 50, no spike, a final loss near a clean run's."""
    common = ("--train-iters", "100", "--save-interval", "40")
    clean = train(*common, "--save", str(tmp_path / "clean"))
    spiked_dir = str(tmp_path / "spiked")
    spiked = train(*common, "--save", spiked_dir, "--load", spiked_dir, "--poisoned-samples", "400:440")
    assert clean.returncode == spiked.returncode == 0, spiked.stderr
    found = {e.name: e.groups for e in AnomalyDetector().process(events(spiked.stdout)) if e.name.startswith("loss")}
    assert found["loss_spike"]["iteration"] == 51 and found["loss_spike"]["rewind_to"] == 40
    assert found["loss_spike_unrecovered"]["detected_at"] == 71  # still high 20 log intervals on

    # the rewind: back to checkpoint 40 (the later ones moved aside), the bad iterations skipped
    rewound_dir = tmp_path / "rewound"
    rewound_dir.mkdir()
    shutil.copytree(tmp_path / "spiked" / "iter_0000040", rewound_dir / "iter_0000040")
    (rewound_dir / "latest_checkpointed_iteration.txt").write_text("40")
    skip = ["--iterations-to-skip", *map(str, range(51, 56))]
    rewound = train(*common, "--save", str(rewound_dir), "--load", str(rewound_dir), "--poisoned-samples", "400:440",
                    *skip)  # fmt: skip
    assert rewound.returncode == 0, rewound.stderr
    after = losses(rewound.stdout)
    assert sorted(after) == [*range(41, 51), *range(56, 101)]  # skipped iterations are not logged, as in Megatron
    assert {i: after[i] for i in range(41, 51)} == {i: losses(spiked.stdout)[i] for i in range(41, 51)}
    assert not [e for e in AnomalyDetector().process(events(rewound.stdout)) if e.name.startswith("loss_spike")]
    assert "skipped samples:           40 |" in rewound.stdout
    final = {"clean": losses(clean.stdout)[100], "spiked": losses(spiked.stdout)[100], "rewound": after[100]}
    assert final["rewound"] < final["spiked"] and abs(final["rewound"] - final["clean"]) < 0.25 * final["clean"], final
