"""Safe expressions, platform detection and SLURM time specs."""

from __future__ import annotations

import subprocess

import pytest

from airflow_oellm.cli import main as cli
from airflow_oellm.config.expressions import Expression, ExpressionError
from airflow_oellm.config.platforms import PlatformProbe, detect_platform, probe_command
from airflow_oellm.slurm.timespec import format_slurm_time, parse_slurm_time, time_limit_seconds

pytestmark = pytest.mark.config


@pytest.mark.parametrize(
    "text, variables, expected",
    [
        ("1 + 2 * 3", {}, 7),
        ("a.b.c // 2", {"a.b.c": 9}, 4),
        ("cfg.x > 1 and not flag", {"cfg": {"x": 2}, "flag": False}, True),
        ("'M' in size", {"size": "50M"}, True),
        ("x if x > 0 else -x", {"x": -3}, 3),
        ("int('5') + round(2.6) + len([1, 2])", {}, 10),
        ("1 < x <= 3", {"x": 3}, True),
        ("2 ** 10", {}, 1024),
    ],
)
def test_expressions_evaluate(text, variables, expected):
    assert Expression(text).evaluate(variables) == expected


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('true')",
        "().__class__.__bases__",
        "x[0]",
        "lambda: 1",
        "open('/etc/passwd')",
        "[i for i in range(3)]",
        "f'{x}'",
        "a := 1",
    ],
)
def test_expressions_refuse_anything_else(text):
    with pytest.raises(ExpressionError):
        Expression(text).evaluate({"x": [1]})


def test_expression_resource_guards():
    with pytest.raises(ExpressionError, match="exponent"):
        Expression("9 ** 9 ** 9").evaluate({})
    with pytest.raises(ExpressionError, match="repetition"):
        Expression("'a' * 10000000000").evaluate({})
    with pytest.raises(ExpressionError, match="division by zero"):
        Expression("1 / 0").evaluate({})


def probe(env=None, host="", paths=()):
    return PlatformProbe(env=env or {}, hostname=host, existing_paths=frozenset(paths))


@pytest.mark.parametrize(
    "facts, expected",
    [
        (probe(env={"OELLM_PLATFORM": "leonardo", "LUMI_PROJECT": "x"}), "leonardo"),
        (probe(env={"LUMI_PROJECT": "project_465000123"}), "lumi"),
        (probe(env={"SLURM_CLUSTER_NAME": "lumi"}), "lumi"),
        (probe(env={"LEONARDO_PROJECT": "x"}), "leonardo"),
        (probe(env={"JUWELS_PROJECT": "x"}), "juwels"),
        (probe(env={"SYSTEMNAME": "juwelsbooster"}), "juwels"),
        (probe(env={"SYSTEMNAME": "jupiter"}), "jupiter"),
        (probe(env={"BSC_MACHINE": "mn5"}), "marenostrum"),
        (probe(host="uan01"), "lumi"),
        (probe(host="lrdn0417.leonardo.local"), "leonardo"),
        (probe(host="login02", paths=["/leonardo"]), "leonardo"),
        (probe(host="login02"), "unknown"),  # generic names need the filesystem marker
        (probe(host="jwlogin07.juwels"), "juwels"),
        (probe(host="jpbl-s01-02"), "jupiter"),
        (probe(host="glogin1", paths=["/apps/GPP"]), "marenostrum"),
        (probe(host="nid001234", paths=["/appl/lumi"]), "lumi"),
        (probe(host="admin-node"), "unknown"),  # the seed's bare "mn" substring would have matched
        (probe(host="x", paths=["/leonardo_work"]), "leonardo"),
        (probe(host="x", paths=["/appl/lumi"]), "lumi"),
        (probe(host="vm", paths=["/etc/slurm/oellm-dev-cluster"]), "devcluster"),
    ],
)
def test_platform_detection_rules(facts, expected):
    assert detect_platform(facts).name == expected


def test_probe_command_round_trip_through_a_real_shell():
    env = {"PATH": "/usr/bin:/bin", "LUMI_PROJECT": "project_1", "HOME": "/nonexistent", "SECRET_TOKEN": "hunter2"}
    out = subprocess.run(["bash", "-c", probe_command()], env=env, capture_output=True, text=True, check=True).stdout
    facts = PlatformProbe.parse(out)
    assert facts.env["LUMI_PROJECT"] == "project_1"
    assert "hunter2" not in out  # only the variables detection needs cross the wire
    assert facts.hostname
    assert detect_platform(facts).name == "lumi"


def test_detect_platform_cli(monkeypatch, capsys):
    monkeypatch.setenv("OELLM_PLATFORM", "juwels")
    assert cli(["detect-platform"]) == 0
    assert capsys.readouterr().out.strip() == "juwels"
    assert cli(["detect-platform", "--explain"]) == 0
    assert "OELLM_PLATFORM" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("30", 1800),
        ("30:15", 1815),
        ("2:00:00", 7200),
        ("1-0", 86400),
        ("1-2:30", 95400),
        ("2-00:00:01", 172801),
        ("UNLIMITED", None),
    ],
)
def test_parse_slurm_time(text, seconds):
    assert parse_slurm_time(text) == seconds


@pytest.mark.parametrize("text", ["soon", "1:2:3:4", "-5", "1-", ""])
def test_parse_slurm_time_rejects(text):
    with pytest.raises(ValueError):
        parse_slurm_time(text)


def test_format_slurm_time():
    assert format_slurm_time(59) == "00:00:59"
    assert format_slurm_time(7200) == "02:00:00"
    assert format_slurm_time(90061) == "1-01:01:01"
    assert format_slurm_time(0.5) == "00:00:01"
    with pytest.raises(ValueError):
        format_slurm_time(0)
    assert time_limit_seconds(600) == 600 and time_limit_seconds("10:00") == 600
    with pytest.raises(ValueError):
        time_limit_seconds(True)


@pytest.mark.cli
@pytest.mark.parametrize("command", ["validate", "plan", "render", "detect-platform", "schema", "events"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: airflow-oellm {command}" in capsys.readouterr().out
