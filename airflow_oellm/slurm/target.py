"""Where jobs run, as one value: `ClusterTarget`, from the platform config through the tasks to the hooks.

There are three places, and only this module spells them out:
- a cluster's login node over an Airflow SSH connection: `ClusterTarget("lumi")`, the usual case;
- this machine's own shell, SLURM's commands on its PATH (Airflow on a login node):
  `ClusterTarget(local_commands=True)`;
- no SLURM at all, jobs run as background processes on this machine (`airflow_oellm.localjobs`):
  `ClusterTarget(batch_system="local-process")`, whose commands are local by nature.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

SLURM = "slurm"
LOCAL_PROCESS = "local-process"
BATCH_SYSTEMS = (SLURM, LOCAL_PROCESS)
DEFAULT_SSH_CONN_ID = "ssh_default"


@dataclass(frozen=True)
class ClusterTarget:
    """:param ssh_conn_id: Airflow SSH connection to the login node (none when commands run locally).
    :param local_commands: run SLURM's commands with this machine's bash instead of over SSH.
    :param batch_system: `slurm`, or `local-process` (no SLURM; implies `local_commands`)."""

    ssh_conn_id: str | None = DEFAULT_SSH_CONN_ID
    local_commands: bool = False
    batch_system: str = SLURM

    def __post_init__(self) -> None:
        if self.batch_system not in BATCH_SYSTEMS:
            raise ValueError(f"unknown batch_system {self.batch_system!r}; use one of {', '.join(BATCH_SYSTEMS)}")
        if self.batch_system == LOCAL_PROCESS:
            object.__setattr__(self, "local_commands", True)
        if self.local_commands:  # no SSH: a connection id would only mislead a reader of logs or keys
            object.__setattr__(self, "ssh_conn_id", None)
        elif not self.ssh_conn_id:
            raise ValueError("a cluster target needs an ssh_conn_id, or local_commands=True")

    @classmethod
    def of(cls, value: ClusterTarget | Mapping[str, Any]) -> ClusterTarget:
        """A target, or its `as_dict()` form (a trigger's serialized arguments)."""
        return value if isinstance(value, ClusterTarget) else cls(**value)

    @classmethod
    def choose(cls, ssh_conn_id: str | None, cluster: ClusterTarget | None) -> ClusterTarget:
        """A task's or hook's target from its two arguments: `ssh_conn_id` alone is the SSH case's
        shorthand; `cluster` names any target, and then `ssh_conn_id` stays unset (or agrees)."""
        if cluster is None:
            return cls(ssh_conn_id)
        if ssh_conn_id not in (None, DEFAULT_SSH_CONN_ID, cluster.ssh_conn_id):
            raise ValueError(f"give ssh_conn_id={ssh_conn_id!r} or cluster={cluster!r}, not both")
        return cluster

    @classmethod
    def of_0_1(cls, ssh_conn_id: str | None, arguments: Mapping[str, Any]) -> ClusterTarget:
        """The target that 0.1's `local` and `batch_system` arguments named, beside `ssh_conn_id`."""
        return cls(ssh_conn_id, bool(arguments.get("local")), arguments.get("batch_system", SLURM))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def key(self) -> str:
        """The endpoint: triggers with the same key share one poller (one connection, one poll per interval)."""
        if self.batch_system == LOCAL_PROCESS:
            return LOCAL_PROCESS
        return "local-commands" if self.local_commands else f"ssh:{self.ssh_conn_id}"

    @property
    def name(self) -> str:
        """What messages call the cluster: its connection, or this machine."""
        return self.ssh_conn_id or "this machine"

    def describe(self) -> str:
        if self.batch_system == LOCAL_PROCESS:
            return "local processes on this machine (no SLURM)"
        return "SLURM with this machine's shell" if self.local_commands else f"SLURM over SSH ({self.ssh_conn_id})"
