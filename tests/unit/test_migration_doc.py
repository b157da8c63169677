"""docs/migration.md: every `# after` sweep in it loads, and a seed-format config is refused as it says."""

from __future__ import annotations

import re

import pytest

from airflow_oellm.config import load_sweep
from airflow_oellm.config.errors import ConfigError
from tests.conftest import REPO

pytestmark = pytest.mark.config

DOC = (REPO / "docs" / "migration.md").read_text()
AFTER = [block for block in re.findall(r"```yaml\n(.*?)```", DOC, re.DOTALL) if block.startswith("# after")]


def test_the_doc_has_its_examples():
    assert len(AFTER) == 3


@pytest.mark.parametrize("block", AFTER, ids=[b.splitlines()[0][9:40] for b in AFTER])
def test_every_after_example_loads(block, write, site_accounts):
    sweep = load_sweep(write("config/sweeps/after.yaml", block))
    assert sweep.experiments
    cfg = sweep.experiments[0].config
    if "cooldowns:" in block:
        assert [c.at for c in cfg.cooldowns] == [10000, 50000, 100000]
    if "every_iterations: 10000" in block:
        assert [s.when for s in cfg.evaluation.suites] == ["every", "interval", "final"]
    if 'name_template: "{model}_lr{lr}_gbsz{global_batch_size}"' in block:
        assert len(sweep.experiments) == 27 and sweep.experiments[0].name == "50M_lr0.1_gbsz128"


def test_a_seed_action_is_refused_with_its_replacement(write):
    path = write(
        "config/sweeps/seed.yaml",
        """
        defaults: [{platform: devcluster}, _self_]
        project: {name: seed, base_output_dir: /tmp/seed}
        monitoring:
          log_events:
            - name: checkpoint_saved
              pattern: 'successfully saved checkpoint'
              actions: [{class_name: LogAction, message: hi}]
        sweep: {axes: {backend.args.lr: [0.1]}}
        """,
    )
    with pytest.raises(ConfigError) as error:
        load_sweep(path)
    message = str(error.value)
    assert "seed.yaml:7: monitoring.log_events[0].actions: unknown key (the seed tool's format)" in message
    assert "`conversion:`, `evaluation:` and `cooldowns:`" in message and "SlurmLogSensor" in message
