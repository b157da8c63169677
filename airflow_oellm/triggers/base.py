"""What every trigger of this provider shares: a cluster connection and the shared poller."""

from __future__ import annotations

from typing import Any, ClassVar

from airflow.triggers.base import BaseTrigger

from airflow_oellm.hooks.slurm import AsyncSlurmHook
from airflow_oellm.triggers.poller import JobPoller


class ClusterTrigger(BaseTrigger):
    """Serializes the attributes named in `fields` (all JSON-safe); polls through the connection's poller."""

    fields: ClassVar[tuple[str, ...]] = ("ssh_conn_id", "local", "batch_system", "poll_interval")

    def __init__(
        self, *, ssh_conn_id: str | None, local: bool, poll_interval: float, batch_system: str = "slurm"
    ) -> None:
        super().__init__()
        self.ssh_conn_id = ssh_conn_id
        self.local = local
        self.batch_system = batch_system
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{type(self).__module__}.{type(self).__qualname__}", {f: getattr(self, f) for f in self.fields}

    def hook(self) -> AsyncSlurmHook:
        return AsyncSlurmHook(self.ssh_conn_id, local=self.local, batch_system=self.batch_system)

    def poller(self) -> JobPoller:
        return JobPoller.shared(self.hook, key=self.hook().key, interval=self.poll_interval)
