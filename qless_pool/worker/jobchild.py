"""The job child: forked ahead (the *standby*), given its job over a pipe, runs it, reports.

A worker parent keeps one standby child forked ahead, while it is idle or while the previous
job runs, so that a job starts with a pipe write rather than a fork::

    fork (ahead)  -> title "Ready for <queues> since <epoch>", rehearse, wait on the job pipe
    job arrives   -> title "Processing <queue> since <epoch>", run the job with qless-py
    job ends      -> one report line on the report pipe, exit

While it waits, the standby *rehearses* its part on a sample job that goes nowhere (decoding it,
making qless-py's Job of it, finding the last job's class in its module's namespace if that is
loaded, encoding a report): every page of the worker's memory that this touches is copied now,
while it waits, instead of between the job's arrival and its start (about a third of a
millisecond here). Nothing of it leaves the process: no command, no import, no file.

When the next standby is forked: at once when the job just handed over was popped by a busy
worker (a stream: the next one is likely waiting too); when it was popped by an idle worker (one
listening for puts), STANDBY_DELAY later, or as soon as the job's child reports if that is
sooner, so that the fork does not take the CPU from the job's start.

The child dies with its worker parent (``lifeline.die_with_parent``), leads its own process
group, and runs with default signal dispositions, exactly as a child forked for the job would.

The job runs as running.py says; its report tells the worker parent how it went (settling.py
says what the parent then sends qless). The job's client connects only on the job's first
command: a job that never touches Redis opens no connection.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Optional

import qless

from .. import lifeline, proctitle
from ..logs import logger, set_role
from .outcome import JobRun, Report
from .reservation import HeldJob
from .running import JobClient, describe_job, run_job

__all__ = [
    "ChildSetup",
    "Children",
    "Ended",
    "JobChild",
    "fork_child",
    "send_job",
]

log = logger.getChild("worker")

#: A standby child that dies sooner than this after its fork is not replaced for a second.
STANDBY_RETRY_DELAY = 1.0
#: After a job popped by an idle worker starts, its next standby is forked this much later (or
#: when its child reports, if sooner): not while the job's start needs the CPU.
STANDBY_DELAY = 0.02


# --- the worker parent's view of a job child ----------------------------------------------------


@dataclass
class JobChild:
    """A forked job child, from fork to reap: waiting for its job (a standby) or running it."""

    pid: int
    report_fd: int  # the child's report pipe (read end)
    job_fd: int = -1  # the standby's job pipe (write end); -1 once the job is sent
    forked: float = field(default_factory=time.monotonic)
    job: Optional[dict[str, Any]] = None  # the job as qless popped it, once it has one
    started: float = 0.0  # epoch seconds the job was handed over, for titles
    heartbeat_every: float = 0.0
    next_heartbeat: float = 0.0  # monotonic
    deadline: Optional[float] = None  # monotonic; the job timeout
    kill_reason: Optional[str] = None
    timed_out: bool = False
    escalate_at: Optional[float] = None  # monotonic; SIGKILL if still alive then
    memory_check_at: float = 0.0  # monotonic; --max-memory (its job's first second is free)
    settled: Optional[str] = None  # how the job settled itself, as soon as it did
    completed: Optional[str] = None  # the data of a complete() the job made, not yet sent
    unread: bytes = b""  # of the report pipe: a line not yet whole
    report: Optional[Report] = None  # once the child has reported

    @property
    def jid(self) -> str:
        assert self.job is not None
        return str(self.job["jid"])

    def read_report(self) -> Optional[Report]:
        """Read what the child has written; its report once that line is whole, else None.

        Before the report, the child says at once when its job settles itself:
        ``{"settled": "fail"}`` (or retry, move, cancel), or ``{"completed": data}`` for a
        ``complete()``, which the worker sends even if the child dies before it reports."""
        while self.report is None:
            try:
                chunk = os.read(self.report_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            *lines, self.unread = (self.unread + chunk).split(b"\n")
            for line in lines:
                message = parse_report(line)
                if "completed" in message:
                    self.settled, self.completed = "complete", message["completed"]
                elif "settled" in message:
                    self.settled = message["settled"]
                else:
                    self.report = Report.from_json(message)
                    break
        return self.report

    def last_word(self) -> Report:
        """What a child that is gone said: its report; or, if it died after its job called
        ``complete()``, that complete, for the worker to send; or nothing."""
        report = self.read_report()
        if report is None and self.completed is not None:
            report = Report(outcome="returned", data=self.completed, cut_short=True)
        return report or Report()

    def close(self) -> None:
        for fd in (self.report_fd, self.job_fd):
            if fd >= 0:
                os.close(fd)
        self.report_fd = self.job_fd = -1


def parse_report(data: bytes) -> dict[str, Any]:
    try:
        report = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


@dataclass(frozen=True)
class ChildSetup:
    """What a job child needs from its worker parent, to become a job child."""

    parent_pid: int
    queues: Sequence[str]
    client: JobClient
    appname: Optional[str]
    close_fds: Sequence[int]  # the parent's own (its signal wakeup pipe)
    parent_signals: Sequence[int]  # handled by the parent; the child restores their defaults
    allow_modules: Sequence[str] = ()  # --allow-module: where the job's class must come from


def fork_child(
    setup: ChildSetup, job: Optional[dict[str, Any]] = None, last_class: Optional[str] = None
) -> JobChild:
    """Fork a job child: for ``job`` at once, or (None) a standby that waits for one (and
    rehearses meanwhile, with ``last_class``: the class of the worker's last job)."""
    report_r, report_w = os.pipe()
    job_r, job_w = os.pipe() if job is None else (-1, -1)
    # Blocked across the fork: until the child has dropped the worker's handlers, a signal for
    # it would land in the worker's wakeup pipe and look like the worker's own.
    signal.pthread_sigmask(signal.SIG_BLOCK, setup.parent_signals)
    try:
        pid = os.fork()  # may fail (EAGAIN: a pids limit; ENOMEM): the caller retries later
    except OSError:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, setup.parent_signals)
        for fd in (report_r, report_w, job_r, job_w):
            if fd >= 0:
                os.close(fd)
        raise
    if pid == 0:
        lifeline.die_with_parent(setup.parent_pid)
        for fd in (report_r, job_w):
            if fd >= 0:
                os.close(fd)
        _become_child(setup, job, job_r, report_w, last_class)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, setup.parent_signals)
    os.close(report_w)
    if job_r >= 0:
        os.close(job_r)
    os.set_blocking(report_r, False)
    try:
        os.setpgid(pid, pid)  # also done by the child; whichever runs first wins
    except OSError:
        pass
    return JobChild(pid=pid, report_fd=report_r, job_fd=job_w)


def send_job(child: JobChild, job: dict[str, Any]) -> None:
    """Hand a standby its job (a job over a pipe's buffer waits for the standby to read: for a
    moment, if it is still rehearsing)."""
    data = (json.dumps(job) + "\n").encode()
    view = memoryview(data)
    while view:
        view = view[os.write(child.job_fd, view) :]
    os.close(child.job_fd)
    child.job_fd = -1


def _become_child(
    setup: ChildSetup,
    job: Optional[dict[str, Any]],
    job_fd: int,
    report_fd: int,
    last_class: Optional[str] = None,
) -> NoReturn:
    """The job child's life after the fork: wait for its job if it has none, run it, report,
    exit. Never returns."""
    status = 70  # EX_SOFTWARE: something failed before the job could be reported
    try:
        signal.set_wakeup_fd(-1)
        for fd in setup.close_fds:
            os.close(fd)
        for signum in setup.parent_signals:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, setup.parent_signals)
        os.setpgid(0, 0)  # its own group, so a kill reaches whatever the job started
        set_role("job", setup.appname)
        if job is None:
            proctitle.set_title(proctitle.ready(setup.queues, time.time()))
            rehearse(setup, last_class)
            job = _wait_for_job(job_fd)
            if job is None:  # the worker closed the pipe: not needed any more
                status = 0
                return  # type: ignore[misc] # the finally clause exits
        proctitle.set_title(proctitle.processing(job["queue"], time.time()))
        setup.client.on_settled = lambda message: _write_line(report_fd, message)
        report = run_job(setup.client, job, setup.allow_modules)
        _write_line(report_fd, report.to_json())
        status = 0
    except BrokenPipeError:
        pass  # the worker parent is gone (and this child about to be): nothing to tell
    except BaseException:
        log.exception("job %s crashed its child process", (job or {}).get("jid"))
    finally:
        lifeline.exit_child(status)


#: What a popped job looks like to qless-py's Job (the fields it reads), for the rehearsal.
_SAMPLE_JOB = {
    "jid": "0" * 32, "klass": "", "queue": "", "data": "{}", "priority": 0, "tags": [],
    "state": "running", "tracked": False, "failure": {}, "history": [], "dependents": [],
    "dependencies": [], "expires": 0, "retries": 5, "remaining": 5, "worker": "",
}  # fmt: skip


def rehearse(setup: ChildSetup, last_class: Optional[str]) -> None:
    """A standby's rehearsal (see the module's docstring); it never fails the standby."""
    try:
        rehearsal(setup, last_class)
    except Exception:
        pass


def rehearsal(setup: ChildSetup, last_class: Optional[str]) -> None:
    """What a job's start touches, done on a sample job that goes nowhere (raises what fails)."""
    try:
        fields = json.loads(json.dumps({**_SAMPLE_JOB, "queue": setup.queues[0]}))
        proctitle.processing(fields["queue"], time.time())
        setup.client.track_job(fields["jid"])
        qless.Job(setup.client, **fields)
        if last_class:
            # Namespaces only, no getattr: no module __getattr__, descriptor or import runs.
            module_name, _, name = last_class.rpartition(".")
            module = sys.modules.get(module_name)
            found = vars(module).get(name) if module is not None else None
            if isinstance(found, type):
                vars(found).get(fields["queue"]) or vars(found).get("process")
        json.dumps(Report(outcome="returned", data="{}", seconds=0.001).to_json())
    finally:
        setup.client.track_job(None)


def _wait_for_job(fd: int) -> Optional[dict[str, Any]]:
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            break
    os.close(fd)
    return json.loads(b"".join(chunks)) if chunks else None


def _write_line(fd: int, message: dict[str, Any]) -> None:
    """One line to the worker parent. A long one blocks until the parent has read the start
    (it reads while the child runs); the child dies with the parent, so it cannot block for
    ever."""
    view = memoryview((json.dumps(message) + "\n").encode())
    while view:
        view = view[os.write(fd, view) :]


# --- the worker parent's job children -----------------------------------------------------------


@dataclass
class Ended:
    """A job child's run that has ended: its report (empty if it sent none) and its wait status
    (None: it reported and is still exiting)."""

    child: JobChild
    report: Report
    status: Optional[int]

    def run(self) -> JobRun:
        """The run, for settling."""
        child = self.child
        assert child.job is not None
        return JobRun(
            child.job, self.report, self.status, child.kill_reason, child.timed_out,
            child.next_heartbeat,
        )  # fmt: skip


class Children:
    """A worker parent's job children: the one running a job, the standby forked ahead for the
    next, and the ones that reported and are exiting. At most one runs a job at a time."""

    def __init__(self, setup: ChildSetup, kill_grace: float):
        self.setup = setup
        self.kill_grace = kill_grace
        self.running: Optional[JobChild] = None
        self.standby: Optional[JobChild] = None
        self.finishing: list[JobChild] = []
        self.standby_retry_at = 0.0  # monotonic
        self.last_class: Optional[str] = None  # of the last job: the standbys rehearse with it
        self.standby_due = 0.0  # monotonic: while a job runs, its next standby is forked then

    def __bool__(self) -> bool:
        return bool(self.running or self.standby or self.finishing)

    def start(
        self, popped: HeldJob, job_timeout: Optional[float], streaming: bool = False
    ) -> JobChild:
        """Hand ``popped`` to the standby (or, if there is none, to a child forked for it).
        ``streaming``: a busy worker popped it (not one idle, listening for puts): its next
        standby is forked at once, not STANDBY_DELAY later."""
        job = popped.job
        self.standby_due = time.monotonic() + (0.0 if streaming else STANDBY_DELAY)
        self.last_class = job.get("klass") if isinstance(job.get("klass"), str) else None
        child, self.standby = self.standby, None
        if child is not None:
            try:
                send_job(child, job)
            except BrokenPipeError:  # the standby died a moment ago: reaped soon, as finished
                self.finishing.append(child)
                child = None
        if child is None:
            child = fork_child(self.setup, job)
        child.job, child.started = job, time.time()
        child.heartbeat_every = popped.every
        child.next_heartbeat = popped.next_heartbeat
        child.deadline = time.monotonic() + job_timeout if job_timeout else None
        child.memory_check_at = time.monotonic() + 1.0
        self.running = child
        return child

    def keep_standby(self, stopping: bool) -> None:
        """Fork the next job's child ahead: while idle, or while a job runs once its
        ``standby_due`` has come (see the module's docstring); stopping, let it go (it exits
        when its job pipe closes, and is reaped)."""
        standby = self.standby
        if stopping:
            if standby is not None and standby.job_fd >= 0:
                os.close(standby.job_fd)
                standby.job_fd = -1
        elif standby is None and self.running is not None and time.monotonic() < self.standby_due:
            return  # not yet: the job is starting (STANDBY_DELAY)
        elif standby is None and time.monotonic() >= self.standby_retry_at:
            try:
                self.standby = fork_child(self.setup, last_class=self.last_class)
            except OSError as error:
                log.warning("could not fork a standby job child (%s); trying again in %gs",
                            error, STANDBY_RETRY_DELAY)  # fmt: skip
                self.standby_retry_at = time.monotonic() + STANDBY_RETRY_DELAY

    def supervise(self, now: float, job_timeout: Optional[float]) -> list[Ended]:
        """Reap what has exited, read the running child's report, enforce the job timeout;
        returns the runs that ended."""
        ended: list[Ended] = []
        for child in [c for c in (self.running, self.standby, *self.finishing) if c is not None]:
            try:
                # Whatever a job left running in its process group dies with it.
                reaped = lifeline.reap(child.pid)
            except ChildProcessError:
                reaped = child.pid, -1
            if reaped is not None:
                ended += self._exited(child, reaped[1])
        for child in self.finishing:
            if child.escalate_at is not None and now >= child.escalate_at:
                log.warning("job child %d reported but has not exited; sending SIGKILL", child.pid)
                lifeline.kill_group(child.pid, signal.SIGKILL)
                child.escalate_at = None
        running = self.running
        if running is None:
            return ended
        child = running
        report = child.read_report()
        if report is not None:  # it has reported: the job is done, whenever it exits
            self.running = None
            self.finishing.append(child)
            if child.escalate_at is None:  # it exits at once, or is made to
                child.escalate_at = now + self.kill_grace
            return [*ended, Ended(child, report, None)]
        if child.deadline is not None and now >= child.deadline and child.kill_reason is None:
            child.timed_out = True
            self.kill(f"the job ran longer than its timeout ({job_timeout:g}s)")
        if child.escalate_at is not None and now >= child.escalate_at:
            log.warning(
                "job child %d ignored SIGTERM for %gs; sending SIGKILL", child.pid, self.kill_grace
            )
            lifeline.kill_group(child.pid, signal.SIGKILL)
            child.escalate_at = None
        return ended

    def _exited(self, child: JobChild, status: int) -> list[Ended]:
        ended = []
        if child is self.standby:
            self.standby = None
            if child.job_fd >= 0:  # not let go: it died
                log.warning(
                    "the standby job child %d died (%s)",
                    child.pid,
                    lifeline.describe_status(status),
                )
                if time.monotonic() - child.forked < STANDBY_RETRY_DELAY:
                    self.standby_retry_at = time.monotonic() + STANDBY_RETRY_DELAY
        elif child is self.running:
            self.running = None
            ended.append(Ended(child, child.last_word(), status))
        else:
            self.finishing.remove(child)
        child.close()
        return ended

    def kill(self, reason: str) -> None:
        """Stop the running job's child: SIGTERM to its group, SIGKILL after kill_grace."""
        child = self.running
        if child is None or child.kill_reason is not None:
            return
        assert child.job is not None
        log.warning("killing job child %d: %s (%s)", child.pid, reason, describe_job(child.job))
        child.kill_reason = reason
        lifeline.kill_group(child.pid, signal.SIGTERM)
        child.escalate_at = time.monotonic() + self.kill_grace

    def wake_times(self, now: float, stopping: bool, redis_up: bool) -> list[float]:
        """When the worker has something to do for its children, besides one exiting or
        reporting. Only times still ahead, or to be acted on at once: a time that stays in the
        past would make the worker's loop spin."""
        child = self.running
        times = []
        if child is not None:
            if redis_up:  # a heartbeat needs Redis; during an outage, the retry is the time
                times.append(child.next_heartbeat)
            if child.deadline is not None and child.kill_reason is None:
                times.append(child.deadline)
            if child.escalate_at is not None:
                times.append(child.escalate_at)
        times += [c.escalate_at for c in self.finishing if c.escalate_at is not None]
        if self.standby is None and not stopping and child is not None and self.standby_due > now:
            times.append(self.standby_due)
        if self.standby is None and not stopping and self.standby_retry_at > now:
            times.append(self.standby_retry_at)
        return times

    def shut_down(self) -> None:
        """The worker is exiting: a running child (only if the loop itself failed) is killed,
        the standby let go, and every child waited for."""
        if self.running is not None:
            lifeline.kill_group(self.running.pid, signal.SIGKILL)
        deadline = time.monotonic() + self.kill_grace
        for child in [c for c in (self.running, self.standby, *self.finishing) if c is not None]:
            child.close()  # the standby exits when its job pipe closes
            killed = False
            while True:
                try:
                    if lifeline.reap(child.pid) is not None:  # leftovers in its group die too
                        break
                except ChildProcessError:
                    break
                if not killed and time.monotonic() >= deadline:  # stuck on its way out
                    lifeline.kill_group(child.pid, signal.SIGKILL)
                    killed = True
                time.sleep(0.01)
        self.running = self.standby = None
        self.finishing = []
