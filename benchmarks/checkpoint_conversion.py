"""Benchmark: converting a bf16 torch_dist checkpoint written by real megatron-core (default: a 700M-
parameter Llama, 1.4 GB) to HuggingFace safetensors, side by side with

  naive: load the whole state dict with torch.distributed.checkpoint, build the HF dict, then
         `safetensors.torch.save_file` (what hand-rolled converters do), and
  cp:    `cp -r` of the same checkpoint directory (the I/O floor),

each in a fresh process under /usr/bin/time (wall seconds, peak RSS), page cache warm, one after the
other, with `sync` before each run so none competes with the previous one's write-back. Process
wall includes Python + torch start-up (~2 s here, the same for any checkpoint size); "convert s" is
the conversion itself, as each Python variant reports it, and is what the throughput figures use.

    .venv/bin/python benchmarks/checkpoint_conversion.py [--case bench_700m_bf16] [--repeat 2] [--json OUT]

The naive output is also compared tensor by tensor with ours: two independent read paths agree.

Measured on this project's 2-core machine (medians of 3, 2026-11-29), 700M parameters, 1.40 GB:
cp 0.45-0.65 s; ours 0.83 s converting (3.3 s process wall, 233 MB peak RSS — torch's own
footprint); naive 4.3-5.6 s converting (7.5-9.9 s wall, 1804 MB). Ours/naive peak RSS 0.13,
ours/cp 1.3x converting, and 1.0x per extra GB (wall, start-up cancelled).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.convert.gold import WRITER, megatron_python  # noqa: E402

NAIVE = """
import sys, torch
from pathlib import Path
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from airflow_oellm.megatron import readers as mg
from airflow_oellm.megatron.architecture import model_spec
from airflow_oellm.megatron.attention import split_qkv
from airflow_oellm.megatron.layout import locate
from airflow_oellm.megatron.unpickle import load_distcp_metadata

source, out = Path(sys.argv[1]), Path(sys.argv[2])
import time
started = time.monotonic()
layout = locate(source)
reader = mg.open_checkpoint(layout)  # only for the arguments
spec = model_spec(reader.args, reader.shape(mg.EMBEDDING)[0])
reader.close()
meta = load_distcp_metadata(layout.directory / ".metadata").state_dict_metadata
state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.items()
         if hasattr(v, "chunks") and not k.startswith("optimizer")}
dcp.load(state, storage_reader=dcp.FileSystemReader(str(layout.directory)), no_dist=True)
L = "decoder.layers."
hf, F = {}, spec.ffn_hidden_size
hf["model.embed_tokens.weight"] = state[mg.EMBEDDING]
for i in range(spec.num_layers):
    p = f"model.layers.{i}."
    q, k, v = split_qkv(state[L + mg.QKV][i], spec.num_heads, spec.num_groups, spec.head_dim)
    fc1 = state[L + mg.FC1][i]
    hf |= {p + "input_layernorm.weight": state[L + mg.INPUT_NORM][i], p + "self_attn.q_proj.weight": q,
           p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
           p + "self_attn.o_proj.weight": state[L + mg.ATTENTION_OUT][i],
           p + "post_attention_layernorm.weight": state[L + mg.MLP_NORM][i],
           p + "mlp.gate_proj.weight": fc1[:F], p + "mlp.up_proj.weight": fc1[F:],
           p + "mlp.down_proj.weight": state[L + mg.FC2][i]}
hf["model.norm.weight"] = state[mg.FINAL_NORM]
hf["lm_head.weight"] = state[mg.OUTPUT_LAYER]
hf = {k: t.to(torch.bfloat16).contiguous() for k, t in hf.items()}
out.mkdir(parents=True)
save_file(hf, out / "model.safetensors", metadata={"format": "pt"})
print('{"seconds": %f}' % (time.monotonic() - started))
"""

SAME = """
import sys, torch
from pathlib import Path
from safetensors import safe_open
def load(d):
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update((n, h.get_tensor(n)) for n in h.keys())
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
assert set(a) == set(b), set(a) ^ set(b)
bad = [n for n in a if not torch.equal(a[n], b[n])]
assert not bad, bad[:5]
print(len(a))
"""


def timed(argv: list[str]) -> dict[str, float]:
    """Wall seconds, peak RSS (MB) and, for a Python variant, its own conversion seconds."""
    done = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", *argv], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{argv[:4]} failed: {done.stderr[-3000:]}")
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("TIME ")][-1]
    seconds, kilobytes = line.split()[1:]
    reported = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")]
    convert = reported[-1]["seconds"] if reported else float(seconds)
    return {"wall_seconds": float(seconds), "convert_seconds": convert, "peak_rss_mb": int(kilobytes) / 1024}


def generate(case: str, workdir: Path) -> Path:
    target = workdir / case
    if not (target / "torch_dist" / "latest_checkpointed_iteration.txt").exists():
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        python = megatron_python("0.19.2")
        subprocess.run(
            [str(python), str(WRITER), "build", case, str(target), "--torch-dist-only"],
            check=True,
            capture_output=True,
        )
    return target / "torch_dist"


def measure(case: str, repeat: int = 2, workdir: Path | None = None) -> dict:
    """Every variant on one generated checkpoint."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="oellm-convert-bench-"))
    source = generate(case, workdir)
    iteration_dir = next(source.glob("iter_*"))
    size = sum(p.stat().st_size for p in iteration_dir.iterdir())
    python = sys.executable
    variants = {
        "cp": lambda out: ["cp", "-r", str(iteration_dir), str(out)],
        "ours": lambda out: [str(Path(python).with_name("airflow-oellm")), "convert", "--megatron-checkpoint",
                             str(source), "--output-dir", str(out), "--dtype", "bfloat16", "--json"],
        "naive": lambda out: [python, "-c", NAIVE, str(source), str(out)],
    }  # fmt: skip
    subprocess.run(["cat", *map(str, iteration_dir.iterdir())], stdout=subprocess.DEVNULL, check=True)  # warm cache
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    compared = None
    for _ in range(repeat):
        for name, argv in variants.items():
            subprocess.run(["sync"], check=True)  # no run competes with the previous one's write-back
            samples[name].append(timed(argv(workdir / f"out-{name}")))
            if name == "cp" or compared is not None:
                shutil.rmtree(workdir / f"out-{name}")
        if compared is None:  # two independent read paths must give the same bytes
            compared = subprocess.run(
                [python, "-c", SAME, str(workdir / "out-ours"), str(workdir / "out-naive")],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            shutil.rmtree(workdir / "out-ours")
            shutil.rmtree(workdir / "out-naive")
    result: dict = {"case": case, "checkpoint_bytes": size, "tensors_identical": int(compared or 0), "variants": {}}
    for name, runs in samples.items():
        convert = statistics.median(r["convert_seconds"] for r in runs)
        result["variants"][name] = {
            "wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
            "convert_seconds": convert,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "mb_per_s": size / 1e6 / max(convert, 0.01),  # /usr/bin/time reports 10 ms steps
            "runs": runs,
        }
    v = result["variants"]
    result["ours_vs_naive_rss"] = v["ours"]["peak_rss_mb"] / v["naive"]["peak_rss_mb"]
    result["ours_vs_naive_time"] = v["ours"]["convert_seconds"] / v["naive"]["convert_seconds"]
    result["ours_vs_cp_time"] = v["ours"]["convert_seconds"] / max(v["cp"]["convert_seconds"], 0.01)
    result["ours_vs_cp_wall"] = v["ours"]["wall_seconds"] / max(v["cp"]["wall_seconds"], 0.01)
    return result


def run(cases: list[str], repeat: int = 2, workdir: Path | None = None) -> dict:
    """Each case measured, and the marginal cost of one more GB between the smallest and the largest:
    start-up (interpreter, torch, torch.distributed.checkpoint imports) cancels out of it."""
    measured = [measure(case, repeat, workdir) for case in cases]
    small, large = measured[0], measured[-1]
    extra_gb = (large["checkpoint_bytes"] - small["checkpoint_bytes"]) / 1e9
    marginal = {}
    for name in large["variants"]:
        a, b = small["variants"][name], large["variants"][name]
        marginal[name] = {
            key: max(b[key] - a[key], 0.01) / extra_gb for key in ("wall_seconds", "convert_seconds")
        }  # seconds per extra GB
    ratios = {
        "marginal_ours_vs_cp_wall": marginal["ours"]["wall_seconds"] / marginal["cp"]["wall_seconds"],
        "marginal_ours_vs_naive_wall": marginal["ours"]["wall_seconds"] / marginal["naive"]["wall_seconds"],
    }
    return {"cases": measured, "marginal_seconds_per_gb": marginal, **ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["bench_small_bf16", "bench_700m_bf16"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="keep the generated checkpoint here between runs")
    parser.add_argument("--json", type=Path, help="also write the result here")
    options = parser.parse_args()
    result = run(options.cases, options.repeat, options.workdir)
    for case in result["cases"]:
        print(f"{case['case']}: checkpoint {case['checkpoint_bytes'] / 1e9:.2f} GB, "
              f"{case['tensors_identical']} tensors identical in ours and naive")  # fmt: skip
        print(f"  {'variant':<8} {'wall s':>8} {'convert s':>10} {'peak RSS MB':>12} {'MB/s':>8}")
        for name, v in case["variants"].items():
            print(
                f"  {name:<8} {v['wall_seconds']:>8.2f} {v['convert_seconds']:>10.2f} {v['peak_rss_mb']:>12.0f} "
                f"{v['mb_per_s']:>8.0f}"
            )
        print(
            f"  ours/naive: peak RSS {case['ours_vs_naive_rss']:.2f}, convert time {case['ours_vs_naive_time']:.2f}; "
            f"ours/cp: convert time {case['ours_vs_cp_time']:.2f}, process wall {case['ours_vs_cp_wall']:.2f}"
        )
    marginal = result["marginal_seconds_per_gb"]
    print("marginal seconds per GB (wall): " + ", ".join(f"{k} {v['wall_seconds']:.2f}" for k, v in marginal.items()))
    print(
        f"marginal ours/cp {result['marginal_ours_vs_cp_wall']:.2f}, "
        f"ours/naive {result['marginal_ours_vs_naive_wall']:.2f}"
    )
    if options.json:
        options.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
