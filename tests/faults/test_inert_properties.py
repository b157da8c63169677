"""Property tests: whatever text a config value or a path holds, the rendered job script and the remote
commands pass it on verbatim and execute nothing. The scripts run in a real bash, as on a cluster."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_oellm.config import load_sweep
from airflow_oellm.jobscript.render import render_sbatch
from airflow_oellm.slurm import commands

# pieces that would run a command, end a quote or start a directive if anything were left unquoted
SHELL_PIECES = [
    "$(touch PWNED)",
    "`touch PWNED`",
    "; touch PWNED",
    "' ; touch PWNED ; '",
    '" ; touch PWNED ; "',
    "\n#SBATCH --wrap=touch PWNED\n",
    "${HOME:-$(touch PWNED)}",
    "$HOME",
    "${HOME}",
    "${UNSET_OELLM:-fallback}",
    "\\",
    "*",
    "~",
    "|",
    "&",
    "!",
    ">PWNED",
    "<(touch PWNED)",
    "%j",
    "-",
]
TEXT = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
HOSTILE = st.lists(st.one_of(st.sampled_from(SHELL_PIECES), st.text(TEXT, max_size=6)), max_size=5).map("".join)
# the references `expandable` lets through: $NAME, ${NAME}, ${NAME:-word}
VAR_REF = re.compile(
    r"\$(?:(?P<plain>[A-Za-z_][A-Za-z0-9_]*)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<default>:-[A-Za-z0-9_./:@%+=,\-]*)?\})"
)
STUB = """import json, os, sys
json.dump({"argv": sys.argv[1:], "env": os.environ.get("HOSTILE")}, open(os.environ["STUB_OUT"], "w"))
"""
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def expanded(value: str, env: dict[str, str]) -> str:
    """What bash makes of an `expandable` value: variable references expand, nothing else does."""

    def one(m: re.Match[str]) -> str:
        name = m.group("plain") or m.group("braced")
        if m.group("default") is not None and not env.get(name):
            return m.group("default")[2:]
        return env.get(name, "")

    return VAR_REF.sub(one, value)


@pytest.fixture(scope="module")
def base_experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("inert")
    (root / "config" / "platform").mkdir(parents=True)
    (root / "config" / "sweeps").mkdir()
    (root / "config" / "platform" / "mini.yaml").write_text(
        "defaults: [base, _self_]\nplatform: {name: mini}\nslurm: {partition: debug}\nbackend: {launcher: none}\n"
    )
    (root / "stub.py").write_text(STUB)
    sweep = root / "config" / "sweeps" / "h.yaml"
    sweep.write_text(
        textwrap.dedent(
            f"""
            defaults: [{{platform: mini}}]
            project: {{name: h, base_output_dir: {root / "runs"}}}
            backend: {{python: {sys.executable}, entrypoint: {root / "stub.py"}, args: {{}}}}
            """
        )
    )
    loaded = load_sweep(sweep, ["~backend.args.save", "~backend.args.load"])
    return loaded.experiments[0].config, loaded.template_dirs


@PROPERTY
@given(args=st.lists(HOSTILE, min_size=1, max_size=3), env_value=HOSTILE)
def test_any_config_value_reaches_the_job_verbatim_and_runs_nothing(base_experiment, args, env_value):
    config, template_dirs = base_experiment
    cfg = copy.deepcopy(config)
    cfg.backend.args.update({f"hostile_{i}": v for i, v in enumerate(args)})
    cfg.platform.env["HOSTILE"] = env_value
    with tempfile.TemporaryDirectory() as work:
        script = Path(work) / "job.sbatch"
        script.write_text(render_sbatch(cfg, template_dirs=template_dirs))
        env = {"PATH": "/usr/bin:/bin", "STUB_OUT": f"{work}/out.json", "HOME": work}
        run = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=work, check=False)
        assert run.returncode == 0, run.stderr
        got = json.loads(Path(f"{work}/out.json").read_text())
        for i, value in enumerate(args):
            argv = got["argv"]
            assert argv[argv.index(f"--hostile-{i}") + 1] == expanded(value, env)
        assert got["env"] == expanded(env_value, env)
        assert not list(Path(work).rglob("PWNED")) and not Path(work, "fallback").exists()


FILE_NAME = st.text(TEXT, min_size=1, max_size=24).filter(lambda n: "/" not in n and n not in (".", ".."))


@PROPERTY
@given(name=FILE_NAME, data=st.binary(max_size=2048))
def test_any_path_is_written_and_read_back_exactly_and_runs_nothing(name, data):
    """The upload, mkdir and read commands the hooks send to the login node's shell."""
    with tempfile.TemporaryDirectory() as work:
        directory = os.path.join(work, name, "sub")
        path = os.path.join(directory, name)

        def shell(command: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
            env = {"PATH": "/usr/bin:/bin", "HOME": work}
            return subprocess.run(["bash", "-c", command], input=stdin, capture_output=True, env=env, cwd=work)

        assert shell(shlex.join(commands.mkdir_argv([directory]))).returncode == 0
        upload = shell(commands.upload_script(path, "0600"), data)
        assert upload.returncode == 0, upload.stderr
        assert Path(path).read_bytes() == data and (os.stat(path).st_mode & 0o777) == 0o600
        request = [(path, 0, len(data) + 10)]
        read = shell(commands.read_ranges_script(request))
        chunk = commands.parse_read_ranges(read.stdout.decode(), request)[0]
        assert (chunk.size, chunk.data) == (len(data), data)
        made = sorted(str(p.relative_to(work)) for p in Path(work).rglob("*"))
        assert made == sorted([name, os.path.join(name, "sub"), os.path.join(name, "sub", name)])
