"""Bad input: a corpus of broken sweep files next to a good one, and hostile run confs. Each gets an
error that names the file, key or value, nothing is executed, nothing reaches the cluster, and no
other DAG breaks."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_oellm.dag_factory import load_dags
from tests.conftest import REPO
from tests.unit.test_factory import DAG_FILE, bag

HEAD = "defaults: [{platform: devcluster}]\nproject: {name: %s, base_output_dir: /tmp/oellm-bad-input}\n"
# file -> (its text, what its error must say)
CORPUS = {
    "syntax.yaml": (HEAD % "syntax" + "sweep: {axes: {i: [1, 2}\n", ["syntax.yaml:3", "invalid YAML"]),
    "types.yaml": (HEAD % "types" + "slurm: {nodes: many}\n", ["types.yaml:3", "slurm.nodes", "expected an integer"]),
    "unknown.yaml": (HEAD % "unknown" + "backend: {argz: {}}\n", ["unknown.yaml:3", "backend.argz", "'args'"]),
    "dupes.yaml": (
        HEAD % "dupes" + 'sweep: {name_template: "same", axes: {i: [1, 2]}}\n',
        ["dupes.yaml:3", "two experiments get the name 'same'"],
    ),
    "cycle.yaml": (
        "defaults: [{platform: loopa}]\nproject: {name: cycle, base_output_dir: /tmp/oellm-bad-input}\n",
        ["loopa.yaml", "defaults form a cycle", "loopb.yaml"],
    ),
    "binary.yaml": ("\udcff\udcfebinary\x00", ["binary.yaml", "not UTF-8 text"]),
    "iterations.yaml": (
        HEAD % "iterations" + "backend: {args: {train_iters: '$(touch PWNED)'}}\n",
        ["iterations.yaml", "backend.args.train_iters", "whole number of iterations"],
    ),
    "injected.yaml": (
        HEAD % "injected" + "sweep: {name_template: 'x$(touch PWNED)', axes: {i: [1]}}\n",
        ["injected.yaml", "sweep.name_template"],
    ),
    "traversal.yaml": (HEAD % "../../etc", ["traversal.yaml", "project.name"]),
}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "project"
    (root / "config" / "platform").mkdir(parents=True)
    (root / "config" / "platform" / "loopa.yaml").write_text("defaults: [loopb]\n")
    (root / "config" / "platform" / "loopb.yaml").write_text("defaults: [loopa]\n")
    sweeps = root / "config" / "sweeps"
    sweeps.mkdir()
    (sweeps / "good.yaml").write_text(
        HEAD % "good" + "backend: {args: {seed: '${vars.i}'}}\nsweep: {axes: {i: [1, 2]}}\n"
    )
    for name, (text, _) in CORPUS.items():
        (sweeps / name).write_bytes(text.encode("utf-8", errors="surrogateescape"))
    return sweeps


def test_each_broken_sweep_names_its_problem_and_spoils_no_other_dag(corpus, tmp_path, monkeypatch, reliability):
    folder = tmp_path / "dags"
    folder.mkdir()
    shutil.copy(DAG_FILE, folder / DAG_FILE.name)
    monkeypatch.chdir(tmp_path)  # a PWNED file would land here, or in the sweep directory
    dagbag = bag(folder, monkeypatch, [corpus])
    assert {"oellm__good", "oellm__good__good_i1", "oellm__good__good_i2"} <= set(dagbag.dag_ids)
    assert not any(stem in d for d in dagbag.dag_ids for stem in ("syntax", "types", "dupes", "iterations"))
    (message,) = dagbag.import_errors.values()
    for name, (_, expected) in CORPUS.items():
        for fragment in expected:
            assert fragment in message, (name, fragment, message)
    assert not list(tmp_path.rglob("PWNED"))
    reliability.record(
        f"{len(CORPUS)} broken sweep files beside a good one",
        "the good sweep's DAGs loaded; one import error named every broken file with its line and key; nothing ran",
        broken_files=len(CORPUS),
    )


HOSTILE_CONFS = [
    ({"overrides": ["experiment.output_dir=/etc"]}, "would change experiment.output_dir"),
    ({"overrides": ["project.name=../../../etc"]}, "would change project.name"),
    ({"overrides": ["project.base_output_dir=/tmp/$(touch PWNED)"]}, "would change project.base_output_dir"),
    ({"overrides": ["backend.args.train_iters=1; rm -rf ~"]}, "backend.args.train_iters: expected a whole number"),
    ({"backend.args.train_iters": "$(touch PWNED)"}, "backend.args.train_iters: expected a whole number"),
    ({"overrides": ["slurm.job_name=a;b"]}, "slurm.job_name: key does not exist"),
    ({"overrides": ["hydra/../../x=1"]}, "invalid override 'hydra/../../x=1'"),
    ({"overrides": "backend.args.lr=1"}, "'overrides' must be a list of strings"),
    ({"overrides": [["nested"]]}, "'overrides' must be a list of strings"),
    ({"overrides": ["x" * 4_000_000]}, "invalid override 'xxxx"),
    ({"overrides": ["slurm.partition='a b$(touch PWNED)'"]}, "slurm.partition"),
    ({"rm -rf /": 1}, "unknown key(s) in the run's conf: 'rm -rf /'"),
    # overrides that would change nothing are refused by name, not silently accepted
    (
        {"overrides": ["+vars.x=-1"]},
        "override '+vars.x=-1' changes nothing this run submits or watches: no job setting refers to this variable",
    ),
    ({"overrides": ["dag.schedule=@daily"]}, "the DAG is built when the file is parsed"),
    ({"overrides": ["backend.args.save_interval=5000"]}, "it sets the value the run already has"),
    (
        {"backend.args.train_iters": 100000, "overrides": ["+vars.unused=1"]},
        "override '+vars.unused=1' changes nothing",
    ),
]


@pytest.mark.parametrize(("conf", "expected"), HOSTILE_CONFS, ids=[str(i) for i in range(len(HOSTILE_CONFS))])
def test_a_hostile_run_conf_fails_prepare_clearly_and_reaches_no_cluster(conf, expected, tmp_path, monkeypatch):
    import airflow_oellm.operators.prepare as prepare

    class NoCluster:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the run reached the cluster")

    monkeypatch.setattr(prepare, "SlurmHook", NoCluster)
    monkeypatch.chdir(tmp_path)
    dags = load_dags([REPO / "config" / "sweeps"])
    dag = dags["oellm__cooldowns_and_evals__lr0.0003"]
    run = SimpleNamespace(conf=conf, run_after=datetime.now(UTC), logical_date=None, run_id="manual__hostile")
    pushed = []
    ti = SimpleNamespace(xcom_push=lambda **kw: pushed.append(kw))
    context = {"dag_run": run, "params": dict(dag.params), "ti": ti}
    with pytest.raises(AirflowFailException) as failure:  # not retried: the same conf fails the same way
        dag.get_task("prepare").execute(context)
    message = str(failure.value)
    assert expected in message and len(message) < 2000, message[:3000]
    assert "\n" not in message  # Airflow shows one line: the reason, whole
    assert pushed == [] and not list(tmp_path.rglob("PWNED"))


def prepare_context(conf):
    dags = load_dags([REPO / "config" / "sweeps"])
    dag = dags["oellm__cooldowns_and_evals__lr0.0003"]
    run = SimpleNamespace(conf=conf, run_after=datetime.now(UTC), logical_date=None, run_id="manual__x")
    pushed = []
    ti = SimpleNamespace(xcom_push=lambda **kw: pushed.append(kw))
    return dag.get_task("prepare"), {"dag_run": run, "params": dict(dag.params), "ti": ti}, pushed


class ClusterReached(Exception):
    pass


def test_overrides_that_change_the_jobs_reach_the_cluster(monkeypatch, tmp_path):
    import airflow_oellm.operators.prepare as prepare

    def no_cluster(*args, **kwargs):
        raise ClusterReached

    monkeypatch.setattr(prepare, "SlurmHook", no_cluster)
    task, context, _ = prepare_context(
        {"backend.args.train_iters": 100000, "overrides": ["slurm.time=900", "+vars.x=1"]}
    )
    # +vars.x alone changes nothing, but the run is refused only for it: the others are fine without it
    with pytest.raises(AirflowFailException, match=r"override '\+vars\.x=1' changes nothing"):
        task.execute(context)
    task, context, _ = prepare_context({"backend.args.train_iters": 100000, "overrides": ["slurm.time=900"]})
    with pytest.raises(ClusterReached):  # accepted: prepare went on to write the provenance
        task.execute(context)


def test_an_unexpected_error_applying_the_conf_fails_once_in_one_line(monkeypatch):
    import airflow_oellm.config.run as run

    def broken_plan(config):
        raise TypeError("unhashable type: 'dict'\nsecond line")

    monkeypatch.setattr(run, "plan", broken_plan)
    task, context, pushed = prepare_context({})
    with pytest.raises(AirflowFailException) as failure:  # not retried
        task.execute(context)
    assert str(failure.value) == (
        "could not apply this run's conf: TypeError: unhashable type: 'dict'; second line "
        "(a bug in airflow-oellm, not in the conf; the traceback is in this task's log)"
    )
    assert pushed == []


def test_sweeps_from_the_real_world_beside_the_examples_in_a_real_dagbag(tmp_path, monkeypatch, reliability):
    """The example sweeps, the seed guide's sweep verbatim (inert axes), its nested `base_values` form wired
    to real keys, and a file that trips a bug: every good sweep's DAGs load, each bad file names its problem."""
    import airflow_oellm.dag_factory as factory
    from tests.seed_guide import guide_examples, under

    examples = set(load_dags([REPO / "config" / "sweeps"]))
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    for example in (REPO / "config" / "sweeps").glob("*.yaml"):
        shutil.copy(example, sweeps / example.name)
    guide = guide_examples()["config/sweep/scaling_experiments.yaml"]
    head = "defaults: [{platform: devcluster}]\nproject: {name: %s, base_output_dir: /tmp/oellm-guide}\n"
    (sweeps / "guide_verbatim.yaml").write_text(head % "verbatim" + under("sweep", guide))
    wired = guide.replace("  model_size:", "  model:")
    (sweeps / "guide_nested.yaml").write_text(
        head % "nested"
        + "backend: {args: {lr: '${vars.learning_rate}', global_batch_size: '${vars.global_batch_size}'}}\n"
        + under("sweep", wired)
    )
    (sweeps / "crasher.yaml").write_text(head % "crasher")
    real_load = factory.load_sweep

    def load_with_a_bug(path, *args, **kwargs):
        if str(path).endswith("crasher.yaml"):
            raise TypeError("unhashable type: 'dict'")  # what the guide's nested base_values once raised here
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(factory, "load_sweep", load_with_a_bug)
    folder = tmp_path / "dags"
    folder.mkdir()
    shutil.copy(DAG_FILE, folder / DAG_FILE.name)
    dagbag = bag(folder, monkeypatch, [sweeps])

    assert examples and examples <= set(dagbag.dag_ids)
    nested = {d for d in dagbag.dag_ids if d.startswith("oellm__guide_nested__")}
    assert len(nested) == 27 and "oellm__guide_nested" in dagbag.dag_ids  # one per experiment, and the sweep's
    assert not any("verbatim" in d or "crasher" in d for d in dagbag.dag_ids)
    (message,) = dagbag.import_errors.values()
    assert "guide_verbatim.yaml:" in message and "sweep.axes.learning_rate: changes no job" in message
    assert "crasher.yaml: could not be loaded: TypeError: \"unhashable type: 'dict'\"" in message
    assert "this is a bug in airflow-oellm" in message
    reliability.record(
        "the seed guide's sweep verbatim, its nested form and a loader bug beside the example sweeps",
        "every example's DAGs and the nested form's 28 loaded; the verbatim sweep named its inert axes; "
        "the bug became that file's import error",
        example_dags=len(examples),
    )
