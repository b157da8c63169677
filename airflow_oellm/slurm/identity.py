"""Job identity for exactly-once submission.

A submission is identified by (dag_id, run_id, task_id, map_index, try_number) and the output
directory it writes. The job carries it in `--comment` as `oellm/<workspace>/<task>/<try>`:
`workspace` hashes the output directory (two jobs on one directory are the thing to prevent),
`task` hashes (dag_id, run_id, task_id, map_index). The cluster keeps one record file per
submission under `<output_dir>/.oellm/submissions/`, written by the same remote command that ran
sbatch, so a submitter that dies right after sbatch is reconciled on its retry.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

COMMENT_PREFIX = "oellm"
STATE_DIR = ".oellm"
_COMMENT = re.compile(r"^oellm/([0-9a-f]{16})/([0-9a-f]{16})/(\d+)$")


def _digest(*parts: object) -> str:
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()[:16]


def workspace_key(output_dir: str) -> str:
    """The workspace part of a job's comment: which output directory it writes."""
    return _digest(output_dir.rstrip("/"))


def task_key(dag_id: str, run_id: str, task_id: str, map_index: int) -> str:
    """The task part of a job's comment: which task instance submitted it, across its tries."""
    return _digest(dag_id, run_id, task_id, map_index)


@dataclass(frozen=True)
class JobIdentity:
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    try_number: int
    output_dir: str

    @property
    def workspace_key(self) -> str:
        return workspace_key(self.output_dir)

    @property
    def task_key(self) -> str:
        return task_key(self.dag_id, self.run_id, self.task_id, self.map_index)

    @property
    def comment(self) -> str:
        return f"{COMMENT_PREFIX}/{self.workspace_key}/{self.task_key}/{self.try_number}"

    @property
    def state_dir(self) -> str:
        return f"{self.output_dir.rstrip('/')}/{STATE_DIR}"

    @property
    def record_path(self) -> str:
        return f"{self.state_dir}/submissions/{self.task_key}-{self.try_number}"


@dataclass(frozen=True)
class CommentIdentity:
    workspace_key: str
    task_key: str
    try_number: int


def parse_comment(comment: str | None) -> CommentIdentity | None:
    m = _COMMENT.match((comment or "").strip())
    return CommentIdentity(m.group(1), m.group(2), int(m.group(3))) if m else None


def monitor_state_path(identity: JobIdentity) -> str:
    """Where the watcher of this attempt keeps its log offset and event summary."""
    return f"{identity.state_dir}/monitor/{identity.task_key}-{identity.try_number}.json"


def stop_request_path(output_dir: str) -> str:
    """Where the sweep's early stopping asks a training to stop (monitor/early_stop.StopRequest)."""
    return f"{output_dir.rstrip('/')}/{STATE_DIR}/early_stop.json"


def task_status_path(output_dir: str, task_id: str) -> str:
    """The training task's own status file, read by sensors that run beside it."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in task_id)
    return f"{output_dir.rstrip('/')}/{STATE_DIR}/status/{safe}.json"
