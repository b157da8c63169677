"""The fast interpolation resolver agrees with OmegaConf, and falls back where it cannot."""

from __future__ import annotations

import datetime as dt

import pytest
from omegaconf import OmegaConf

from airflow_oellm.config import load_sweep
from airflow_oellm.config.interpolation import ResolveError, Unsupported, resolve, split_interpolations
from airflow_oellm.config.resolvers import RESOLVERS, frozen_time
from tests.conftest import EXAMPLE_SWEEPS

pytestmark = pytest.mark.config

CORPUS = {
    "a": 1,
    "flag": True,
    "f": 0.5,
    "n": None,
    "lst": [1, 2, "${a}"],
    "d": {"x": 1, "y": "${.x}", "z": "${..a}", "w": "${..lst}", "deep": {"q": "${...f}"}},
    "concat": "v_${flag}_${f}_${n}_${a}",
    "whole_list": "${lst}",
    "whole_dict": "${d}",
    "chain1": "${chain2}",
    "chain2": "${d.y}",
    "index": "${lst[1]}",
    "index_dot": "${lst.0}",
    "eval": "${eval:'2 * ${a} + ${f}'}",
    "eval_nested": "${eval:'${a} + 1'}",
    "pad": "${pad_iter: 1000 }",
    "pad_interp": "${pad_iter:${a}}",
    "slurmtime": "${slurmtime:${eval:'3600*2'}}",
    "env_default_int": "${oc.env:OELLM_TEST_UNSET_VAR, 12}",
    "env_default_text": "${oc.env:OELLM_TEST_UNSET_VAR,  a b }",
    "env_default_quoted": '${oc.env:OELLM_TEST_UNSET_VAR,"q, r"}',
    "env_default_bool": "${oc.env:OELLM_TEST_UNSET_VAR,true}",
    "env_default_null": "${oc.env:OELLM_TEST_UNSET_VAR,null}",
    "env_default_float": "${oc.env:OELLM_TEST_UNSET_VAR,1e-3}",
    "env_default_interp": "${oc.env:OELLM_TEST_UNSET_VAR,${a}}",
    "env_default_concat": "${oc.env:OELLM_TEST_UNSET_VAR,x${a}y}",
    "env_default_empty_quotes": "${oc.env:OELLM_TEST_UNSET_VAR,''}",
    "env_set": "${oc.env:OELLM_TEST_SET_VAR}",
    "escaped": "a\\${a}",
    "escaped_twice": "\\\\${a}",
    "escaped_three": "\\\\\\${a}",
    "backslash_elsewhere": "c:\\path\\${a}",
    "time": "${timestring:%Y-%m-%d}",
    "time_default": "${oc.timestring:}",
    "no_interp": "plain $HOME text",
    "dollar_brace_shell": "\\${SLURM_JOB_ID}",
}


def omegaconf_resolve(data):
    return OmegaConf.to_container(OmegaConf.create(data), resolve=True)


def test_fast_resolver_matches_omegaconf(monkeypatch):
    monkeypatch.setenv("OELLM_TEST_SET_VAR", "from-env")
    monkeypatch.delenv("OELLM_TEST_UNSET_VAR", raising=False)
    with frozen_time(dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)):
        ours = resolve(CORPUS, RESOLVERS)
        theirs = omegaconf_resolve(CORPUS)
    for key in CORPUS:
        assert ours[key] == theirs[key], key
        assert type(ours[key]) is type(theirs[key]), key


def test_fast_resolver_matches_omegaconf_on_every_example_experiment():
    for sweep_file in EXAMPLE_SWEEPS:
        for e in load_sweep(sweep_file).experiments:
            with frozen_time():
                assert resolve(e.unresolved, RESOLVERS) == omegaconf_resolve(e.unresolved), (sweep_file, e.name)


@pytest.mark.parametrize(
    "value",
    ["x${lst}", "${oc.select:a,1}", "${oc.decode:'[1, 2]'}", "${oc.env:X,[1, 2]}", "${unknown_resolver:1}", "${a:b:c"],
)
def test_unsupported_constructs_fall_back(value):
    with pytest.raises(Unsupported):
        resolve({"a": 1, "lst": [1, "${a}"], "v": value}, RESOLVERS)


def test_fallback_gives_omegaconf_semantics(write, project):
    path = write(
        "config/sweeps/fb.yaml",
        "defaults: [{platform: mini}]\nproject: {name: fb, base_output_dir: /r}\n"
        "vars:\n  picked: ${oc.select:vars.missing,fallback}\n",
    )
    assert load_sweep(path).experiments[0].config.vars["picked"] == "fallback"


def test_errors_name_the_key():
    with pytest.raises(ResolveError) as err:
        resolve({"a": {"b": "${nope.x}"}}, RESOLVERS)
    assert err.value.key == "a.b" and "nope.x" in err.value.message
    with pytest.raises(ResolveError, match="recursive"):
        resolve({"a": "${b}", "b": "${a}"}, RESOLVERS)
    with pytest.raises(ResolveError, match="above the root"):
        resolve({"a": "${...x}"}, RESOLVERS)


def test_split_interpolations():
    assert split_interpolations("a${b}c${d:'}'}") == ((False, "a"), (True, "b"), (False, "c"), (True, "d:'}'"))
    assert split_interpolations("\\${x}") == ((False, "${x}"),)
