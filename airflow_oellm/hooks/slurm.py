"""SlurmHook and AsyncSlurmHook: every remote action of the provider goes through one of these.

Both run the same operations (`airflow_oellm.slurm.operations`) where a `ClusterTarget` says jobs run:
on a cluster's login node over an Airflow SSH connection (the SSH provider's SSHHook / SSHHookAsync:
host keys verified, keys from the connection), with the local bash (Airflow on a login node), or with
no SLURM at all, jobs as background processes on this machine (`airflow_oellm.localjobs`).

    hook = SlurmHook(ssh_conn_id="lumi")  # or SlurmHook(cluster=ClusterTarget(batch_system="local-process"))
    hook.upload("/scratch/x/job.sbatch", script, mode="0700")
    outcome = hook.submit_once(identity, "/scratch/x/job.sbatch")
    hook.job_statuses([outcome.job_id])
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from airflow.exceptions import AirflowProviderDeprecationWarning
from airflow.sdk import BaseHook

from airflow_oellm.config.platforms import Detection, detect_platform, probed_env_vars, probed_paths
from airflow_oellm.hooks.transport import AsyncLocalShell, AsyncSSHShell, LocalShell, ParamikoShell
from airflow_oellm.localjobs.cli import shell_functions
from airflow_oellm.slurm import operations
from airflow_oellm.slurm.commands import FileChunk, SlurmCommandError
from airflow_oellm.slurm.identity import JobIdentity
from airflow_oellm.slurm.offline_runs import OfflineRunSync
from airflow_oellm.slurm.operations import CycleRequest, CycleResult, Operation, SubmitOutcome
from airflow_oellm.slurm.states import JobStatus
from airflow_oellm.slurm.target import DEFAULT_SSH_CONN_ID, LOCAL_PROCESS, ClusterTarget

T = TypeVar("T")


class SlurmHook(BaseHook):
    """SLURM on a cluster's login node, over SSH or locally (synchronous, for workers).

    :param ssh_conn_id: Airflow SSH connection to the login node (the SSH case's shorthand).
    :param cluster: where jobs run, any `ClusterTarget` (instead of `ssh_conn_id`).
    :param min_submit_interval: seconds between two sbatch calls of this user on the cluster.

    What tasks use: `submit_once` (exactly once, reconciled), `poll_cycle` (job states and file reads,
    stats, probes and writes in one command), `read_ranges`/`read_range`, `write_files`, `upload`,
    `mkdirs`, `read_tracker`, `cancel`, `sync_offline_runs` (W&B). For scripts, tools and tests:
    `submit_unreconciled` (plain sbatch), `job_statuses`/`job_status`, `find_jobs`, `exclude_nodes`, `detect_platform`.
    """

    conn_name_attr = "ssh_conn_id"
    default_conn_name = DEFAULT_SSH_CONN_ID
    conn_type = "ssh"
    hook_name = "SLURM over SSH"

    def __init__(
        self,
        ssh_conn_id: str | None = default_conn_name,
        *,
        cluster: ClusterTarget | None = None,
        min_submit_interval: float = 1.0,
    ) -> None:
        super().__init__()
        self.cluster = ClusterTarget.choose(ssh_conn_id, cluster)
        self.ssh_conn_id = self.cluster.ssh_conn_id
        self.min_submit_interval = min_submit_interval
        self._shell: LocalShell | ParamikoShell | None = None
        self.counts: Counter[str] = Counter()  # commands run, by kind (squeue, sacct, sbatch, ...)

    def get_conn(self) -> LocalShell | ParamikoShell:
        if self._shell is None:
            if self.cluster.local_commands:
                self._shell = LocalShell(local_prelude(self.cluster))
            else:
                from airflow.providers.ssh.hooks.ssh import SSHHook

                self._shell = ParamikoShell(SSHHook(ssh_conn_id=self.ssh_conn_id).get_conn())
        return self._shell

    def close(self) -> None:
        if self._shell is not None:
            self._shell.close()
            self._shell = None

    def run(self, op: Operation[T]) -> T:
        """Drive an operation; on a dropped connection reconnect once and retry the command."""

        def execute(command: operations.Command) -> operations.Result:
            self.counts[command.label] += 1
            try:
                return self.get_conn().run(command)
            except SlurmCommandError as exc:
                if not exc.transient or self.cluster.local_commands:
                    raise
                self.log.warning("SSH command failed (%s); reconnecting once", exc)
                self.close()
                return self.get_conn().run(command)

        return operations.run_sync(op, execute)

    def upload(self, path: str, content: bytes | str, mode: str = "0600") -> None:
        self.run(operations.upload(path, content, mode))

    def mkdirs(self, paths: Sequence[str]) -> None:
        self.run(operations.mkdirs(paths))

    def submit_unreconciled(self, script_path: str, options: Sequence[str] = ()) -> tuple[str, str | None]:
        """Plain `sbatch`, without the exactly-once reconciliation of `submit_once`: for tests and tools
        that submit a job by hand. A task must use `submit_once`."""
        return self.run(operations.submit(script_path, options))

    def submit_once(
        self,
        identity: JobIdentity,
        script_path: str,
        *,
        options: Sequence[str] = (),
        secrets: Mapping[str, str] | None = None,
        decided: Sequence[str] | None = None,
    ) -> SubmitOutcome:
        return self.run(
            operations.submit_once(
                identity,
                script_path,
                options=options,
                secrets=secrets,
                min_interval=self.min_submit_interval,
                decided=decided,
            )
        )

    def job_statuses(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        return self.run(operations.job_statuses(job_ids))

    def poll_cycle(self, job_ids: Sequence[str], request: CycleRequest, start_of: Sequence[str] = ()) -> CycleResult:
        return self.run(operations.poll_cycle(job_ids, request, start_of=start_of))

    def job_status(self, job_id: str) -> JobStatus:
        return self.job_statuses([job_id])[str(job_id)]

    def find_jobs(self, *, comment_prefix: str | None = None, names: Sequence[str] = ()) -> list[JobStatus]:
        return self.run(operations.find_jobs(comment_prefix=comment_prefix, names=names))

    def cancel(self, job_ids: Sequence[str], signal: str | None = None, *, batch_only: bool = False) -> None:
        self.run(operations.cancel(job_ids, signal, batch_only=batch_only))

    def read_range(self, path: str, offset: int = 0, limit: int = 65536) -> FileChunk:
        return self.run(operations.read_range(path, offset, limit))

    def read_ranges(self, requests: Sequence[tuple[str, int, int]]) -> list[FileChunk]:
        return self.run(operations.read_ranges(requests))

    def write_files(self, files: Sequence[tuple[str, bytes]]) -> list[bool]:
        return self.run(operations.write_files(files))

    def read_tracker(self, checkpoint_dir: str) -> int | str | None:
        return self.run(operations.read_tracker(checkpoint_dir))

    def kill(self, job_ids: Sequence[str]) -> None:
        self.run(operations.kill(job_ids))

    def rewind_checkpoints(self, checkpoint_dir: str, iteration: int, discard_dir: str) -> list[int]:
        return self.run(operations.rewind_checkpoints(checkpoint_dir, iteration, discard_dir))

    def delete_checkpoints(
        self, checkpoint_dir: str, deletions: Sequence[tuple[int, Sequence[str]]]
    ) -> tuple[list[int], list[int]]:
        return self.run(operations.delete_checkpoints(checkpoint_dir, deletions))

    def exclude_nodes(self, job_id: str, nodes: Sequence[str]) -> None:
        self.run(operations.exclude_nodes(job_id, nodes))

    def sync_offline_runs(
        self,
        offline_dir: str,
        run_id: str,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        secrets: Mapping[str, str] | None = None,
        workspace_key: str | None = None,
    ) -> OfflineRunSync:
        return self.run(
            operations.sync_offline_runs(
                offline_dir, run_id, command, env=env, secrets=secrets, workspace_key=workspace_key
            )
        )

    def detect_platform(self) -> Detection:
        return detect_platform(self.run(operations.probe_platform(probed_env_vars(), probed_paths())))


class AsyncSlurmHook:
    """The async twin for triggers: the same operations over one reusable asyncssh connection."""

    def __init__(
        self,
        ssh_conn_id: str | None = DEFAULT_SSH_CONN_ID,
        *,
        cluster: ClusterTarget | None = None,
        connect_timeout: float = 30.0,
    ) -> None:
        self.cluster = ClusterTarget.choose(ssh_conn_id, cluster)
        self.ssh_conn_id = self.cluster.ssh_conn_id
        self.connect_timeout = connect_timeout
        self._shell: AsyncLocalShell | AsyncSSHShell | None = None
        self.connects = 0
        self.counts: Counter[str] = Counter()  # commands run, by kind (squeue, sacct, sbatch, ...)

    async def get_conn(self) -> AsyncLocalShell | AsyncSSHShell:
        if self._shell is None:
            if self.cluster.local_commands:
                self._shell = AsyncLocalShell(local_prelude(self.cluster))
            else:
                import asyncio

                from airflow.providers.ssh.hooks.ssh import SSHHookAsync

                # asyncssh logs every channel at INFO: keep the triggerer log for what matters
                logging.getLogger("asyncssh").setLevel(logging.WARNING)
                try:
                    connection = await asyncio.wait_for(
                        SSHHookAsync(ssh_conn_id=self.ssh_conn_id).get_conn(), self.connect_timeout
                    )
                except Exception as exc:
                    raise SlurmCommandError(
                        f"cannot connect to {self.ssh_conn_id}: {exc}", transient=_connect_error_is_transient(exc)
                    ) from exc
                self._shell = AsyncSSHShell(connection)
            self.connects += 1
        return self._shell

    async def close(self) -> None:
        shell, self._shell = self._shell, None
        if shell is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail; it is gone anyway
                await shell.close()

    async def run(self, op: Operation[T]) -> T:
        async def execute(command: operations.Command) -> operations.Result:
            self.counts[command.label] += 1
            shell = await self.get_conn()
            try:
                return await shell.run(command)
            except SlurmCommandError as exc:
                if exc.transient:
                    await self.close()  # the next command reconnects
                raise

        return await operations.run_async(op, execute)

    @property
    def commands_run(self) -> int:
        return sum(self.counts.values())

    async def job_statuses(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        return await self.run(operations.job_statuses(job_ids))

    async def poll_cycle(
        self, job_ids: Sequence[str], request: CycleRequest, start_of: Sequence[str] = ()
    ) -> CycleResult:
        return await self.run(operations.poll_cycle(job_ids, request, start_of=start_of))

    async def read_ranges(self, requests: Sequence[tuple[str, int, int]]) -> list[FileChunk]:
        return await self.run(operations.read_ranges(requests))

    async def read_tracker(self, checkpoint_dir: str) -> int | str | None:
        return await self.run(operations.read_tracker(checkpoint_dir))

    async def cancel(self, job_ids: Sequence[str], signal: str | None = None, *, batch_only: bool = False) -> None:
        await self.run(operations.cancel(job_ids, signal, batch_only=batch_only))

    async def kill(self, job_ids: Sequence[str]) -> None:
        await self.run(operations.kill(job_ids))

    async def delete_checkpoints(
        self, checkpoint_dir: str, deletions: Sequence[tuple[int, Sequence[str]]]
    ) -> tuple[list[int], list[int]]:
        return await self.run(operations.delete_checkpoints(checkpoint_dir, deletions))

    async def submit_once(
        self,
        identity: JobIdentity,
        script_path: str,
        *,
        options: Sequence[str] = (),
        secrets: Mapping[str, str] | None = None,
        decided: Sequence[str] | None = None,
    ) -> SubmitOutcome:
        return await self.run(
            operations.submit_once(identity, script_path, options=options, secrets=secrets, decided=decided)
        )

    async def detect_platform(self) -> Detection:
        probe = await self.run(operations.probe_platform(probed_env_vars(), probed_paths()))
        return detect_platform(probe)


def task_cluster(ssh_conn_id: str | None, cluster: ClusterTarget | None, kwargs: dict[str, Any]) -> ClusterTarget:
    """An operator's or sensor's target from its arguments. The `local=` and `batch_system=` arguments of
    0.1 still work for one release, with a deprecation warning; they leave `kwargs` before BaseOperator
    sees them."""
    before = {name: kwargs.pop(name) for name in ("local", "batch_system") if name in kwargs}
    if not before:
        return ClusterTarget.choose(ssh_conn_id, cluster)
    if cluster is not None:
        raise ValueError(f"give cluster= alone, without {' or '.join(f'{k}=' for k in before)}")
    warnings.warn(
        f"{', '.join(f'{k}=' for k in before)} is deprecated: pass cluster=ClusterTarget(...) "
        "(airflow_oellm.slurm.target)",
        AirflowProviderDeprecationWarning,
        stacklevel=3,
    )
    return ClusterTarget.of_0_1(ssh_conn_id, before)


def local_prelude(cluster: ClusterTarget) -> str:
    """What local scripts start with: nothing for SLURM, the local-process batch system's commands otherwise.
    They run with this interpreter, so jobs and Airflow share one installation of the provider."""
    return shell_functions(sys.executable) if cluster.batch_system == LOCAL_PROCESS else ""


def _connect_error_is_transient(exc: BaseException) -> bool:
    """Refused or dropped connections come back; a wrong host key or credentials do not."""
    text = f"{type(exc).__name__}: {exc}".lower()
    permanent = ("host key", "permission denied", "auth", "not trusted", "no matching host key", "key exchange")
    return not any(word in text for word in permanent)
