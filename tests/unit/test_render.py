"""Shell quoting and sbatch rendering: scripts parse, directives follow the rules, values stay inert."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_oellm.cli import main as cli
from airflow_oellm.config import load_sweep
from airflow_oellm.config.platforms import PLATFORMS
from airflow_oellm.jobscript.render import JobSpec, RenderError, render_sbatch
from airflow_oellm.slurm import shell
from tests.conftest import CONFIG, EXAMPLE_SWEEPS

pytestmark = pytest.mark.render

HOSTILE = [
    'x"; touch PWNED; "',
    "$(touch PWNED)",
    "`touch PWNED`",
    "a'b\"c\\d",
    "line1\nline2; touch PWNED",
    "${HOME:-$(touch PWNED)}",
    "; touch PWNED #",
    "*",
    "--lr 1 && touch PWNED",
]


def bash_echo_args(words: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> list[str]:
    script = f'printf "%s\\0" {words}'
    out = subprocess.run(["bash", "-c", script], capture_output=True, env=env, cwd=cwd, check=True).stdout
    return out.decode().split("\0")[:-1]


@pytest.mark.parametrize("value", HOSTILE)
def test_quote_and_expandable_keep_hostile_text_inert(value, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": "/home/someone"}
    assert bash_echo_args(shell.quote(value), env, tmp_path) == [value]
    assert bash_echo_args(shell.expandable(value), env, tmp_path) == [value]
    assert not (tmp_path / "PWNED").exists()


def test_expandable_expands_only_variables(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "USER": "me", "SLURM_JOB_ID": "42"}
    word = shell.expandable("/tmp/$USER-cache-${SLURM_JOB_ID}-${UNSET:-dflt}-$(id)-`id`")
    assert bash_echo_args(word, env, tmp_path) == ["/tmp/me-cache-42-dflt-$(id)-`id`"]


def test_directive_lines_rules():
    lines = shell.directive_lines({"partition": "debug", "exclusive": True, "qos": None, "requeue": False, "nodes": 2})
    assert lines == ["#SBATCH --partition=debug", "#SBATCH --exclusive", "#SBATCH --nodes=2"]
    for bad in ("a b", "x\n#SBATCH --x", "$X", "'q'", "a\\b"):
        with pytest.raises(shell.ShellSafetyError):
            shell.directive_lines({"comment": bad})
    assert shell.parse_extra_directive("#SBATCH --gpus-per-node=8") == ("gpus-per-node", "8")
    assert shell.parse_extra_directive("#SBATCH -p big") == ("partition", "big")
    assert shell.parse_extra_directive("#SBATCH --exclusive") == ("exclusive", True)


def test_cli_flags():
    words = shell.cli_flags({"train_iters": 10, "bf16": True, "fp16": False, "load": None, "data_path": ["a b", "c"]})
    assert words == ["--train-iters", '"10"', "--bf16", "--data-path", '"a b"', '"c"']
    with pytest.raises(shell.ShellSafetyError):
        shell.cli_flags({"nested": {"a": 1}})
    with pytest.raises(shell.ShellSafetyError):
        shell.cli_flags({"bad name; rm": 1})


@pytest.mark.parametrize("sweep_file", EXAMPLE_SWEEPS, ids=lambda p: p.stem)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_every_example_renders_and_passes_bash_n(sweep_file, platform, tmp_path, site_accounts):
    sweep = load_sweep(sweep_file, [f"platform={platform}"])
    for e in sweep.experiments:
        script = render_sbatch(e.materialize(), template_dirs=sweep.template_dirs)
        path = tmp_path / f"{e.name}.sbatch"
        path.write_text(script)
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        head = script.split("# Generated", 1)[0]
        assert f"#SBATCH --job-name={e.name}\n" in head
        assert f"#SBATCH --comment=oellm:{e.dag_id}\n" in head
        assert f"#SBATCH --output={e.paths.log_path}\n" in head and f"#SBATCH --error={e.paths.log_path}\n" in head
        assert "#SBATCH --open-mode=append" in head
        assert all(line.startswith("#SBATCH --") for line in head.splitlines()[1:])
        if e.config.slurm.signal:
            assert f"#SBATCH --signal={e.config.slurm.signal}" in head
        assert f"export CHECKPOINT_DIR={e.paths.checkpoint_dir}" in script


def test_platform_templates_differ_where_platforms_do(site_accounts):
    lumi = load_sweep(EXAMPLE_SWEEPS[0], ["platform=lumi"])
    e = lumi.experiments[0]
    script = render_sbatch(e.config, template_dirs=lumi.template_dirs)
    assert "#SBATCH --partition=standard-g" in script and "#SBATCH --hint=nomultithread" in script
    assert 'mkdir -p "${MIOPEN_USER_DB_PATH' in script
    assert '"singularity" exec' in script and '--bind "/pfs,/scratch' in script and "--cpu-bind=" in script
    assert 'RANK="$SLURM_PROCID"' in script
    juwels = load_sweep(EXAMPLE_SWEEPS[0], ["platform=juwels"])
    script = render_sbatch(juwels.experiments[0].config, template_dirs=juwels.template_dirs)
    assert 'MASTER_ADDR="${MASTER_ADDR}i"' in script and "torchrun" in script and "--nproc-per-node=4" in script


def test_job_spec_sets_identity_and_excludes():
    sweep = load_sweep(EXAMPLE_SWEEPS[0], ["slurm.exclude=[n1]"])
    script = render_sbatch(sweep.experiments[0].config, JobSpec(comment="oellm:abc123", exclude=["n2", "n1"]))
    assert "#SBATCH --comment=oellm:abc123" in script
    assert "#SBATCH --exclude=n1,n2" in script


def test_project_templates_override_package_templates(write, project):
    write(
        "config/templates/mini.sbatch.j2",
        '{% extends "base.sbatch.j2" %}\n{% block platform %}\necho "site hook {{ exp.name }}"\n{% endblock %}\n',
    )
    path = write(
        "config/sweeps/t.yaml",
        "defaults: [{platform: mini}]\nproject: {name: t, base_output_dir: /r}\nplatform: {template: mini.sbatch.j2}\n",
    )
    sweep = load_sweep(path)
    script = render_sbatch(sweep.experiments[0].config, template_dirs=sweep.template_dirs)
    assert 'echo "site hook t"' in script


def test_missing_template_is_a_clear_error(write, project):
    path = write(
        "config/sweeps/t.yaml",
        "defaults: [{platform: mini}]\nproject: {name: t, base_output_dir: /r}\nplatform: {template: nope.j2}\n",
    )
    with pytest.raises(RenderError, match=r"platform\.template: template 'nope\.j2' not found"):
        render_sbatch(load_sweep(path).experiments[0].config)


STUB = """import json, os, sys
json.dump({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in ("HOSTILE", "OMP_NUM_THREADS")}},
          open(os.environ["STUB_OUT"], "w"))
"""


def test_rendered_script_runs_and_hostile_values_arrive_verbatim(write, project, tmp_path):
    """Run the rendered script itself with bash (no SLURM): argv and env arrive exactly, nothing executes."""
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    out_root = tmp_path / "runs"
    hostile = {f"hostile_{i}": v for i, v in enumerate(HOSTILE)}
    hostile_yaml = json.dumps(hostile).replace("${", "\\\\${")  # a shell ${...} is escaped in YAML
    path = write(
        "config/sweeps/h.yaml",
        f"""
        defaults: [{{platform: mini}}]
        project: {{name: h, base_output_dir: {out_root}}}
        platform:
          env:
            HOSTILE: {json.dumps(HOSTILE[0])}
        backend:
          python: {sys.executable}
          entrypoint: {stub}
          args: {hostile_yaml}
        """,
    )
    sweep = load_sweep(path, ["~backend.args.save", "~backend.args.load"])
    exp = sweep.experiments[0]
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(exp.config, template_dirs=sweep.template_dirs))
    result_file = tmp_path / "result.json"
    env = {"PATH": "/usr/bin:/bin", "STUB_OUT": str(result_file), "HOME": str(tmp_path)}
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    got = json.loads(result_file.read_text())
    argv = got["argv"]
    for key, value in hostile.items():
        flag = "--" + key.replace("_", "-")
        assert argv[argv.index(flag) + 1] == value
    assert got["env"]["HOSTILE"] == HOSTILE[0]
    assert not list(tmp_path.rglob("PWNED"))
    assert (out_root / "h" / "checkpoints").is_dir()


def test_render_cli(capsys, tmp_path):
    sweep = CONFIG / "sweeps" / "minimal.yaml"
    assert cli(["render", str(sweep), "--experiment", "minimal_lr0.0003"]) == 0
    assert capsys.readouterr().out.startswith("#!/bin/bash\n#SBATCH --job-name=minimal_lr0.0003\n")
    out = tmp_path / "job.sbatch"
    assert cli(["render", str(sweep), "-e", "minimal_lr0.001", "slurm.time=60", "-o", str(out)]) == 0
    assert "#SBATCH --time=00:01:00" in out.read_text()
    assert cli(["render", str(sweep)]) == 1
    assert "pick one with --experiment" in capsys.readouterr().err


def test_render_cli_unknown_experiment_suggests(capsys):
    sweep = next(p for p in EXAMPLE_SWEEPS if p.stem == "scaling_study")
    assert cli(["render", str(sweep), "-e", "50M_lr0.1_gbsz12"]) == 1
    assert "did you mean '50M_lr0.1_gbsz" in capsys.readouterr().err
