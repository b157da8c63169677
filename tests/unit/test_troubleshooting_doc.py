"""docs/troubleshooting.md explains every error message the product raises or prints: the messages are
read from the source (raise sites, config issues, job classification reasons, CLI `error:` lines), so a
new message without an entry fails here."""

from __future__ import annotations

import ast
import re

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.cli

PACKAGE = REPO / "airflow_oellm"
# calls whose text argument is a message for people (besides `raise X("...")`)
MESSAGE_CALLS = {"Issue", "_bad", "bad", "Rule", "command_error", "SubmitError", "CommandError"}
PLACEHOLDER = "\0"


def _text(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else PLACEHOLDER for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return (_text(node.left) or PLACEHOLDER) + (_text(node.right) or PLACEHOLDER)
    return None


def _name(call: ast.Call) -> str:
    return getattr(call.func, "id", None) or getattr(call.func, "attr", "")


def messages() -> dict[str, str]:
    """{where: message} with placeholders for the formatted parts."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                call = node.exc
            elif isinstance(node, ast.Call) and (
                _name(node) in MESSAGE_CALLS
                or (_name(node) == "print" and node.args and (_text(node.args[0]) or "").startswith("error: "))
            ):
                call = node
            else:
                continue
            texts = [t for t in (_text(a) for a in call.args) if t]
            if texts:
                found[f"{path.relative_to(REPO)}:{node.lineno}"] = texts[-1]
    return found


def fragment(message: str) -> str:
    """The longest literal piece of a message, whitespace-normalised, backticks dropped (a rule's
    `{detail}` is filled in when the message is made)."""
    pieces = [" ".join(p.replace("`", "").split()) for p in message.replace("{detail}", PLACEHOLDER).split(PLACEHOLDER)]
    return max(pieces, key=len)


def test_the_extraction_finds_the_known_kinds_of_message():
    found = " | ".join(messages().values())
    for sample in ("unknown key", "cancelled by a user", "Requested node configuration", "is incomplete"):
        assert sample in found


def test_every_message_is_explained():
    doc = " ".join((REPO / "docs" / "troubleshooting.md").read_text().replace("`", "").split())
    missing = {
        where: message
        for where, message in messages().items()
        if len(fragment(message)) >= 8 and fragment(message) not in doc
    }
    assert not missing, "\n".join(f"{w}: {fragment(m)!r}" for w, m in sorted(missing.items()))


def test_short_messages_are_wrappers_of_explained_ones():
    """Messages too short to look up are prefixes or keys wrapped around another message (e.g. `poll`)."""
    short = {w: m for w, m in messages().items() if len(fragment(m)) < 8}
    assert all(len(re.sub(r"\W", "", fragment(m))) <= 20 for m in short.values()), short
    assert len(short) < 40, short
