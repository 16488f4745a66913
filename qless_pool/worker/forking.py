"""A child per job (the default run mode): each job runs in a child process of its own, forked
ahead of it (jobchild.py), which exits when the job is done.

While the child runs, the worker's loop keeps turning: it heartbeats the job, reads the child's
report, enforces the job timeout and --max-memory on the child, and kills it (SIGTERM to its
process group, SIGKILL after ``kill_grace``) when qless says the job was taken away, when TERM,
INT or USR1 come, or when a graceful stop's deadline passes. A child that dies without settling
its job has it handed back (settling.py).
"""

from __future__ import annotations

import signal
import time
from typing import Optional

from qless.exceptions import QlessException

from .. import proctitle
from ..client import connect, redis_is_down
from ..logs import logger
from .base import Worker
from .jobchild import Children, ChildSetup, JobChild
from .limits import MEMORY_CHECK_INTERVAL
from .reservation import HeldJob
from .running import JobClient, describe_job
from .signals import HANDLED_SIGNALS

__all__ = ["ForkingWorker"]

log = logger.getChild("worker")


class ForkingWorker(Worker):
    """A worker that runs each job in a child of its own (see the module's docstring)."""

    fork_per_job = True
    children: Children

    @property
    def child(self) -> Optional[JobChild]:
        """The job child running a job, if any."""
        return self.children.running if hasattr(self, "children") else None

    def _start_mode(self) -> None:
        # The jobs' client, made once here and never used here: each child's first command
        # opens a connection of its own (redis-py drops a pool it finds in a forked process);
        # building a client in every child cost about 1.5 ms of copy-on-write faults.
        job_client = connect(self.redis_url, self.name, client_class=JobClient, announce=False,
                             **self.job_redis_options)  # fmt: skip
        will_fd = self.will.fd if self.will is not None and self.will.fd >= 0 else None
        own = (self._wakeup_r, self._wakeup_w, self.notes.fd, will_fd)
        setup = ChildSetup(
            parent_pid=self.pid,
            queues=tuple(self.queues),
            client=job_client,
            appname=self.appname,
            close_fds=tuple(fd for fd in own if fd is not None and fd >= 0),
            allow_modules=self.allow_modules,
            parent_signals=(*HANDLED_SIGNALS, signal.SIGALRM),
        )
        self.children = Children(setup, self.kill_grace)

    def _start_job(self, held: HeldJob) -> None:
        try:
            child = self.children.start(held, self.job_timeout, self.streaming)
        except OSError as error:  # no fork (a pids limit, memory): not this job's fault
            log.warning("could not fork a child for %s (%s); giving it back to its queue",
                        describe_job(held.job), error)  # fmt: skip
            assert self.client is not None
            self.holding.hold([held])
            self.holding.give_back(self.client)
            self.subscriptions.listen_for_puts(False)  # its own put must not wake it at once
            self.next_poll = time.monotonic() + self.interval
            return
        if self.will is not None:
            self.will.started(held.job)
        log.debug("job child %d runs %s", child.pid, describe_job(held.job))

    def _busy(self) -> bool:
        return self.child is not None

    def _lingering(self) -> bool:
        return bool(self.children)  # the running child, the standby, the ones exiting

    def _supervise(self, now: float) -> None:
        ended_runs = self.children.supervise(now, self.job_timeout)
        for ended in ended_runs:
            self._finish_job(ended.run())
        if ended_runs:  # before the next pop: the next job finds its standby
            self.children.keep_standby(self.stopping)
        child = self.child
        if child is not None and now >= child.memory_check_at:
            child.memory_check_at = now + MEMORY_CHECK_INTERVAL
            reason = self.limits.child_over(child.pid)
            if reason:
                self._kill_running(reason)

    def _heartbeat_running(self, now: float) -> None:
        child = self.child
        if child is None or now < child.next_heartbeat:
            return
        child.next_heartbeat = now + child.heartbeat_every
        assert self.client is not None
        try:
            # No data argument: the job may have changed its data; ours is stale.
            self.client("heartbeat", child.jid, self.name)
        except QlessException as refused:
            if redis_is_down(refused):
                raise  # a failover or a full Redis: an outage, not a refusal
            self._taken_away(child, f"qless refused its heartbeat ({refused})")

    def _job_taken_away(self, jid: str, what: str) -> bool:
        child = self.child
        if child is None or jid != child.jid:
            return False
        self._taken_away(child, f"the job {what}")
        return True

    def _taken_away(self, child: JobChild, reason: str) -> None:
        """Kill the child, unless it settled the job itself: then that is what qless says."""
        child.read_report()
        if child.kill_reason is None and child.settled is None and child.report is None:
            self._kill_running(reason)

    def _kill_running(self, reason: str) -> None:
        self.children.kill(reason)

    def _wake_times(self, now: float) -> list[float]:
        times = self.children.wake_times(now, self.stopping, self.outage.since is None)
        child = self.child
        if child is not None and self.limits.max_memory is not None:
            times.append(child.memory_check_at)
        return times

    def _wake_fds(self) -> list[int]:
        child = self.child
        return [child.report_fd] if child is not None else []

    def _update_title(self) -> None:
        super()._update_title()
        self.children.keep_standby(self.stopping)

    def _show_busy(self) -> bool:
        child = self.child
        if child is None:
            return False
        self.presence.title(proctitle.forked(child.pid, child.started))
        self._record("processing", child.job, child.started, child=child.pid)
        return True

    def _standby_pid(self) -> Optional[int]:
        standby = self.children.standby if hasattr(self, "children") else None
        return standby.pid if standby is not None else None

    def _end_mode(self) -> None:
        if hasattr(self, "children"):
            self.children.shut_down()
