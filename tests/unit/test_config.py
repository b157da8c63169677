"""Composition, overrides, resolvers, escapes and typed configs (no cluster)."""

from __future__ import annotations

import datetime as dt
import re
import warnings

import pytest

from airflow_oellm.cli import main as cli
from airflow_oellm.config import ConfigError, load_sweep
from airflow_oellm.config.compose import Composer, config_roots
from airflow_oellm.config.resolvers import frozen_time
from airflow_oellm.config.schema import RootConfig
from airflow_oellm.deprecation import ConfigDeprecationWarning
from airflow_oellm.jobscript.render import render_sbatch
from tests.conftest import CONFIG

pytestmark = pytest.mark.config


def test_minimal_sweep_falls_back_to_defaults(write, project):
    path = write(
        "config/sweeps/tiny.yaml",
        """
        defaults:
          - platform: mini
        project:
          name: tiny
          base_output_dir: /scratch/runs
        sweep:
          axes:
            backend.args.lr: [0.1, 0.2]
        """,
    )
    sweep = load_sweep(path)
    assert [e.name for e in sweep.experiments] == ["tiny_lr0.1", "tiny_lr0.2"]
    cfg = sweep.experiments[1].config
    assert isinstance(cfg, RootConfig)
    assert cfg.platform.name == "mini"
    assert cfg.slurm.partition == "debug"
    assert cfg.backend.args["lr"] == 0.2
    # backend/megatron.yaml and monitoring/default.yaml came in without being named
    assert cfg.backend.args["save"] == "/scratch/runs/tiny_lr0.2/checkpoints"
    assert cfg.monitoring.output_paths == ["/scratch/runs/tiny_lr0.2/checkpoints/latest_checkpointed_iteration.txt"]
    assert cfg.platform.env["HF_HUB_OFFLINE"] == 1  # from platform/base.yaml through `- base`


def test_merge_order_groups_then_self_then_sweep_values(write, project):
    write("config/model/small.yaml", "backend:\n  args:\n    hidden_size: 64\n    num_layers: 2\n")
    path = write(
        "config/sweeps/order.yaml",
        """
        defaults:
          - platform: mini
          - model: small
          - _self_
        project: {name: order, base_output_dir: /r}
        backend:
          args:
            num_layers: 3
        sweep:
          base_values:
            backend.args.hidden_size: 128
        """,
    )
    cfg = load_sweep(path).experiments[0].config
    assert cfg.backend.args["num_layers"] == 3  # _self_ after the group
    assert cfg.backend.args["hidden_size"] == 128  # sweep values last


def test_self_first_lets_groups_win(write, project):
    write("config/model/small.yaml", "backend:\n  args:\n    num_layers: 2\n")
    path = write(
        "config/sweeps/selffirst.yaml",
        """
        defaults:
          - _self_
          - platform: mini
          - model: small
        project: {name: s, base_output_dir: /r}
        backend: {args: {num_layers: 3}}
        """,
    )
    assert load_sweep(path).experiments[0].config.backend.args["num_layers"] == 2


def test_group_override_and_key_overrides(write, project):
    write("config/platform/other.yaml", "defaults: [base]\nplatform: {name: other}\nslurm: {partition: big}\n")
    path = write(
        "config/sweeps/o.yaml",
        """
        defaults: [{platform: mini}]
        project: {name: o, base_output_dir: /r}
        """,
    )
    cfg = (
        load_sweep(path, ["platform=other", "slurm.time=7200", "+backend.args.seed=7", "~backend.args.bf16"])
        .experiments[0]
        .config
    )
    assert cfg.platform.name == "other" and cfg.slurm.partition == "big"
    assert cfg.slurm.time == 7200
    assert cfg.backend.args["seed"] == 7
    assert "bf16" not in cfg.backend.args


def test_override_values_are_yaml(write, project):
    path = write("config/sweeps/v.yaml", "defaults: [{platform: mini}]\nproject: {name: v, base_output_dir: /r}\n")
    cfg = (
        load_sweep(
            path, ["backend.args.lr=3e-4", "slurm.exclude=[n1,n2]", "+backend.args.data_path=[a, b]", "slurm.qos=null"]
        )
        .experiments[0]
        .config
    )
    assert cfg.backend.args["lr"] == pytest.approx(3e-4)
    assert cfg.slurm.exclude == ["n1", "n2"]
    assert cfg.backend.args["data_path"] == ["a", "b"]
    assert cfg.slurm.qos is None


def test_override_of_a_literal_dotted_axis_key(write, project):
    path = write(
        "config/sweeps/ax.yaml",
        """
        defaults: [{platform: mini}]
        project: {name: ax, base_output_dir: /r}
        sweep:
          axes:
            backend.args.lr: [0.1, 0.2, 0.3]
        """,
    )
    sweep = load_sweep(path, ["sweep.axes.backend.args.lr=[0.5]"])
    assert [e.parameters for e in sweep.experiments] == [{"backend.args.lr": 0.5}]


def test_group_file_defaults_chain_and_cycle(write, project):
    write("config/platform/a.yaml", "defaults: [b]\nplatform: {name: a}\n")
    write("config/platform/b.yaml", "defaults: [a]\nplatform: {name: b}\n")
    path = write("config/sweeps/cyc.yaml", "defaults: [{platform: a}]\nproject: {name: c, base_output_dir: /r}\n")
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    text = str(err.value)
    assert "cycle" in text and "a.yaml" in text and "b.yaml" in text


def test_interpolated_group_choice(write, project, monkeypatch):
    monkeypatch.setenv("MY_PLATFORM", "mini")
    path = write(
        "config/sweeps/env.yaml",
        "defaults: [{platform: '${oc.env:MY_PLATFORM}'}]\nproject: {name: e, base_output_dir: /r}\n",
    )
    assert load_sweep(path).experiments[0].config.platform.name == "mini"


def test_platform_detect_resolver_in_defaults(write, project, monkeypatch):
    monkeypatch.setenv("OELLM_PLATFORM", "mini")
    path = write(
        "config/sweeps/det.yaml",
        "defaults: [{platform: '${platform_detect:}'}]\nproject: {name: d, base_output_dir: /r}\n",
    )
    assert load_sweep(path).experiments[0].config.platform.name == "mini"


def test_oc_env_resolution(write, project, monkeypatch):
    monkeypatch.setenv("RUNS_ROOT", "/lustre/me")
    path = write(
        "config/sweeps/envdir.yaml",
        "defaults: [{platform: mini}]\nproject: {name: e, base_output_dir: '${oc.env:RUNS_ROOT}/x'}\n",
    )
    assert load_sweep(path).experiments[0].paths.output_dir == "/lustre/me/x/e"


def test_resolvers_slurmtime_pad_iter_eval(write, project):
    path = write(
        "config/sweeps/res.yaml",
        """
        defaults: [{platform: mini}]
        project: {name: r, base_output_dir: /r}
        vars:
          seconds: 90061
          step: 5000
        slurm:
          time: ${slurmtime:${vars.seconds}}
        backend:
          args:
            load: ${experiment.checkpoint_dir}/${pad_iter:${vars.step}}
            train_iters: ${eval:'${vars.step} * 2 + 1'}
        """,
    )
    cfg = load_sweep(path).experiments[0].config
    assert cfg.slurm.time == "1-01:01:01"
    assert cfg.backend.args["load"] == "/r/r/checkpoints/iter_0005000"
    assert cfg.backend.args["train_iters"] == 10001


def test_escaped_interpolation_is_resolved_at_run_time_with_frozen_time(write, project):
    path = write(
        "config/sweeps/esc.yaml",
        r"""
        defaults: [{platform: mini}]
        project: {name: esc, base_output_dir: /r}
        vars:
          cooldown_dir: ${experiment.output_dir}_cooldown_$${timestring:%Y%m%d}
          also: x_\${timestring:%H%M}
        """,
    )
    exp = load_sweep(path).experiments[0]
    assert exp.config.vars["cooldown_dir"] == "/r/esc_cooldown_${timestring:%Y%m%d}"
    assert exp.has_deferred
    when = dt.datetime(2026, 3, 4, 5, 6, tzinfo=dt.UTC)
    first = exp.materialize(when)
    again = exp.materialize(when)
    assert first.vars["cooldown_dir"] == "/r/esc_cooldown_20260304"
    assert first.vars["also"] == "x_0506"
    assert again.vars == first.vars  # a retry with the frozen run time sees the same value


def test_timestring_is_one_instant_within_a_resolution(write, project):
    path = write(
        "config/sweeps/ts.yaml",
        """
        defaults: [{platform: mini}]
        project: {name: ts, base_output_dir: /r}
        vars:
          a: ${timestring:%H%M%S%f}
          b: ${timestring:%H%M%S%f}
        """,
    )
    cfg = load_sweep(path).experiments[0].config
    assert cfg.vars["a"] == cfg.vars["b"]
    with frozen_time(dt.datetime(2030, 1, 2, tzinfo=dt.UTC)):
        assert load_sweep(path).experiments[0].config.vars["a"] == "000000000000"


def test_builtin_platforms_compose_and_inherit_base():
    composer = Composer(config_roots(None))
    for name in ("lumi", "leonardo", "juwels", "jupiter", "marenostrum", "devcluster"):
        composed = composer.compose(None, {"defaults": [{"platform": name}]})
        data = composed.data
        assert data["platform"]["name"] == name
        assert data["platform"]["env"]["PYTHONUNBUFFERED"] == 1, f"{name} did not extend base"
        assert composed.origin("platform.name").endswith(f"platform/{name}.yaml")
        assert composed.origin("platform.env.PYTHONUNBUFFERED").endswith("platform/base.yaml")


def test_lumi_values_follow_the_seed_guide(monkeypatch):
    monkeypatch.setenv("LUMI_PROJECT", "project_465000123")
    sweep = load_sweep(CONFIG / "sweeps" / "minimal.yaml", ["platform=lumi"])
    cfg = sweep.experiments[0].config
    assert cfg.slurm.account == "project_465000123"
    assert cfg.slurm.partition == "standard-g"
    assert cfg.slurm.gpus_per_node == 8 and cfg.slurm.exclusive
    assert cfg.slurm.directives == {"hint": "nomultithread"}
    assert cfg.platform.env["NCCL_NET_GDR_LEVEL"] == 3
    assert cfg.platform.env["MIOPEN_USER_DB_PATH"] == "/tmp/$USER-miopen-cache-$SLURM_JOB_ID"
    assert cfg.srun.cpu_bind.startswith("mask_cpu:")


def test_a_site_that_needs_an_account_refuses_a_sweep_without_one(monkeypatch, tmp_path, capsys):
    # `${oc.env:LEONARDO_PROJECT,null}` resolves where the sweep is loaded: here, the Airflow host
    monkeypatch.delenv("LEONARDO_PROJECT", raising=False)
    with pytest.raises(ConfigError) as err:
        load_sweep(CONFIG / "sweeps" / "minimal.yaml", ["platform=leonardo"])
    [issue] = err.value.issues
    assert issue.key == "slurm.account" and issue.file.endswith("platform/leonardo.yaml")
    assert "platform 'leonardo' requires it (platform.requires) and it is not set: export LEONARDO_PROJECT" in (
        issue.message
    )
    sweep = str(CONFIG / "sweeps" / "minimal.yaml")
    assert cli(["plan", sweep, "platform=leonardo"]) == 1
    assert cli(["validate", sweep, "platform=leonardo"]) == 1
    assert "LEONARDO_PROJECT" in capsys.readouterr().err
    # set in the sweep (or an override), or exported on the Airflow host: the script carries it
    cfg = load_sweep(sweep, ["platform=leonardo", "slurm.account=AIFAC_L01_028"]).experiments[0].config
    assert cfg.slurm.account == "AIFAC_L01_028" and cfg.slurm.partition == "boost_usr_prod"
    monkeypatch.setenv("LEONARDO_PROJECT", "AIFAC_from_env")
    loaded = load_sweep(sweep, ["platform=leonardo"])
    script = render_sbatch(loaded.experiments[0].config, template_dirs=loaded.template_dirs)
    assert "#SBATCH --account=AIFAC_from_env" in script and "#SBATCH --qos=normal" in script
    # a site's QoS is a requirement too: taking it away is refused, naming the key
    with pytest.raises(ConfigError, match=r"slurm\.qos: platform 'leonardo' requires it .* set slurm\.qos in"):
        load_sweep(sweep, ["platform=leonardo", "slurm.qos=null"])


@pytest.mark.parametrize(
    ("platform", "required"),
    [
        ("lumi", ["slurm.account"]),
        ("leonardo", ["slurm.account", "slurm.qos"]),
        ("juwels", ["slurm.account"]),
        ("jupiter", ["slurm.account"]),
        ("marenostrum", ["slurm.account", "slurm.qos"]),
        ("devcluster", []),
        ("local-process", []),
    ],
)
def test_each_site_declares_what_it_needs(platform, required, monkeypatch):
    for var in ("LUMI_PROJECT", "LEONARDO_PROJECT", "JUWELS_PROJECT", "JUPITER_PROJECT", "MARENOSTRUM_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    composed = Composer(config_roots(None)).compose(None, {"defaults": [{"platform": platform}]})
    assert composed.data["platform"].get("requires", []) == required
    unset = [f"{key}=null" for key in required]
    try:
        load_sweep(CONFIG / "sweeps" / "minimal.yaml", [f"platform={platform}", *unset])
    except ConfigError as exc:
        assert sorted({i.key for i in exc.issues}) == required
    else:
        assert required == []


def test_a_requirement_that_names_no_key_is_refused(write, project):
    path = write(
        "config/sweeps/r.yaml",
        "defaults: [{platform: mini}]\nproject: {name: p, base_output_dir: /r}\nplatform: {requires: [slurm.acount]}\n",
    )
    with pytest.raises(ConfigError, match=r"platform\.requires\[0\]: 'slurm\.acount' is not a config key"):
        load_sweep(path)


def test_sexagesimal_and_string_times(site_accounts):
    cfg = load_sweep(CONFIG / "sweeps" / "minimal.yaml", ["platform=lumi"]).experiments[0].config
    assert cfg.slurm.time == 7200  # `time: 2:00:00` is read by YAML as seconds
    cfg = load_sweep(CONFIG / "sweeps" / "minimal.yaml", ["platform=juwels"]).experiments[0].config
    assert cfg.slurm.time == "1-00:00:00"


def test_experiment_section_is_injected_and_protected(write, project):
    path = write("config/sweeps/p.yaml", "defaults: [{platform: mini}]\nproject: {name: p, base_output_dir: /base}\n")
    exp = load_sweep(path).experiments[0]
    assert exp.config.experiment.dag_id == "oellm__p__p"
    assert exp.config.experiment.log_path == "/base/p/logs/p-%j.out"
    with pytest.raises(ConfigError, match=r"experiment\.name.*cannot be overridden"):
        load_sweep(path, ["experiment.name=x"])


def test_loading_is_deterministic(write, project):
    sweep_a = load_sweep(CONFIG / "sweeps" / "scaling_study.yaml")
    sweep_b = load_sweep(CONFIG / "sweeps" / "scaling_study.yaml")
    assert [(e.name, e.dag_id, e.paths) for e in sweep_a.experiments] == [
        (e.name, e.dag_id, e.paths) for e in sweep_b.experiments
    ]
    assert [e.resolved for e in sweep_a.experiments] == [e.resolved for e in sweep_b.experiments]


def test_config_dir_option_adds_a_root(write, tmp_path):
    write("extra/platform/elsewhere.yaml", "defaults: [base]\nplatform: {name: elsewhere}\n")
    path = write("s.yaml", "defaults: [{platform: elsewhere}]\nproject: {name: z, base_output_dir: /r}\n")
    cfg = load_sweep(path, config_dirs=[str(tmp_path / "extra")]).experiments[0].config
    assert cfg.platform.name == "elsewhere"


def test_sweep_file_outside_a_project_uses_builtin_groups(write):
    path = write("anywhere/s.yaml", "defaults: [{platform: devcluster}]\nproject: {name: z, base_output_dir: /r}\n")
    assert load_sweep(path).experiments[0].config.platform.name == "devcluster"


def test_the_dev_cluster_platform_keeps_its_old_name_for_a_release(write):
    path = write("anywhere/s.yaml", "project: {name: z, base_output_dir: /r}\ndefaults: [{platform: local}]\n")
    with pytest.warns(ConfigDeprecationWarning) as caught:
        assert load_sweep(path).experiments[0].config.platform.name == "devcluster"
    assert f"{path}:2: defaults[0]: the platform 'local' is now 'devcluster'" in str(caught[0].message)
    with pytest.warns(ConfigDeprecationWarning, match="override platform: the platform 'local' is now 'devcluster'"):
        assert load_sweep(path, ["platform=local"]).experiments[0].config.platform.name == "devcluster"


def test_a_config_roots_own_platform_under_an_old_name_wins_without_a_warning(write, tmp_path):
    write("extra/platform/local.yaml", "defaults: [base]\nplatform: {name: mine}\n")
    path = write("s.yaml", "defaults: [{platform: local}]\nproject: {name: z, base_output_dir: /r}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_sweep(path, config_dirs=[str(tmp_path / "extra")]).experiments[0].config.platform.name == "mine"


def test_seconds_and_strings_both_accepted_for_time(write, project):
    path = write("config/sweeps/t.yaml", "defaults: [{platform: mini}]\nproject: {name: t, base_output_dir: /r}\n")
    for value, expected in (("600", 600), ("'10:00'", "10:00"), ("'1-0'", "1-0")):
        assert load_sweep(path, [f"slurm.time={value}"]).experiments[0].config.slurm.time == expected


def test_numbers_become_text_where_text_is_expected(write, project):
    path = write("config/sweeps/n.yaml", "defaults: [{platform: mini}]\nproject: {name: n, base_output_dir: /r}\n")
    assert load_sweep(path, ["slurm.account=12345"]).experiments[0].config.slurm.account == "12345"


def test_resolved_config_never_holds_unresolved_interpolations(write, project):
    for sweep_file in sorted((CONFIG / "sweeps").glob("*.yaml")):
        for e in load_sweep(sweep_file).experiments:
            assert not re.search(r"\$\{", repr(e.materialize()))


def test_shell_variables_survive_run_time_resolution(write, project):
    path = write(
        "config/sweeps/sh.yaml",
        r"""
        defaults: [{platform: mini}]
        project: {name: sh, base_output_dir: /r}
        platform:
          env:
            JOB_TMP: /tmp/\${USER}-\${SLURM_JOB_ID:-none}
            PLAIN: /tmp/$USER
        vars:
          stamp: \${timestring:%Y}
          out: \${experiment.output_dir}/x
        """,
    )
    exp = load_sweep(path).experiments[0]
    cfg = exp.materialize(dt.datetime(2031, 1, 1, tzinfo=dt.UTC))
    assert cfg.platform.env["JOB_TMP"] == "/tmp/${USER}-${SLURM_JOB_ID:-none}"
    assert cfg.platform.env["PLAIN"] == "/tmp/$USER"
    assert cfg.vars["stamp"] == "2031" and cfg.vars["out"] == "/r/sh/x"


def test_unescaped_shell_variable_gets_a_hint(write, project):
    path = write(
        "config/sweeps/sh.yaml",
        "defaults: [{platform: mini}]\nproject: {name: sh, base_output_dir: /r}\nvars: {a: '${SLURM_JOB_ID}'}\n",
    )
    with pytest.raises(ConfigError, match=r"for the job's shell variable write \$SLURM_JOB_ID"):
        load_sweep(path)


def test_platform_auto_option_follows_detection(monkeypatch, site_accounts):
    monkeypatch.setenv("OELLM_PLATFORM", "juwels")
    cfg = load_sweep(CONFIG / "sweeps" / "minimal.yaml", ["platform=auto"]).experiments[0].config
    assert cfg.platform.name == "juwels" and cfg.slurm.partition == "booster"
    monkeypatch.setenv("OELLM_PLATFORM", "unknown")
    cfg = load_sweep(CONFIG / "sweeps" / "minimal.yaml", ["platform=auto"]).experiments[0].config
    assert cfg.platform.name == "base"
