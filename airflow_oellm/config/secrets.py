"""Secrets a job gets from Airflow: a config names them by reference (`var:KEY`, `conn:ID/FIELD`), never by
value. The values are looked up when the job is submitted and reach it on sbatch's stdin only
(`slurm/operations.encode_secrets`): no file, log, XCom or rendered script holds them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from airflow_oellm.slurm.shell import ENV_NAME

CONNECTION_FIELDS = ("login", "password", "host", "schema", "port")  # and extra.<key>
SYNTAX = "`var:<variable key>` or `conn:<connection id>/<login|password|host|schema|port|extra.<key>>`"


class SecretError(ValueError):
    """A secret that cannot be named or found; the message says which and why."""


@dataclass(frozen=True)
class SecretReference:
    kind: str  # "var" or "conn"
    key: str  # the Variable's key, or the Connection's id
    field: str | None = None  # a Connection's field: one of CONNECTION_FIELDS, or `extra.<key>`

    @classmethod
    def parse(cls, text: Any) -> SecretReference:
        if not isinstance(text, str):
            raise SecretError(f"a secret is a reference, {SYNTAX}; got {text!r}")
        kind, _, rest = text.partition(":")
        if kind == "var" and rest.strip():
            return cls("var", rest)
        if kind == "conn":
            conn_id, _, field = rest.partition("/")
            if not conn_id or not field:
                raise SecretError(f"{text!r} names no connection field: write conn:<connection id>/<field>")
            if field not in CONNECTION_FIELDS and not (field.startswith("extra.") and len(field) > len("extra.")):
                fields = ", ".join(CONNECTION_FIELDS)
                raise SecretError(f"{text!r}: no connection field {field!r}; use {fields} or extra.<key>")
            return cls("conn", conn_id, field)
        raise SecretError(f"{text!r} is not a secret reference: write {SYNTAX}")

    def __str__(self) -> str:
        return f"var:{self.key}" if self.kind == "var" else f"conn:{self.key}/{self.field}"


def secret_problems(secrets: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, message) for each entry of `platform.secrets` that names no environment variable or no secret."""
    problems = []
    for name, text in secrets.items():
        key = f"platform.secrets.{name}"
        if not ENV_NAME.match(str(name)):
            problems.append((key, f"{name!r} is not an environment variable name"))
            continue
        try:
            SecretReference.parse(text)
        except SecretError as exc:
            problems.append((key, str(exc)))
    return problems


def resolve_secrets(
    references: Mapping[str, str],
    variable: Callable[[str], str],
    connection: Callable[[str], Any],
) -> dict[str, str]:
    """Environment name -> value, through `variable(key)` and `connection(conn_id)` (an object with the
    connection's fields and `extra_dejson`). A reference that finds nothing raises SecretError naming it."""
    values = {}
    for name, text in references.items():
        if not ENV_NAME.match(name):
            raise SecretError(f"secret {name}: not an environment variable name")
        reference = SecretReference.parse(text)
        try:
            found = variable(reference.key) if reference.kind == "var" else connection(reference.key)
        except Exception as exc:  # each backend raises its own "not found"
            kind = "Variable" if reference.kind == "var" else "Connection"
            raise SecretError(f"secret {name}: no Airflow {kind} {reference.key!r} ({type(exc).__name__})") from None
        value = found if reference.kind == "var" else _field(found, reference)
        if value is None or value == "":
            raise SecretError(f"secret {name}: {reference} is empty")
        values[name] = str(value)
    return values


def _field(connection: Any, reference: SecretReference) -> Any:
    field = reference.field or ""
    if field.startswith("extra."):
        return (getattr(connection, "extra_dejson", None) or {}).get(field.removeprefix("extra."))
    return getattr(connection, field, None)


def notification_problems(notifications: Any) -> list[tuple[str, str]]:
    """(key, message) for each notifier of `notifications.notify` that could never tell anyone."""
    problems = []
    for index, notifier in enumerate(notifications.notify):
        key = f"notifications.notify[{index}]"
        if (notifier.webhook is None) == (notifier.notifier is None):
            problems.append((key, "give one of webhook (a URL, or a var:/conn: reference to one) and notifier"))
            continue
        if notifier.webhook is not None and not notifier.webhook.startswith(("https://", "http://")):
            try:
                SecretReference.parse(notifier.webhook)
            except SecretError as exc:
                problems.append((f"{key}.webhook", f"expected an http(s) URL or a secret reference: {exc}"))
        if notifier.notifier is not None and "." not in notifier.notifier:
            problems.append((f"{key}.notifier", f"expected a dotted path (module.name), got {notifier.notifier!r}"))
        if notifier.args and notifier.notifier is None:
            problems.append((f"{key}.args", "is set but nothing is made with it: args are a notifier class's"))
    return problems
