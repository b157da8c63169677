"""Every bad config gets an error that names the file, the key path and, where close, the fix."""

from __future__ import annotations

import pytest

from airflow_oellm.cli import main as cli
from airflow_oellm.config import ConfigError, load_sweep

pytestmark = pytest.mark.config

HEAD = "defaults: [{platform: mini}]\nproject: {name: bad, base_output_dir: /r}\n"

# a "billion laughs" document: 6 lines that would expand to a million nodes
ALIAS_BOMB = (
    'a: &a ["x","x","x","x","x","x","x","x","x","x"]\n'
    + "".join(f"{n}: &{n} [{','.join(['*' + p] * 10)}]\n" for p, n in zip("abcd", "bcde", strict=True))
    + "f: ["
    + ",".join(["*e"] * 10)
    + "]\n"
)

# (id, sweep text after HEAD unless it starts with '!', overrides, expected fragments, expected line)
CASES = [
    ("unknown-top-key", "projet: {name: x}\n", [], ["projet", "unknown key", "did you mean 'project'"], 3),
    ("unknown-nested-key", "slurm:\n  partiton: x\n", [], ["slurm.partiton", "did you mean 'partition'"], 4),
    (
        "seed-event-actions",
        "monitoring:\n  log_events:\n    - name: ckpt\n      pattern: saved\n"
        "      actions: [{class_name: LogAction}]\n",
        [],
        ["monitoring.log_events[0].actions", "seed tool", "cooldowns:", "docs/dags.md"],
        7,
    ),
    ("seed-state-events", "monitoring:\n  state_events: []\n", [], ["monitoring.state_events", "restart:"], 4),
    ("wrong-type", "slurm:\n  nodes: two\n", [], ["slurm.nodes", "expected an integer", "'two'"], 4),
    ("bool-for-int", "slurm:\n  nodes: true\n", [], ["slurm.nodes", "expected an integer", "boolean True"], 4),
    ("list-for-str", "slurm:\n  partition: [a]\n", [], ["slurm.partition", "expected a string or null"], 4),
    ("bad-literal", "backend:\n  launcher: torch\n", [], ["backend.launcher", "did you mean 'torchrun'"], 4),
    (
        "missing-required",
        "!defaults: [{platform: mini}]\nproject: {name: x}\n",
        [],
        ["project.base_output_dir", "missing required key"],
        2,
    ),
    (
        "relative-output",
        "!defaults: [{platform: mini}]\nproject: {name: x, base_output_dir: runs}\n",
        [],
        ["project.base_output_dir", "absolute path"],
        2,
    ),
    (
        "unsafe-output",
        "!defaults: [{platform: mini}]\nproject: {name: x, base_output_dir: '/tmp/a b'}\n",
        [],
        ["project.base_output_dir", "not safe"],
        2,
    ),
    (
        "traversal-output",
        "!defaults: [{platform: mini}]\nproject: {name: x, base_output_dir: '/tmp/a;rm'}\n",
        [],
        ["project.base_output_dir", "not safe"],
        2,
    ),
    (
        "unknown-option",
        "!defaults: [{platform: lumii}]\nproject: {name: x, base_output_dir: /r}\n",
        [],
        ["defaults[0]", "no option 'lumii'", "did you mean 'lumi'"],
        1,
    ),
    (
        "unknown-group",
        "!defaults: [{platfrom: mini}]\nproject: {name: x, base_output_dir: /r}\n",
        [],
        ["defaults[0]", "unknown config group 'platfrom'", "did you mean 'platform'"],
        1,
    ),
    (
        "option-traversal",
        "!defaults: [{platform: ../../etc/passwd}]\nproject: {name: x, base_output_dir: /r}\n",
        [],
        ["defaults[0]", "invalid option"],
        1,
    ),
    (
        "defaults-not-list",
        "!defaults: {platform: mini}\nproject: {name: x, base_output_dir: /r}\n",
        [],
        ["defaults", "must be a list"],
        1,
    ),
    (
        "defaults-bad-entry",
        "!defaults: [{platform: mini, model: x}]\nproject: {name: x, base_output_dir: /r}\n",
        [],
        ["defaults[0]", "one 'group: option' pair"],
        1,
    ),
    ("yaml-syntax", "!project: {name: x\nsweep: [\n", [], ["invalid YAML"], None),
    ("yaml-duplicate", "slurm: {nodes: 1}\nslurm: {nodes: 2}\n", [], ["duplicate key"], 4),
    ("non-string-key", "slurm:\n  1: x\n", [], ["slurm", "keys must be strings"], 3),
    ("alias-bomb", "!" + ALIAS_BOMB, [], ["invalid YAML", "aliases expand"], None),
    ("top-not-mapping", "!- a\n- b\n", [], ["top level must be a mapping"], None),
    ("protected-section", "experiment: {name: x}\n", [], ["experiment", "set by the sweep planner"], 3),
    ("sweep-unknown-key", "sweep:\n  axis: {a: [1]}\n", [], ["sweep.axis", "did you mean 'axes'"], 4),
    (
        "axis-not-list",
        "sweep:\n  axes:\n    backend.args.lr: 0.1\n",
        [],
        ["sweep.axes.backend.args.lr", "must be a list"],
        5,
    ),
    ("axis-empty", "sweep:\n  axes:\n    backend.args.lr: []\n", [], ["sweep.axes.backend.args.lr", "no values"], 5),
    (
        "group-type",
        "sweep:\n  groups:\n    - {type: zip, axes: {a: [1]}}\n",
        [],
        ["sweep.groups[0].type", "needs type 'product' or 'list'"],
        5,
    ),
    (
        "list-group-axes",
        "sweep:\n  groups:\n    - {type: list, axes: {a: [1]}, configs: [{b: 1}]}\n",
        [],
        ["sweep.groups[0].axes", "'list' group has no axes"],
        5,
    ),
    (
        "filter-unknown-name",
        "sweep:\n  axes: {backend.args.lr: [1, 2]}\n  filter: 'lrr > 1'\n",
        [],
        ["sweep.filter", "unknown name 'lrr'", "known names"],
        5,
    ),
    (
        "filter-syntax",
        "sweep:\n  axes: {backend.args.lr: [1, 2]}\n  filter: 'lr >'\n",
        [],
        ["sweep.filter", "invalid expression"],
        5,
    ),
    (
        "filter-call",
        "sweep:\n  axes: {backend.args.lr: [1]}\n  filter: \"__import__('os')\"\n",
        [],
        ["sweep.filter", "unknown function"],
        5,
    ),
    (
        "template-unknown-field",
        "sweep:\n  axes: {backend.args.lr: [1, 2]}\n  name_template: 'x_{lrr}'\n",
        [],
        ["sweep.name_template", "unknown field {lrr}", "backend.args.lr"],
        5,
    ),
    (
        "template-unsafe-name",
        "sweep:\n  axes: {vars.p: [a/b, c]}\n  name_template: 'x_{p}'\n",
        [],
        ["sweep.name_template", "not safe", "'/'"],
        5,
    ),
    (
        "duplicate-names",
        "sweep:\n  axes: {backend.args.lr: [1, 2]}\n  name_template: same\n",
        [],
        ["sweep.name_template", "two experiments get the name 'same'", "#0", "#1"],
        5,
    ),
    (
        "missing-interpolation",
        "vars:\n  a: ${vars.nope}\n",
        [],
        ["vars.a", "interpolation key 'vars.nope' not found"],
        4,
    ),
    ("missing-env", "vars:\n  a: ${oc.env:OELLM_TEST_SURELY_UNSET}\n", [], ["vars.a", "OELLM_TEST_SURELY_UNSET"], 4),
    (
        "eval-injection",
        'vars:\n  a: ${eval:\'__import__("os").system("true")\'}\n',
        [],
        ["vars.a", "unknown function"],
        4,
    ),
    ("bad-interpolation-syntax", "vars:\n  a: '${HOME:-$(id)}'\n", [], ["vars.a", "invalid interpolation", "\\${"], 4),
    ("bad-time", "slurm:\n  time: soon\n", [], ["slurm.time", "invalid SLURM time"], 4),
    ("zero-nodes", "slurm:\n  nodes: 0\n", [], ["slurm.nodes", "at least 1"], 4),
    (
        "bad-regex",
        "monitoring:\n  log_events:\n    - {name: x, pattern: '(unclosed'}\n",
        [],
        ["monitoring.log_events[0].pattern", "invalid regex"],
        5,
    ),
    (
        "missing-group",
        "monitoring:\n  log_events:\n    - {name: x, pattern: '(?P<it>\\d+)', extract_groups: {i: iter}}\n",
        [],
        ["monitoring.log_events[0].extract_groups.i", "no group named 'iter'"],
        5,
    ),
    (
        "setup-interpolation",
        "platform:\n  setup: ['echo ${project.name}']\n",
        [],
        ["platform.setup[0]", "not allowed in setup lines"],
        4,
    ),
    (
        "env-name",
        "platform:\n  env: {'BAD-NAME': 1}\n",
        [],
        ["platform.env.BAD-NAME", "invalid environment variable"],
        4,
    ),
    ("module-name", "platform:\n  modules: ['x; rm -rf /']\n", [], ["platform.modules[0]", "invalid module name"], 4),
    (
        "container-no-image",
        "platform:\n  container: {runtime: apptainer}\n",
        [],
        ["platform.container.image", "needs an image"],
        4,
    ),
    ("sweep-name", "sweep:\n  name: 'a b'\n", [], ["sweep.name", "not safe"], 4),
    (
        "too-many-points",
        "sweep:\n  axes:\n    vars.a: ["
        + ",".join(map(str, range(400)))
        + "]\n    vars.b: ["
        + ",".join(map(str, range(400)))
        + "]\n",
        [],
        ["sweep", "more than the limit"],
        3,
    ),
    ("override-unknown", "", ["slurm.partiton=x"], ["slurm.partiton", "<override", "did you mean 'partition'"], None),
    ("override-new-arg", "", ["backend.args.lrr=0.1"], ["backend.args.lrr", "use +backend.args.lrr"], None),
    ("override-add-existing", "", ["+slurm.nodes=2"], ["slurm.nodes", "already exists"], None),
    ("override-no-value", "", ["slurm.nodes"], ["missing '=value'"], None),
    ("override-bad-key", "", ["sl urm=1"], ["invalid override"], None),
    ("override-wrong-type", "", ["slurm.nodes=many"], ["slurm.nodes", "expected an integer", "<override"], None),
    (
        "override-swept",
        "sweep:\n  axes: {backend.args.lr: [1, 2]}\n",
        ["backend.args.lr=3"],
        ["backend.args.lr", "swept"],
        None,
    ),
    ("override-delete-missing", "", ["~slurm.nope"], ["slurm.nope", "does not exist"], None),
    ("override-protected", "", ["experiment.output_dir=/x"], ["experiment.output_dir", "cannot be overridden"], None),
    ("override-group-option", "", ["platform=nope"], ["no option 'nope' in group 'platform'"], None),
]


@pytest.mark.parametrize("case_id, text, overrides, fragments, line", CASES, ids=[c[0] for c in CASES])
def test_bad_config_message(case_id, text, overrides, fragments, line, write, project):
    body = text[1:] if text.startswith("!") else HEAD + text
    path = write("config/sweeps/bad.yaml", body)
    with pytest.raises(ConfigError) as err:
        load_sweep(path, overrides)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    if not overrides or case_id == "override-swept":
        assert str(path) in message, f"file not named:\n{message}"
    if line is not None:
        assert f"{path}:{line}:" in message, f"line {line} not named:\n{message}"


def test_error_in_a_group_file_names_that_file(write, project):
    write("config/platform/broken.yaml", "defaults: [base]\nslurm:\n  gpus_per_node: lots\n")
    path = write("config/sweeps/s.yaml", "defaults: [{platform: broken}]\nproject: {name: s, base_output_dir: /r}\n")
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert "platform/broken.yaml:3: slurm.gpus_per_node: expected an integer" in str(err.value)


def test_all_problems_reported_at_once(write, project):
    path = write("config/sweeps/s.yaml", HEAD + "slurm:\n  nodez: 1\n  partiton: x\n")
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert {i.key for i in err.value.issues} == {"slurm.nodez", "slurm.partiton"}


@pytest.mark.parametrize(
    "directives, key, fragment",
    [
        ("  directives: {constraint: 'a b'}\n", "slurm.directives.constraint", "whitespace"),
        ("  directives: {comment: mine}\n", "slurm.directives.comment", "naming rules"),
        ("  directives: {'bad name': 1}\n", "slurm.directives.bad name", "invalid #SBATCH option name"),
        ("  extra_directives: ['#SBATCH --output=/x']\n", "slurm.extra_directives[0]", "naming rules"),
        ("  extra_directives: ['--gpus 8']\n", "slurm.extra_directives[0]", "not a single '#SBATCH"),
        ("  directives: {reservation: '$RES'}\n", "slurm.directives.reservation", "'$'"),
    ],
)
def test_render_level_errors_name_file_and_key(directives, key, fragment, write, project, capsys):
    path = write("config/sweeps/r.yaml", HEAD + "slurm:\n" + directives)
    assert cli(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:" in err and key in err and fragment in err, err


def test_validate_reports_each_file(write, project, capsys):
    good = write("config/sweeps/good.yaml", HEAD)
    bad = write("config/sweeps/bad.yaml", HEAD + "slurm: {nodes: x}\n")
    assert cli(["validate", str(good), str(bad)]) == 1
    out, err = capsys.readouterr()
    assert f"ok: {good}" in out
    assert f"error: {bad}:3: slurm.nodes" in err


def test_validate_checks_the_run_plan(write, project, capsys):
    text = "backend: {args: {train_iters: 100, save_interval: 10}}\ncooldowns:\n  - {at: 55}\n"
    path = write("config/sweeps/c.yaml", HEAD + "sweep: {axes: {backend.args.seed: [1, 2]}}\n" + text)
    assert cli(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # reported once, not once per experiment
    assert f"error: {path}:5: cooldowns: cooldown at 55 is not a checkpoint iteration" in err, err


def test_validate_names_an_old_platform_name_once_and_still_passes(write, capsys):
    path = write("anywhere/old.yaml", "defaults: [{platform: local}]\nproject: {name: o, base_output_dir: /r}\n")
    assert cli(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert f"ok: {path}" in out
    expected = f"warning: {path}:1: defaults[0]: the platform 'local' is now 'devcluster'"
    assert err.count("warning:") == 1 and err.startswith(expected), err


def test_missing_file(tmp_path, capsys):
    assert cli(["validate", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml: file not found" in capsys.readouterr().err


def test_nothing_is_executed_while_loading(write, project, tmp_path):
    marker = tmp_path / "pwned"
    path = write(
        "config/sweeps/evil.yaml",
        HEAD
        + f"vars:\n  a: \"$(touch {marker})\"\n  b: '`touch {marker}`'\nbackend:\n  args:\n    x: '; touch {marker}'\n",
    )
    load_sweep(path)
    assert not marker.exists()
