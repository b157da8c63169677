"""A tiny Megatron-LM stand-in that really trains: a small Llama-style GPT (gpt_model.py) on
byte-level text, on CPU, with Megatron-LM's flags, log lines and torch_dist checkpoints.

    python pretrain_gpt.py --train-iters 300 --save CKPT --load CKPT --save-interval 100 \\
        --eval-interval 100 --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine

What the product watches behaves like Megatron-LM: the arguments block, `[after ...]` phase markers,
the iteration line (`iteration N/ M | consumed samples: ... | lm loss: ... |`), validation lines,
`saving checkpoint ...` / `successfully saved checkpoint ...` / loading lines, the tracker file
written after a complete checkpoint, resume from the latest checkpoint (or `--ckpt-step`),
`--override-opt-param-scheduler` (a cooldown: decay from a parent's checkpoint with new scheduler
settings; without it, or `--use-checkpoint-opt_param-scheduler`, scheduler settings that differ from the
checkpoint's stop the run with Megatron's AssertionError), `--exit-signal-handler` (SIGTERM / SIGUSR1:
save, then exit), `--exit-duration-in-mins`, `--exit-interval`. Unknown Megatron flags are accepted and ignored.

Fault knobs (flag or environment, an iteration; a fault fires once per save directory unless
FAKE_FAULT_ALWAYS=1): --fake-crash-at / FAKE_CRASH_AT, --fake-oom-at / FAKE_OOM_AT (a CUDA OOM
line), --fake-hang-at / FAKE_HANG_AT (stops logging and progress), --fake-nccl-at / FAKE_NCCL_AT,
--fake-node-fail-at / FAKE_NODE_FAIL_AT.

A genuine instability: --poisoned-samples A:B (or POISONED_SAMPLES) makes the samples A to B-1 of the
data order bad. A batch holding any of them is trained on garbage (random bytes, the same for the same
iteration) at POISON_LR_FACTOR times the learning rate, as a corrupted shard meeting a too-high rate does: the
weights really diverge, and the loss on good data spikes and stays up for many iterations. Skipping
those iterations (`--iterations-to-skip`, 1-indexed as in Megatron core 0.17+: the batch is consumed,
nothing is trained or logged) avoids it.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import megatron_checkpoint as checkpoint
from gpt_model import GPTConfig, TinyGPT

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"
TOKENIZER = CORPUS.with_name("tokenizer")  # token id = byte value, as the trainer reads text
END_OF_TEXT = 256
FAULTS = ("crash", "oom", "hang", "nccl", "node_fail")
POISON_LR_FACTOR = 10.0


def stamp() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")


def say(line: str) -> None:
    print(line, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--num-layers", type=int, default=2)
    add("--hidden-size", type=int, default=64)
    add("--ffn-hidden-size", type=int, default=176)
    add("--num-attention-heads", type=int, default=4)
    add("--group-query-attention", action="store_true")
    add("--num-query-groups", type=int, default=2)
    add("--kv-channels", type=int)
    add("--qk-layernorm", action="store_true")
    add("--untie-embeddings-and-output-weights", action="store_true")
    add("--rotary-base", type=int, default=10000)
    add("--norm-epsilon", type=float, default=1e-5)
    add("--seq-length", type=int, default=128)
    add("--max-position-embeddings", type=int)
    add("--micro-batch-size", type=int, default=8)
    add("--global-batch-size", type=int, default=16)
    add("--train-iters", type=int, required=True)
    add("--lr", type=float, default=3e-3)
    add("--min-lr", type=float, default=3e-4)
    add("--lr-decay-style", default="cosine", choices=["constant", "linear", "cosine", "WSD"])
    add("--lr-warmup-iters", type=int, default=0)
    add("--lr-decay-iters", type=int)
    add("--lr-wsd-decay-iters", type=int)
    add("--lr-wsd-decay-style", default="linear", choices=["linear", "cosine", "exponential", "minus_sqrt"])
    # Megatron's spellings: core up to 0.14 knows only the first, 0.15+ both
    add("--override-opt_param-scheduler", "--override-opt-param-scheduler", action="store_true")
    add("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler", action="store_true")
    add("--weight-decay", type=float, default=0.01)
    add("--clip-grad", type=float, default=1.0)
    add("--adam-beta1", type=float, default=0.9)
    add("--adam-beta2", type=float, default=0.95)
    add("--seed", type=int, default=1234)
    add("--data-path", default=str(CORPUS), help="a text file; its last tenth is held out")
    add("--save")
    add("--load")
    add("--ckpt-step", type=int)
    add("--save-interval", type=int, default=100)
    add("--eval-interval", type=int, default=0)
    add("--eval-iters", type=int, default=4)
    add("--log-interval", type=int, default=1)
    add("--exit-signal-handler", action="store_true")
    add("--exit-duration-in-mins", type=float)
    add("--exit-interval", type=int)
    add("--iter-seconds", type=float, default=0.0, help="sleep per iteration (slow demos)")
    add("--iterations-to-skip", type=int, nargs="+", default=[], help="1-indexed iterations not trained")
    add("--poisoned-samples", default=os.environ.get("POISONED_SAMPLES"), help="A:B, bad samples A to B-1")
    for fault in FAULTS:
        add(f"--fake-{fault.replace('_', '-')}-at", type=int)
    args, _unknown = p.parse_known_args(argv)  # Megatron's other flags are accepted and ignored
    args.kv_channels = args.kv_channels or args.hidden_size // args.num_attention_heads
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    args.lr_decay_iters = args.lr_decay_iters or args.train_iters
    if args.poisoned_samples:
        first, _, end = args.poisoned_samples.partition(":")
        args.poisoned_samples = (int(first), int(end))
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
    return args


def checkpoint_args(args: argparse.Namespace) -> argparse.Namespace:
    """What Megatron-LM records in a checkpoint's `args` (and converters read)."""
    return argparse.Namespace(
        **{k: v for k, v in vars(args).items() if not k.startswith("fake_")},
        padded_vocab_size=384,
        swiglu=True,
        normalization="RMSNorm",
        position_embedding_type="rope",
        rotary_percent=1.0,
        add_bias_linear=False,
        bf16=False,
        fp16=False,
        tokenizer_type="ByteLevel",
        ckpt_format="torch_dist",
    )


def print_arguments(args: argparse.Namespace) -> None:
    say("------------------------ arguments ------------------------")
    for key in sorted(vars(args), key=str.lower):
        say(f"  {key} {'.' * (48 - len(key))} {getattr(args, key)}")
    say("-------------------- end of arguments ---------------------")


class Scheduler:
    """Megatron's OptimizerParamScheduler for the learning rate: warmup, then constant / linear /
    cosine decay to min_lr, or WSD (stable, then the last `wsd_decay_iters` decay)."""

    FIELDS = ("max_lr", "min_lr", "warmup_iters", "decay_iters", "decay_style", "wsd_decay_iters", "wsd_decay_style")

    def __init__(self, args: argparse.Namespace) -> None:
        self.max_lr, self.min_lr = args.lr, args.min_lr
        self.warmup_iters, self.decay_iters = args.lr_warmup_iters, args.lr_decay_iters
        self.decay_style = args.lr_decay_style
        self.wsd_decay_iters = args.lr_wsd_decay_iters or 0
        self.wsd_decay_style = args.lr_wsd_decay_style

    def state(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    def restore(self, saved: dict, use_checkpoint: bool) -> None:
        """Megatron's load_state_dict: a value the checkpoint holds must equal the argument's, unless
        --use-checkpoint-opt_param-scheduler takes the checkpoint's (--override-opt-param-scheduler skips this)."""
        for name in self.FIELDS:
            if name in saved and saved[name] != getattr(self, name):
                if not use_checkpoint:
                    raise AssertionError(
                        f"OptimizerParamScheduler: class input value {getattr(self, name)} and checkpoint"
                        f"value {saved[name]} for {name} do not match"
                    )
                say(f" > using checkpoint value {saved[name]} for {name}")
                setattr(self, name, saved[name])

    def lr(self, step: int) -> float:
        if self.warmup_iters and step <= self.warmup_iters:
            return self.max_lr * step / self.warmup_iters
        if self.decay_style == "constant" or step > self.decay_iters:
            return self.max_lr if self.decay_style == "constant" else self.min_lr
        span = self.max_lr - self.min_lr
        if self.decay_style == "WSD":
            start = self.decay_iters - self.wsd_decay_iters
            if step <= start:
                return self.max_lr
            t = (step - start) / max(self.wsd_decay_iters, 1)
            factor = {
                "linear": 1 - t,
                "cosine": 0.5 * (1 + math.cos(math.pi * t)),
                "exponential": 2 ** (-10 * t),
                "minus_sqrt": 1 - math.sqrt(t),
            }[self.wsd_decay_style]
            return self.min_lr + span * factor
        t = (step - self.warmup_iters) / max(self.decay_iters - self.warmup_iters, 1)
        factor = 1 - t if self.decay_style == "linear" else 0.5 * (1 + math.cos(math.pi * t))
        return self.min_lr + span * factor


class Data:
    def __init__(self, path: str, seq_length: int, seed: int) -> None:
        tokens = torch.tensor(list(Path(path).read_bytes()), dtype=torch.long)
        split = int(len(tokens) * 0.9)
        self.train, self.valid = tokens[:split], tokens[split:]
        self.seq_length, self.seed = seq_length, seed

    def batch(self, split: str, size: int, key: int) -> torch.Tensor:
        """`size` windows of seq_length + 1 tokens; the same key gives the same batch (resumable)."""
        source = self.train if split == "train" else self.valid
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        starts = torch.randint(0, len(source) - self.seq_length - 1, (size,), generator=generator)
        return torch.stack([source[s : s + self.seq_length + 1] for s in starts.tolist()])


def lm_loss(model: TinyGPT, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def evaluate(model: TinyGPT, data: Data, args: argparse.Namespace, key: int) -> float:
    model.eval()
    with torch.no_grad():
        losses = [lm_loss(model, data.batch("valid", args.micro_batch_size, key * 100 + i)).item()
                  for i in range(args.eval_iters)]  # fmt: skip
    model.train()
    return sum(losses) / len(losses)


def validation_lines(text: str, loss: float) -> None:
    line = f" {text} | lm loss value: {loss:.6E} | lm loss PPL: {math.exp(min(loss, 20)):.6E} | "
    say("-" * (len(line) + 1))
    say(line)
    say("-" * (len(line) + 1))


def faults(args: argparse.Namespace) -> dict[str, int]:
    found = {}
    for fault in FAULTS:
        value = getattr(args, f"fake_{fault}_at") or os.environ.get(f"FAKE_{fault.upper()}_AT")
        if value:
            found[fault] = int(value)
    marker = Path(args.save) / ".fake_fault_fired" if args.save else None
    if found and marker and marker.exists() and os.environ.get("FAKE_FAULT_ALWAYS") != "1":
        return {}  # the fault was transient: the resumed run is healthy
    return found


def inject(fault: str, args: argparse.Namespace) -> int:
    if args.save:
        (Path(args.save) / ".fake_fault_fired").touch()
    if fault == "hang":
        while True:  # no output, no progress
            time.sleep(3600)
    messages = {
        "oom": "[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
        "capacity of 79.19 GiB of which 1.05 GiB is free.",
        "crash": 'Traceback (most recent call last):\n  File "pretrain_gpt.py", line 1, in <module>\n'
        "RuntimeError: simulated crash",
        "nccl": "[rank3]:[E1107 12:34:56.789 ProcessGroupNCCL.cpp:616] [Rank 3] Watchdog caught collective operation "
        "timeout: WorkNCCL(SeqNum=1234, OpType=ALLREDUCE) ran for 600005 milliseconds",
        "node_fail": f"srun: error: Task launch for StepId={os.environ.get('SLURM_JOB_ID', '0')}.0 failed on node "
        f"{os.environ.get('SLURMD_NODENAME', 'node0')}: Communication connection failure",
    }
    say(messages[fault])
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    print_arguments(args)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    config = GPTConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups, kv_channels=args.kv_channels, ffn_hidden_size=args.ffn_hidden_size,
        rotary_base=args.rotary_base, norm_epsilon=args.norm_epsilon, qk_layernorm=args.qk_layernorm,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
    )  # fmt: skip
    model = TinyGPT(config)
    say(f"[after megatron is initialized] datetime: {stamp()} ")
    total = sum(p.numel() for p in model.parameters())
    say(f"Number of parameters in transformer block in billions: {(total - 384 * args.hidden_size) / 1e9:.6f}")
    say(f"Total number of parameters in billions: {total / 1e9:.6f}")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay
    )
    scheduler = Scheduler(args)
    say(f"[after model, optimizer, and learning rate scheduler are built] datetime: {stamp()} ")

    start, consumed = 0, 0
    source = args.load
    tracker = Path(source or args.save or ".") / checkpoint.TRACKER
    latest = checkpoint.latest(source) if source else None
    if latest is not None:
        start = args.ckpt_step if args.ckpt_step is not None else latest
        say(f" loading distributed checkpoint from {source} at iteration {start}")
        common = checkpoint.load(source, start, model, optimizer)
        if not args.override_opt_param_scheduler:
            scheduler.restore(common.get("opt_param_scheduler", {}), args.use_checkpoint_opt_param_scheduler)
        consumed = common.get("consumed_samples", start * args.global_batch_size)
        say(f"  successfully loaded checkpoint from {source} [ t 1/1, p 1/1 ] at iteration {start}")
    else:
        say(f"WARNING: could not find the metadata file {tracker}")
        say("    will not load any checkpoints and will start from random")
    data = Data(args.data_path, args.seq_length, args.seed)
    say(f"[after dataloaders are built] datetime: {stamp()} ")
    knobs = faults(args)
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)

    stop = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signal.Signals(signum).name

    if args.exit_signal_handler:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGUSR1, on_signal)

    def save(iteration: int) -> None:
        if not args.save:
            return
        say(f"saving checkpoint at iteration {iteration:7d} to {args.save} in torch_dist format")
        extra = {"opt_param_scheduler": scheduler.state(), "consumed_samples": consumed,
                 "rng_state": [{"torch_rng_state": torch.get_rng_state()}]}  # fmt: skip
        checkpoint.save(args.save, iteration, model, optimizer, checkpoint_args(args), extra, TOKENIZER)
        say(f"  successfully saved checkpoint from iteration {iteration:7d} to {args.save} [ t 1/1, p 1/1 ]")

    say(f"[before the start of training step] datetime: {stamp()} ")
    accumulation = max(1, args.global_batch_size // args.micro_batch_size)
    iteration, last_saved, skipped = start, start, 0
    model.train()
    while iteration < args.train_iters:
        if stop["signal"]:
            if iteration > last_saved:
                save(iteration)
            say(f"[exiting program after receiving {stop['signal']}.] datetime: {stamp()} ")
            return 0
        iteration += 1
        if iteration in args.iterations_to_skip:  # Megatron's skip: the data is consumed, not trained on
            consumed += args.global_batch_size
            skipped += args.global_batch_size
            continue
        for fault, at in knobs.items():
            if at == iteration:
                return inject(fault, args)
        begun = time.monotonic()
        poisoned = (
            bool(args.poisoned_samples)
            and consumed < args.poisoned_samples[1]
            and (consumed + args.global_batch_size > args.poisoned_samples[0])
        )
        lr = scheduler.lr(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr * (POISON_LR_FACTOR if poisoned else 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(accumulation):
            batch = data.batch("train", args.micro_batch_size, iteration * accumulation + micro)
            if poisoned:
                garbage = torch.Generator().manual_seed(iteration * accumulation + micro)
                batch = torch.randint(0, 256, batch.shape, generator=garbage)
            loss = lm_loss(model, batch)
            (loss / accumulation).backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad).item()
        optimizer.step()
        consumed += args.global_batch_size
        time.sleep(args.iter_seconds)
        if iteration % args.log_interval == 0:
            elapsed = (time.monotonic() - begun) * 1000
            tokens = args.global_batch_size * args.seq_length / max(elapsed / 1000, 1e-9)
            say(
                f" [{stamp()[:19]}] iteration {iteration:8d}/{args.train_iters:8d} | "
                f"consumed samples: {consumed:12d} | "
                + (f"skipped samples: {skipped:12d} | " if skipped else "")
                + f"elapsed time per iteration (ms): {elapsed:.1f} | "
                f"Tokens per second per GPU (Tok/s/GPU): {tokens:.1f} | "
                f"learning rate: {lr:.6E} | global batch size: {args.global_batch_size:5d} | "
                f"lm loss: {loss_sum / accumulation:.6E} | loss scale: 1.0 | grad norm: {grad_norm:.3f} | "
                "number of skipped iterations:   0 | number of nan iterations:   0 |"
            )
        if args.eval_interval and iteration % args.eval_interval == 0:
            validation_lines(f"validation loss at iteration {iteration}", evaluate(model, data, args, iteration))
        if args.save_interval and iteration % args.save_interval == 0:
            save(iteration)
            last_saved = iteration
        if args.exit_interval and iteration % args.exit_interval == 0:
            if iteration > last_saved:
                save(iteration)
            say(f"[exiting program at iteration {iteration}] datetime: {stamp()} ")
            return 0
        minutes = (time.monotonic() - started) / 60
        if args.exit_duration_in_mins and minutes > args.exit_duration_in_mins:
            if iteration > last_saved:
                save(iteration)
            say(f"[exiting program after {minutes:.2f} minutes] datetime: {stamp()} ")
            return 0
    if iteration > last_saved:
        save(iteration)
    say(f"[after training is done] datetime: {stamp()} ")
    loss = evaluate(model, data, args, iteration)
    validation_lines(f"validation loss at iteration {iteration} on validation set", loss)
    validation_lines(f"validation loss at iteration {iteration} on test set", loss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
