"""Secrets by reference: `platform.secrets` names Airflow Variables and Connection fields, never values."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_oellm.config import ConfigError, load_sweep
from airflow_oellm.config.secrets import SecretError, SecretReference, resolve_secrets

pytestmark = [pytest.mark.unit, pytest.mark.config]

CONNECTIONS = {
    "hf": SimpleNamespace(login="me", password="hf-token", host=None, schema="", port=443, extra_dejson={"org": "x"})
}


def variable(key: str) -> str:
    return {"wandb_key": "wandb-secret", "blank": ""}[key]


def connection(conn_id: str) -> SimpleNamespace:
    return CONNECTIONS[conn_id]


@pytest.mark.parametrize(
    ("text", "reference"),
    [
        ("var:wandb_key", SecretReference("var", "wandb_key")),
        ("var:a:b/c", SecretReference("var", "a:b/c")),  # a Variable key is free-form
        ("conn:hf/password", SecretReference("conn", "hf", "password")),
        ("conn:hf/extra.org", SecretReference("conn", "hf", "extra.org")),
    ],
)
def test_references_parse_and_print_back(text, reference):
    assert SecretReference.parse(text) == reference and str(reference) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("wandb_key", "is not a secret reference: write `var:<variable key>` or `conn:"),
        ("var:", "is not a secret reference"),
        ("conn:hf", "names no connection field"),
        ("conn:/password", "names no connection field"),
        ("conn:hf/passwd", "no connection field 'passwd'; use login, password, host, schema, port or extra.<key>"),
        ("conn:hf/extra.", "no connection field 'extra.'"),
        (42, "a secret is a reference"),
    ],
)
def test_a_bad_reference_says_why(text, reason):
    with pytest.raises(SecretError, match=reason.replace("(", r"\(").replace(".", r"\.")):
        SecretReference.parse(text)


@given(st.one_of(st.text(), st.integers(), st.none(), st.lists(st.text())))
def test_any_value_parses_or_raises_our_error(text):
    try:
        reference = SecretReference.parse(text)
    except SecretError:
        return
    assert SecretReference.parse(str(reference)) == reference


def test_values_are_looked_up_by_reference():
    references = {"WANDB_API_KEY": "var:wandb_key", "HF_TOKEN": "conn:hf/password", "HF_ORG": "conn:hf/extra.org"}
    values = resolve_secrets(references, variable, connection)
    assert values == {"WANDB_API_KEY": "wandb-secret", "HF_TOKEN": "hf-token", "HF_ORG": "x"}
    assert resolve_secrets({"PORT": "conn:hf/port"}, variable, connection) == {"PORT": "443"}


@pytest.mark.parametrize(
    ("references", "message"),
    [
        ({"A": "var:nope"}, "secret A: no Airflow Variable 'nope' (KeyError)"),
        ({"A": "conn:nope/password"}, "secret A: no Airflow Connection 'nope' (KeyError)"),
        ({"A": "var:blank"}, "secret A: var:blank is empty"),
        ({"A": "conn:hf/host"}, "secret A: conn:hf/host is empty"),
        ({"A": "conn:hf/extra.team"}, "secret A: conn:hf/extra.team is empty"),
        ({"1A": "var:wandb_key"}, "secret 1A: not an environment variable name"),
    ],
)
def test_a_secret_that_finds_nothing_is_refused_by_name(references, message):
    with pytest.raises(SecretError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_secrets(references, variable, connection)


def test_the_loader_refuses_a_bad_secret_with_file_and_key(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "defaults: [{platform: devcluster}]\nproject: {name: s, base_output_dir: /r}\n"
        "platform:\n  secrets: {WANDB_API_KEY: wandb_key, 9X: var:a, HF_TOKEN: conn:hf/password}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_sweep(path)
    text = str(caught.value)
    assert f"{path}:" in text and "platform.secrets.WANDB_API_KEY: 'wandb_key' is not a secret reference" in text
    assert "platform.secrets.9X: '9X' is not an environment variable name" in text
    assert "HF_TOKEN" not in text


def test_a_sweep_with_secrets_carries_references_only(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "defaults: [{platform: devcluster}]\nproject: {name: s, base_output_dir: /r}\n"
        "platform: {secrets: {WANDB_API_KEY: 'var:wandb_key', HF_TOKEN: 'conn:hf/password'}}\n"
    )
    resolved = load_sweep(path).experiments[0].resolved
    assert resolved["platform"]["secrets"] == {"WANDB_API_KEY": "var:wandb_key", "HF_TOKEN": "conn:hf/password"}
