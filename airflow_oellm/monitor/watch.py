"""Following one training job: log bytes in, lines and events out, hang and end detection.

Pure state machine shared by the deferrable trigger and the synchronous (poke) path. Its state
is a small JSON document that the watcher persists on the cluster next to the job's output, so a
restarted triggerer resumes at the same byte with the same event summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from airflow_oellm.megatron.logs import is_finite_number
from airflow_oellm.monitor.anomalies import AnomalyDetector, AnomalySettings, Divergence, is_nan_interval
from airflow_oellm.monitor.early_stop import STOP_REQUEST_LIMIT, StopRequest
from airflow_oellm.monitor.events import Event, EventMatcher, EventSpec, event_specs
from airflow_oellm.monitor.inactivity import Activity
from airflow_oellm.monitor.outage import DEFAULT_MAX_OUTAGE_SECONDS, Outage, outage_notice
from airflow_oellm.monitor.records import WatchSummary
from airflow_oellm.monitor.retention import RetentionSettings, deletions
from airflow_oellm.slurm.commands import FileChunk
from airflow_oellm.slurm.operations import CycleRequest, FileWrite, PollUpdate
from airflow_oellm.slurm.pending import queue_state
from airflow_oellm.slurm.states import JobState, JobStatus

READ_BYTES = 64 * 1024  # new log bytes read per poll while the job runs
DRAIN_BYTES = 4 * 1024 * 1024  # per poll once the job has ended
TAIL_BYTES = 16 * 1024  # the end of the log read for classification
# a log that grows faster than it is read is skipped ahead past this much unread text: its end
# (the job's fate) matters more than every line, and checkpoints are found in their directory
MAX_BACKLOG_BYTES = 16 * 1024 * 1024
MAX_FAULT_LINES = 20
MAX_FAULT_CHARS = 500
MAX_LISTED = 1000
MAX_VALIDATIONS = 200
MAX_ANOMALIES = 100  # anomaly events kept in the summary (the dashboard's rewind and spike marks)
MAX_CURVE = 1000  # (iteration, loss) points kept; every second one is dropped when full
PROGRESS_CURVE = 250  # (iteration, loss) points in a progress snapshot: a plot's worth
LOG_TAIL_LINES = 40  # the job's last log lines in a progress snapshot (the experiment page's), each cut at:
LOG_TAIL_WIDTH = 400
LOG_TAIL_EVERY = 30.0  # seconds: how often new log lines alone publish the progress snapshot again
# split names of validation lines as the summary keeps them
SPLITS = {"val": "validation", "valid": "validation"}
# the events a rewind acts on, and the anomaly each stands for
UNRECOVERED = {"loss_spike_unrecovered": "loss_spike", "loss_nan_unrecovered": "loss_nan"}
# events after which the watch state is saved at once (otherwise at most once a minute)
NOTEWORTHY = frozenset({"checkpoint_saved", "checkpoint_loaded", "fresh_start", "validation", "training_done"})


def empty_summary() -> WatchSummary:
    return {
        "counts": {},
        "last_iteration": None,
        "first_iteration": None,
        "train_iters": None,
        "last_loss": None,
        "last_lr": None,
        "tokens_per_second_per_gpu": None,
        "iteration_ms": None,
        "consumed_samples": None,
        "global_batch_size": None,
        "running_since": None,
        "checkpoints_saved": [],
        "resumed_from": None,
        "validation": [],
        "training_done": False,
        "iterations_run": 0,
        "faults": [],
        "loss_curve": [],
        "log_skipped_bytes": 0,
        "nan_intervals": 0,
        "anomalies": [],
        "parameters_by_rank": {},
        "parameters_billions": None,
    }


def summarize(summary: WatchSummary, event: Event) -> None:
    """Fold one event into the attempt's summary (bounded in size)."""
    counts = summary["counts"]
    counts[event.name] = counts.get(event.name, 0) + 1
    g = event.groups
    if event.name == "iteration":
        summary["iterations_run"] += 1
        summary["last_iteration"] = g.get("iteration")
        if summary["first_iteration"] is None:
            summary["first_iteration"] = g.get("iteration")
        for key, target in (
            ("train_iters", "train_iters"),
            ("loss", "last_loss"),
            ("lr", "last_lr"),
            ("tokens_per_second_per_gpu", "tokens_per_second_per_gpu"),
            ("elapsed_ms", "iteration_ms"),
            ("consumed_samples", "consumed_samples"),
            ("global_batch_size", "global_batch_size"),
        ):
            if is_finite_number(g.get(key)):
                summary[target] = g[key]
        summary["nan_intervals"] = summary.get("nan_intervals", 0) + 1 if is_nan_interval(g) else 0
        if is_finite_number(g.get("loss")) and "iteration" in g:
            curve = summary.setdefault("loss_curve", [])
            curve.append([g["iteration"], g["loss"]])
            if len(curve) > MAX_CURVE:  # keep the whole run's shape at half the resolution
                del curve[1:-1:2]
    elif event.name == "checkpoint_saved" and isinstance(g.get("iteration"), int):
        if len(summary["checkpoints_saved"]) < MAX_LISTED:
            summary["checkpoints_saved"].append(g["iteration"])
    elif event.name == "checkpoint_loaded":
        summary["resumed_from"] = g.get("iteration")
    elif event.name == "fresh_start":
        summary["resumed_from"] = 0
    elif event.name == "validation" and len(summary["validation"]) < MAX_VALIDATIONS:
        # Megatron-LM 2.x names the end of training, not its iteration (`... for val data`)
        split = SPLITS.get(g.get("split") or g.get("end_split"), g.get("split") or g.get("end_split") or "validation")
        summary["validation"].append(
            {
                "iteration": g.get("iteration", summary["last_iteration"]),
                "loss": g.get("loss"),
                "ppl": g.get("ppl"),
                "split": split if g.get("set") is None else f"{split}-{g['set']}",
            }
        )
    elif event.name == "training_done":
        summary["training_done"] = True
    elif event.name == "parameters":
        if isinstance(g.get("count"), int) and len(summary.setdefault("parameters_by_rank", {})) < MAX_LISTED:
            summary["parameters_by_rank"][f"({g.get('axes')}) ({g.get('rank')})"] = g["count"]
        elif is_finite_number(g.get("billions")):
            summary["parameters_billions"] = g["billions"]
    elif event.metadata.get("kind") == "anomaly":
        anomalies = summary.setdefault("anomalies", [])
        if len(anomalies) < MAX_ANOMALIES:
            anomalies.append({"name": event.name, **g})
    if event.metadata.get("kind") == "fault" and len(summary["faults"]) < MAX_FAULT_LINES:
        summary["faults"].append(event.line[:MAX_FAULT_CHARS])


def thinned(points: Sequence[Any], limit: int) -> list[Any]:
    """At most `limit` of `points`, evenly spread, the first and the last always kept."""
    if len(points) <= limit:
        return list(points)
    step = (len(points) - 1) / (limit - 1)
    return [points[round(i * step)] for i in range(limit)]


def merged_curve(curves: Iterable[Sequence[Sequence[float]] | None]) -> list[tuple[float, float]]:
    """Loss points of successive attempts: a later attempt's value wins where a resume re-ran iterations."""
    points: dict[float, float] = {}
    for curve in curves:
        for point in curve or []:
            if len(point) >= 2 and point[1] is not None:
                points[point[0]] = point[1]
    return sorted(points.items())


def validation_losses(sources: Iterable[Sequence[Mapping[str, Any]] | None]) -> dict[int, Any]:
    """Iteration -> validation loss over successive attempts' points (a later one wins). A point without
    a split is a validation point (the watch writes "validation" unless the log names another split)."""
    losses: dict[int, Any] = {}
    for points in sources:
        for point in points or []:
            if point.get("split", "validation") == "validation" and isinstance(point.get("iteration"), int):
                losses[point["iteration"]] = point.get("loss")
    return losses


def loss_at(curve: Sequence[Sequence[float]], iteration: float) -> float | None:
    """Train loss at the last logged iteration not after `iteration`."""
    best = None
    for it, loss in curve:
        if it <= iteration:
            best = loss
    return best


@dataclass
class WatchState:
    job_id: str
    log_path: str
    matcher: dict[str, Any] = field(default_factory=dict)
    anomalies: dict[str, Any] = field(default_factory=dict)  # the anomaly detector's state
    activity: dict[str, Any] = field(default_factory=dict)
    summary: WatchSummary = field(default_factory=empty_summary)
    hang: bool = False
    diverged: bool = False  # the loss was NaN for `nan_limit` log intervals in a row: the job was stopped
    cancelled_by_us: bool = False
    final_status: dict[str, Any] | None = None
    divergence: dict[str, Any] | None = None  # the job was stopped to be rewound (Divergence.to_dict())
    stopped_early: dict[str, Any] | None = None  # the job was stopped by the sweep's early stopping (StopRequest)

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, job_id: str, log_path: str) -> WatchState | None:
        """The persisted state of this job, or None if unreadable or of another job."""
        try:
            loaded = json.loads(data.decode())
            state = cls(**loaded)
        except (ValueError, TypeError):
            return None
        return state if state.job_id == job_id and state.log_path == log_path else None


@dataclass(frozen=True)
class Step:
    lines: list[str]
    events: list[Event]
    hang_detected: bool = False  # just now: the caller cancels the job
    diverged: bool = False  # just now: the loss went NaN for good; the caller cancels the job
    rewinding: bool = False  # just now: the loss diverged and the run is to be rewound; the caller kills the job
    finished: bool = False  # the job ended and its log is read to the end
    truncated: bool = False  # the log shrank (requeue with --open-mode=truncate): read again from 0
    skipped: int = 0  # unread bytes jumped over just now (MAX_BACKLOG_BYTES)

    @property
    def noteworthy(self) -> bool:
        """Worth saving the watch state at once."""
        if self.hang_detected or self.diverged or self.rewinding or self.finished:
            return True
        return any(e.name in NOTEWORTHY or e.metadata.get("kind") == "anomaly" for e in self.events)

    @property
    def stop_reason(self) -> str | None:
        """Why the caller must cancel the job now, or None."""
        if self.hang_detected:
            return "no log growth and no iteration progress: hung"
        if self.rewinding:
            return "its loss diverged: stopping it without a save, to rewind"
        if self.diverged:
            return "its loss was NaN or infinite in the last log intervals: diverged"
        return None


class JobWatch:
    def __init__(
        self,
        specs: Sequence[EventSpec],
        state: WatchState,
        *,
        inactivity_threshold: float | None,
        now: float,
        nan_limit: int = 0,
        anomalies: AnomalySettings | None = None,
        rewind: bool = False,
    ):
        self.state = state
        self.matcher = EventMatcher.from_state(specs, state.matcher)
        self.detector = AnomalyDetector(anomalies, state.anomalies)
        self.rewind = rewind  # an unrecovered loss spike, or a NaN loss that lasts, stops the job to be rewound
        self.activity = Activity.from_dict(state.activity, now)
        self.threshold = inactivity_threshold
        self.nan_limit = nan_limit  # NaN log intervals in a row that stop the job (0: never)
        self._draining = False
        # the last lines read, for the dashboard's experiment page (not saved: a restarted watch starts it anew)
        self.log_tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.lines_read = 0

    @property
    def offset(self) -> int:
        return self.matcher.offset

    def read_request(self) -> tuple[str, int, int]:
        return (self.state.log_path, self.matcher.offset, DRAIN_BYTES if self._draining else READ_BYTES)

    def apply(
        self,
        now: float,
        status: JobStatus | None,
        chunk: FileChunk | None,
        mtimes: Mapping[str, float | None] | None = None,
    ) -> Step:
        lines: list[str] = []
        events: list[Event] = []
        truncated = False
        if chunk is not None and chunk.size is not None:
            if chunk.size < self.matcher.offset and chunk.offset == self.matcher.offset:
                truncated = True
                self.matcher = EventMatcher(self.matcher.specs)
            elif chunk.offset == self.matcher.offset and chunk.data:
                lines, events = self.matcher.feed(chunk.data)
                events = self.detector.process(events)
        for event in events:
            summarize(self.state.summary, event)
        ended = status is not None and status.is_terminal
        skipped = 0
        if chunk is not None and chunk.size is not None and chunk.size - self.matcher.offset > MAX_BACKLOG_BYTES:
            skipped = self.matcher.skip_to(chunk.size - (DRAIN_BYTES if ended else READ_BYTES))
            summary = self.state.summary
            summary["log_skipped_bytes"] = summary.get("log_skipped_bytes", 0) + skipped
        running = status is not None and status.state.value == "RUNNING"
        if running and not self.state.summary.get("running_since"):
            self.state.summary["running_since"] = now  # GPU time of a job still running (the dashboard)
        self.activity = self.activity.observe(
            now,
            running=running,
            log_size=chunk.size if chunk is not None and chunk.size is not None else None,
            iteration=self.state.summary.get("last_iteration"),
            mtimes={p: m for p, m in (mtimes or {}).items() if m is not None},
        )
        hang = False
        if running and self.threshold and not self.state.hang and self.activity.is_hung(now, self.threshold):
            self.state.hang = hang = True
        diverged = False
        nan_intervals = self.state.summary.get("nan_intervals", 0)
        if running and self.nan_limit and not self.state.diverged and nan_intervals >= self.nan_limit:
            # every further interval burns GPU-hours on a run that will not recover by itself
            self.state.diverged = diverged = True
        rewinding = False
        if running and self.rewind and self.state.divergence is None:
            found = self._divergence(events)
            if found is not None:
                self.state.divergence, rewinding = found.to_dict(), True
        finished = False
        if ended:
            self.state.final_status = status.to_dict()
            size = chunk.size if chunk is not None else None
            if size is None or self.matcher.offset >= size:
                tail_lines, tail_events = self.matcher.feed(b"", final=True)
                lines += tail_lines
                for event in self.detector.process(tail_events):
                    summarize(self.state.summary, event)
                    events.append(event)
                finished = True
            else:
                self._draining = True
        self.state.matcher = self.matcher.state()
        self.state.anomalies = self.detector.state()
        self.state.activity = self.activity.to_dict()
        self.log_tail.extend(line[:LOG_TAIL_WIDTH] for line in lines[-LOG_TAIL_LINES:])
        self.lines_read += len(lines)
        return Step(lines, events, hang, diverged, rewinding, finished, truncated, skipped)

    @staticmethod
    def _divergence(events: Sequence[Event]) -> Divergence | None:
        """What to rewind for: an unrecovered loss spike, or a NaN loss that lasted `monitoring.nan_intervals`."""
        for event in events:
            if event.name in UNRECOVERED:
                return Divergence.of(UNRECOVERED[event.name], event.groups, event.groups["detected_at"])
        return None

    def progress(self, status: JobStatus | None, now: float) -> dict[str, Any]:
        """What a running job looks like now (JSON-safe, bounded): the dashboard's live view."""
        summary = dict(self.state.summary)
        summary["loss_curve"] = thinned(summary.get("loss_curve", []), PROGRESS_CURVE)
        progress = {
            "job_id": self.state.job_id,
            "job_state": status.state.value if status is not None else None,
            "updated": now,
            "summary": summary,
            "log_tail": list(self.log_tail),
        }
        if status is not None and status.state is JobState.PENDING:
            progress["queue"] = queue_state(status.reason, status.expected_start).to_dict()
        return progress

    def progress_mark(self, status: JobStatus | None) -> tuple[Any, ...]:
        """Changes when a progress snapshot would show something new."""
        summary = self.state.summary
        pending = status is not None and status.state is JobState.PENDING
        return (
            status.state.value if status is not None else None,
            (status.reason, status.expected_start) if pending else None,
            summary.get("last_iteration"),
            sum(summary.get("counts", {}).values()),
            self.state.hang,
        )

    def tail_request(self) -> tuple[str, int, int]:
        """The end of the log, for classification (read once the job has ended)."""
        return (self.state.log_path, max(0, self.matcher.offset - TAIL_BYTES), TAIL_BYTES)

    def result(self, tail: bytes = b"") -> dict[str, Any]:
        """What the operator needs once the job has ended (JSON-safe); `tail` = the log's last bytes."""
        return {
            "job_id": self.state.job_id,
            "log_path": self.state.log_path,
            "status": self.state.final_status,
            "hang": self.state.hang,
            "diverged": self.state.diverged,
            "divergence": self.state.divergence,
            "stopped_early": self.state.stopped_early,
            "cancelled_by_us": self.state.cancelled_by_us,
            "summary": self.state.summary,
            "tail": tail.decode("utf-8", errors="replace"),
            "log_bytes": self.matcher.offset,
        }


SAVE_EVERY = 60.0  # seconds between saves of the watch state without noteworthy events
STATE_READ_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class FollowStep:
    """What the caller does after one poll cycle, in this order."""

    notices: list[tuple[int, str]] = field(default_factory=list)  # (logging level, message) for the task log
    lines: list[str] = field(default_factory=list)  # new log lines, to stream after the notices
    later: list[tuple[int, str]] = field(default_factory=list)  # notices about those lines (events, a stop)
    cancel: bool = False  # cancel the job now (hung or diverged)
    kill: bool = False  # cancel it with SIGKILL alone: no exit handler may save the diverged state
    finished: bool = False  # read the tail and save with `final_request`, then fire `result`
    error: str | None = None  # the cluster stayed unreachable for good: give up following
    publish: dict[str, Any] | None = None  # a new progress snapshot for the task's `progress` XCom
    # an outage seen before the saved state could be read (a trigger that moved or restarted during it): set
    # as `outage` in the progress the last follower published, which no snapshot may replace yet
    publish_outage: dict[str, Any] | None = None
    notify: dict[str, Any] | None = None  # tell `platform.on_outage.callback` (monitor/outage.py, `outage_notice`)
    poll_again: bool = False  # nothing was judged yet (the saved state was just read): no need to wait
    # retention: delete these checkpoints (iteration, status files of its branches: each must say completed)
    delete: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)


class JobFollower:
    """Follows one job across poll cycles, without I/O: the trigger (through the shared poller) and
    the operator's own polling loop (deferrable=False) feed it each cycle's update and do what it says.

    The first cycle reads the state an earlier follower of the same try saved, so a restarted
    triggerer continues at the same byte. The state is saved with a later cycle: at once after a checkpoint, a
    validation or a hang, else once a minute. Failed polls are an outage of `cluster` (monitor/outage.py):
    each is logged with since when and why, the progress snapshot carries it, and the following goes on
    until the outage has lasted `max_outage` seconds (None: for ever), whatever its kind.

    Two followers of one job can run at once: Airflow moves a trigger off a triggerer that missed its
    heartbeats, and the stalled one may wake and poll once more before it learns so. Each save replaces
    only the state this follower last read or saved (`FileWrite.replaces`); refused, the follower reads the
    newer state and carries on from it. A cancel or kill is done only once the state saying the watch did
    it is saved, so the try that judges the job knows who stopped it, and a superseded follower never acts.
    """

    def __init__(
        self,
        job_id: str,
        log_path: str,
        state_path: str,
        specs: Sequence[EventSpec],
        *,
        inactivity_threshold: float | None,
        nan_limit: int,
        anomalies: AnomalySettings | None = None,
        rewind: bool = False,
        output_paths: Sequence[str] = (),
        cluster_name: str = "the cluster",
        max_outage: float | None = DEFAULT_MAX_OUTAGE_SECONDS,
        notify_outage_after: float | None = None,
        status_path: str | None = None,
        status: str | None = None,
        loss_baseline: Sequence[float] = (),
        retention: RetentionSettings | None = None,
        checkpoint_dir: str | None = None,
        branches: Mapping[int, Sequence[str]] | None = None,
        stop_request_path: str | None = None,
        run_id: str | None = None,
    ) -> None:
        self.job_id, self.log_path, self.state_path = job_id, log_path, state_path
        # an experiment's training: where its sweep's early stopping asks the DAG run `run_id`'s to stop (read
        # with each cycle)
        self.stop_request_path, self.run_id = stop_request_path, run_id
        # with rewinds on: the training's status file (its RUNNING content as submitted), where the follower says
        # from which iteration on a checkpoint may yet be rewound away (TrainingStatus.suspect_from)
        self.status_path, self.status = status_path, status
        self._suspect: int | None = None  # what the status file says now
        self.loss_baseline = list(loss_baseline)  # the training's losses before this job resumed it
        self._pending_status: bytes | None = None
        self.cluster_name, self.max_outage, self.notify_outage_after = cluster_name, max_outage, notify_outage_after
        self.outage: Outage | None = None
        self._outage_notified = False
        self._first_update: float | None = None  # when this follower first heard from its poller
        self._status: JobStatus | None = None  # the last one polled, for snapshots taken during an outage
        self.specs = list(specs)
        self.inactivity_threshold = inactivity_threshold
        self.nan_limit = nan_limit
        self.anomalies = anomalies
        self.rewind = rewind
        self.output_paths = list(output_paths)
        self.watch: JobWatch | None = None
        self._pending_write: bytes | None = None
        self._saved_at = 0.0
        self._saved_hash = (
            ""  # sha256 of the state file as this follower last read (`_restore`, before any save) or saved it
        )
        self._pending_kill: bool | None = None  # a stop decided, done once its state is saved: kill or cancel
        # retention (monitor/retention.py): after a save, the next cycle probes the checkpoint directory
        self.retention = retention if checkpoint_dir else None
        self.checkpoint_dir = checkpoint_dir
        self.branches = {int(k): tuple(v) for k, v in (branches or {}).items()}
        self._probe_due = False
        self._published: tuple[Any, ...] | None = None
        self._told_pending: str | None = None  # the reason the task log was last told the job will not start for
        self._tail_published, self._tail_published_at = 0, float("-inf")  # log lines read at the last snapshot

    @classmethod
    def from_args(cls, args: Mapping[str, Any], cluster_name: str) -> JobFollower:
        """The follower of the watch arguments the submit operator hands to its trigger (or its own loop)."""
        return cls(
            str(args["job_id"]),
            args["log_path"],
            args["state_path"],
            event_specs(args.get("events") or []),
            inactivity_threshold=args.get("inactivity_threshold"),
            nan_limit=args.get("nan_limit", 0),
            anomalies=AnomalySettings.from_dict(args.get("anomalies")),
            rewind=bool(args.get("rewind")),
            status_path=args.get("status_path"),
            status=args.get("status"),
            loss_baseline=args.get("loss_baseline") or (),
            retention=RetentionSettings.from_dict(args.get("retention")),
            checkpoint_dir=args.get("checkpoint_dir"),
            branches={int(k): v for k, v in (args.get("branches") or {}).items()},
            output_paths=args.get("output_paths") or (),
            stop_request_path=args.get("stop_request_path"),
            run_id=(args.get("progress_to") or {}).get("run_id"),
            cluster_name=cluster_name,
            max_outage=args.get("max_outage", DEFAULT_MAX_OUTAGE_SECONDS),
            notify_outage_after=args.get("notify_outage_after"),
        )

    def request(self) -> CycleRequest:
        if self.watch is None:  # first: what an earlier follower knew
            return CycleRequest(reads=[(self.state_path, 0, STATE_READ_LIMIT)])
        writes = []
        if self._pending_write is not None:
            writes.append(FileWrite(self.state_path, self._pending_write, self._saved_hash))
        if self._pending_status is not None and self.status_path:
            writes.append((self.status_path, self._pending_status))
        probes = [self.checkpoint_dir] if self._probe_due and self.checkpoint_dir else []
        reads = [self.watch.read_request()]
        if self.stop_request_path:
            reads.append((self.stop_request_path, 0, STOP_REQUEST_LIMIT))
        return CycleRequest(reads=reads, stats=self.output_paths, checkpoints=probes, writes=writes)

    def on_update(self, update: PollUpdate, now: float) -> FollowStep:
        if self._first_update is None:
            self._first_update = now
        if update.error:
            return self._failed_poll(update.error, update.failing_since, update.consecutive_failures, now)
        notices, notify = [], None
        if self.outage is not None:
            notices.append((logging.INFO, f"job {self.job_id}: {self.outage.ended(now)}; carrying on"))
            if self._outage_notified:
                notify = outage_notice("ended", self.outage, now)
            self.outage, self._published, self._outage_notified = None, None, False  # the next snapshot says so
        if self.watch is None:
            step = self._restore(update.chunks[0].data if update.chunks else b"", now)
            return replace(step, notices=notices + step.notices, notify=notify)
        if update.superseded:
            return self._superseded(notices, notify)
        watch = self.watch
        self._status = update.status
        if update.writes_ok and all(update.writes_ok):
            if self._pending_write is not None:
                self._saved_hash = hashlib.sha256(self._pending_write).hexdigest()
                self._pending_write, self._saved_at = None, now
            self._pending_status = None
        stop_now, kill_now = False, False
        if self._pending_kill is not None and self._pending_write is None:  # the state saying so has landed
            stop_now, kill_now, self._pending_kill = True, self._pending_kill, None
        delete = self._retained(update)
        step = watch.apply(now, update.status, update.chunks[0] if update.chunks else None, update.mtimes)
        if step.truncated:
            notices.append(
                (logging.INFO, f"[job {self.job_id}] log restarted from the beginning (truncated by a requeue)")
            )
        if step.skipped:
            notices.append(
                (
                    logging.WARNING,
                    f"[job {self.job_id}] the log grows faster than it is read: skipped {step.skipped} bytes",
                )
            )
        later = [
            (logging.INFO, f"event {e.name} at line {e.line_no}: {e.groups}")
            for e in step.events
            if e.name != "iteration"
        ]
        if step.rewinding and watch.state.divergence is not None:
            d = Divergence.from_dict(watch.state.divergence)
            target = f"checkpoint {d.rewind_to}" if d.rewind_to else "the start"
            message = f"job {self.job_id}: {d.describe()} did not recover: killing it, without a save, to rewind"
            later.append((logging.WARNING, f"{message} to {target}"))
        elif step.stop_reason:
            later.append((logging.WARNING, f"job {self.job_id}: {step.stop_reason}: cancelling it"))
        later += self._pending_notice(update.status)
        if step.stop_reason:
            watch.state.cancelled_by_us, self._pending_kill = True, step.rewinding
        elif not step.finished and watch.state.stopped_early is None:
            request = StopRequest.from_json(update.chunks[1].data if len(update.chunks) > 1 else None)
            if request is not None and request.standing_for(self.run_id):
                later.append((logging.WARNING, f"job {self.job_id}: {request.reason}: cancelling it"))
                watch.state.stopped_early = asdict(request)
                watch.state.cancelled_by_us, self._pending_kill = True, False
        stopping = not step.finished and stop_now  # a job that ended meanwhile needs no stop
        followed = FollowStep(
            notices, step.lines, later, cancel=stopping, kill=stopping and kill_now, notify=notify, delete=delete
        )
        if self.retention is not None and any(e.name == "checkpoint_saved" for e in step.events):
            self._probe_due = True  # a save is complete: retention looks at the directory with the next cycle
        if step.finished:
            return replace(followed, finished=True)
        publish = None
        mark = watch.progress_mark(update.status)
        # new log lines alone publish the snapshot at most every LOG_TAIL_EVERY seconds: an XCom write per poll
        # per running job would load the database (tests poll every 2 s)
        tail_due = watch.lines_read != self._tail_published and now - self._tail_published_at >= LOG_TAIL_EVERY
        if mark != self._published or tail_due:
            publish, self._published = self.snapshot(now), mark
            self._tail_published, self._tail_published_at = watch.lines_read, now
        stopping_early = self._pending_kill is False and watch.state.stopped_early is not None
        if step.noteworthy or stopping_early or now - self._saved_at >= SAVE_EVERY:
            self._pending_write = watch.state.to_json()  # saved with the next cycle
        self._mark_suspect(watch.detector.suspect_from(), now)
        return replace(followed, publish=publish, poll_again=bool(step.stop_reason) or stopping_early)

    def _pending_notice(self, status: JobStatus | None) -> list[tuple[int, str]]:
        """A warning, once per reason, that the job waits for something that will not clear by itself."""
        if status is None or status.state is not JobState.PENDING:
            return []
        queue = queue_state(status.reason)
        if queue.clears or queue.reason == self._told_pending:
            return []
        self._told_pending = queue.reason
        return [(logging.WARNING, f"job {self.job_id}: {queue.describe()}")]

    def _retained(self, update: PollUpdate) -> list[tuple[int, tuple[str, ...]]]:
        """The checkpoints retention deletes, from this cycle's probe of the directory (none without one)."""
        if not (self._probe_due and update.checkpoints and self.retention is not None and self.watch is not None):
            return []
        self._probe_due = False
        (probe,) = update.checkpoints
        needs = self.watch.detector.rewind_needs() if self.rewind else []
        gone = deletions(
            probe.complete, self.retention, tracker=probe.latest, rewind_needs=needs, branches=self.branches
        )
        return [(d.iteration, d.branches) for d in gone]

    def _superseded(self, notices: list[tuple[int, str]], notify: dict[str, Any] | None) -> FollowStep:
        """Another follower of this job saved its state since this one read or saved it: read it again and carry
        on from there, dropping what this one had not saved (a stop it decided included)."""
        self.watch, self._pending_write, self._pending_status, self._pending_kill = None, None, None, None
        self._published = None
        notices.append(
            (
                logging.WARNING,
                f"job {self.job_id}: another watch of it saved its state since this one did (a trigger moved "
                "off a stalled triggerer): carrying on from that state",
            )
        )
        return FollowStep(notices, notify=notify, poll_again=True)

    def _mark_suspect(self, suspect: int | None, now: float) -> None:
        """Tell the branches beside the training, through its status file, when its loss goes wrong and when
        it is right again (written with the next cycle)."""
        if not (self.rewind and self.status_path and self.status) or suspect == self._suspect:
            return
        status = json.loads(self.status)
        status.pop("suspect_from", None)
        if suspect is not None:
            status["suspect_from"] = suspect
        self._suspect, self._pending_status = suspect, json.dumps({**status, "updated": now}).encode()

    def _failed_poll(
        self, error: str, failing_since: float | None, consecutive_failures: int, now: float
    ) -> FollowStep:
        before = self.outage
        # since the poller's first failed cycle (the same moment for every job it follows), but not before this
        # follower began: a retry that joins an outage gets its own max_outage
        first = now if self._first_update is None else self._first_update
        began = min(max(now if failing_since is None else failing_since, first), now)
        since = before.since if before is not None else began
        failures = max(consecutive_failures, before.failures + 1 if before is not None else 1)
        self.outage = outage = Outage(self.cluster_name, since, error, failures)
        logged = (logging.WARNING, f"job {self.job_id}: {outage.message(now)}")
        notifying = self.notify_outage_after is not None
        if self.max_outage is not None and now - since > self.max_outage:
            message = f"{outage.message(now)}; gave up after platform.max_outage ({self.max_outage:.0f} s)"
            return FollowStep(
                [logged], error=message, notify=outage_notice("gave_up", outage, now) if notifying else None
            )
        publish = publish_outage = notify = None
        if before is None or before.kind != outage.kind:  # the dashboard learns when it starts or changes
            if self.watch is not None:
                publish = self.snapshot(now)
            else:  # no snapshot yet: an empty one would hide the progress the last follower published
                publish_outage = outage.to_dict(now)
        if notifying and not self._outage_notified and now - since >= self.notify_outage_after:
            self._outage_notified, notify = True, outage_notice("started", outage, now)
        return FollowStep([logged], publish=publish, notify=notify, publish_outage=publish_outage)

    def snapshot(self, now: float) -> dict[str, Any]:
        """The progress snapshot: the watch's view of the job, and the outage if polls fail now."""
        if self.watch is None:
            raise RuntimeError("snapshot before the first update")
        progress = self.watch.progress(self._status, now)
        if self.outage is not None:
            progress["outage"] = self.outage.to_dict(now)
        return progress

    def final_request(self) -> CycleRequest:
        """Save the final state (a late restart then cannot replay the ending) and read the log's end."""
        if self.watch is None:
            raise RuntimeError("final_request before the first update")
        save = FileWrite(self.state_path, self.watch.state.to_json(), self._saved_hash)
        return CycleRequest(reads=[self.watch.tail_request()], writes=[save])

    def result(self, tail: bytes) -> dict[str, Any]:
        """The finished event: the watch's result (see JobWatch.result)."""
        if self.watch is None:
            raise RuntimeError("result before the first update")
        return {"kind": "finished", **self.watch.result(tail)}

    def _restore(self, saved: bytes, now: float) -> FollowStep:
        self._saved_hash = hashlib.sha256(saved).hexdigest()
        state = WatchState.from_json(saved, self.job_id, self.log_path) if saved else None
        notices = []
        if state is not None:
            offset = state.matcher.get("offset", 0)
            notices.append(
                (logging.INFO, f"resuming the watch of job {self.job_id} at byte {offset} of {self.log_path}")
            )
        if state is None:  # a new job: its loss is judged against the training's from the first interval on
            seeded = AnomalyDetector.seeded(self.anomalies, self.loss_baseline).state()
            state = WatchState(self.job_id, self.log_path, anomalies=seeded)
        self.watch = JobWatch(
            self.specs,
            state,
            inactivity_threshold=self.inactivity_threshold,
            now=now,
            nan_limit=self.nan_limit,
            anomalies=self.anomalies,
            rewind=self.rewind,
        )
        return FollowStep(notices, poll_again=True)
