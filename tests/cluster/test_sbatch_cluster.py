"""Rendered scripts go through the real sbatch over real SSH and run to COMPLETED on the dev cluster.

The launched program is a stub that prints the argv and environment it received (Megatron is not
installed on the dev cluster): everything else in the script (directives, env, quoting, paths) is
what users get.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from airflow_oellm.config import load_sweep
from airflow_oellm.jobscript.render import MEGATRON_SPELLINGS, render_sbatch
from airflow_oellm.slurm import shell
from tests.conftest import EXAMPLE_SWEEPS
from tests.unit.test_render import HOSTILE

STUB = """import json, os, sys
keys = ("EXPERIMENT_NAME", "OUTPUT_DIR", "CHECKPOINT_DIR", "OMP_NUM_THREADS", "HOSTILE_ENV", "USER_CACHE")
print("OELLM_STUB " + json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                                  "env": {k: os.environ.get(k) for k in keys}}), flush=True)
"""


def stub_overrides(remote_dir: str, sweep_name: str) -> list[str]:
    return [
        f"project.base_output_dir={remote_dir}/{sweep_name}",
        "backend.python=python3",
        f"backend.entrypoint={remote_dir}/stub.py",
        "backend.megatron_path=null",
        "slurm.time=300",
    ]


def submit_all(dev_cluster, sweep):
    """Upload each experiment's script next to its output and submit it; {job id: experiment}."""
    jobs = {}
    for e in sweep.experiments:
        script = render_sbatch(e.materialize(), template_dirs=sweep.template_dirs)
        path = f"{e.paths.script_dir}/{e.name}.sbatch"
        dev_cluster.ssh(["mkdir", "-p", e.paths.log_dir, e.paths.script_dir])
        dev_cluster.upload(path, script, mode="0700")
        jobs[dev_cluster.sbatch(path)] = e
    return jobs


def stub_report(dev_cluster, log_path: str) -> dict:
    log = dev_cluster.ssh(["cat", log_path]).stdout
    lines = [line for line in log.splitlines() if line.startswith("OELLM_STUB ")]
    assert len(lines) == 1, log
    assert "Job metadata:" in log
    return json.loads(lines[0].removeprefix("OELLM_STUB "))


@pytest.mark.parametrize("sweep_file", EXAMPLE_SWEEPS, ids=lambda p: p.stem)
def test_every_example_sweep_runs_to_completed(sweep_file: Path, dev_cluster, remote_dir):
    dev_cluster.upload(f"{remote_dir}/stub.py", STUB, mode="0600")
    sweep = load_sweep(sweep_file, stub_overrides(remote_dir, sweep_file.stem))
    jobs = submit_all(dev_cluster, sweep)
    states = dev_cluster.wait_terminal(list(jobs))
    assert {state for state, _ in states.values()} == {"COMPLETED"}, states
    assert {code for _, code in states.values()} == {"0:0"}
    for job_id, e in jobs.items():
        report = stub_report(dev_cluster, e.paths.log_path.replace("%j", job_id))
        cfg = e.config
        expected = shell.cli_flags(cfg.backend.args, quote_word=shell.scalar_text, spellings=MEGATRON_SPELLINGS)
        assert report["argv"] == expected
        assert report["cwd"] == e.paths.output_dir
        assert report["env"]["EXPERIMENT_NAME"] == e.name
        assert report["env"]["CHECKPOINT_DIR"] == e.paths.checkpoint_dir
        assert report["env"]["OMP_NUM_THREADS"] == "1"
        show = dev_cluster.ssh(["scontrol", "show", "job", "-o", job_id]).stdout
        assert f"JobName={e.name} " in show
        assert f"Comment=oellm:{e.dag_id} " in show
        assert f"StdOut={e.paths.log_path.replace('%j', job_id)} " in show


def test_hostile_config_values_stay_inert_on_the_cluster(dev_cluster, remote_dir, write, tmp_path):
    dev_cluster.upload(f"{remote_dir}/stub.py", STUB, mode="0600")
    axis = json.dumps(HOSTILE).replace("${", "\\\\${")  # a shell ${...} is escaped in YAML
    path = write(
        "sweeps/hostile.yaml",
        f"""
        defaults: [{{platform: devcluster}}]
        project: {{name: hostile, base_output_dir: /unused}}
        platform:
          env:
            HOSTILE_ENV: '"; touch PWNED; "$(touch PWNED)`touch PWNED`'
            USER_CACHE: /tmp/$USER-cache
        backend:
          args:
            payload: ${{vars.payload}}
            list_payload: ['a b', '; touch PWNED', "$(touch PWNED)"]
        sweep:
          axes:
            payload: {axis}
          name_template: "h{{index}}"
        """,
    )
    sweep = load_sweep(path, stub_overrides(remote_dir, "hostile"))
    assert len(sweep.experiments) == len(HOSTILE)
    jobs = submit_all(dev_cluster, sweep)
    states = dev_cluster.wait_terminal(list(jobs))
    assert {s for s, _ in states.values()} == {"COMPLETED"}, states
    for job_id, e in jobs.items():
        report = stub_report(dev_cluster, e.paths.log_path.replace("%j", job_id))
        argv = report["argv"]
        assert argv[argv.index("--payload") + 1] == HOSTILE[e.index]
        i = argv.index("--list-payload")
        assert argv[i + 1 : i + 4] == ["a b", "; touch PWNED", "$(touch PWNED)"]
        assert report["env"]["HOSTILE_ENV"] == '"; touch PWNED; "$(touch PWNED)`touch PWNED`'
        assert report["env"]["USER_CACHE"] == "/tmp/slurmuser-cache"  # $USER expanded at job time
    home = dev_cluster.env["SLURM_DEV_USER_HOME"]
    found = dev_cluster.ssh(f"find {shlex.quote(home)} /tmp -name PWNED 2>/dev/null; true").stdout
    assert found.strip() == ""


def test_sbatch_rejects_what_the_cluster_cannot_run_with_a_clear_error(dev_cluster, remote_dir):
    """A partition the cluster lacks fails at submit with sbatch's own message (nothing queued)."""
    sweep = load_sweep(EXAMPLE_SWEEPS[0], [*stub_overrides(remote_dir, "x"), "slurm.partition=nosuch"])
    e = sweep.experiments[0]
    path = f"{remote_dir}/job.sbatch"
    dev_cluster.upload(path, render_sbatch(e.config, template_dirs=sweep.template_dirs))
    result = dev_cluster.ssh(["sbatch", "--parsable", path], check=False)
    assert result.returncode != 0
    assert re.search(r"invalid partition", result.stderr, re.I)


def test_platform_probe_runs_on_the_remote_login_node(dev_cluster):
    from airflow_oellm.config.platforms import PlatformProbe, detect_platform, probe_command

    facts = PlatformProbe.parse(dev_cluster.ssh(probe_command()).stdout)
    assert facts.hostname  # the login node's name, read over SSH
    assert "/etc/slurm/oellm-dev-cluster" in facts.existing_paths
    assert detect_platform(facts).name == "devcluster"
