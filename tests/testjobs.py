"""Job classes for the tests (the worker imports them as ``testjobs.<Name>``).

Each job records what the tests need to see in Redis keys under ``test:``.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _record(job, **extra):
    job.client.redis.rpush(
        "test:runs",
        json.dumps(
            {
                "jid": job.jid,
                "queue": job.queue_name,
                "pid": os.getpid(),
                "ppid": os.getppid(),
                **extra,
            }
        ),
    )


class Noop:
    """Returns without settling: the worker completes it."""

    @staticmethod
    def process(job):
        _record(job)


class Complete:
    @staticmethod
    def process(job):
        _record(job)
        job.complete()


class Advance:
    @staticmethod
    def process(job):
        _record(job)
        job.complete(job.data["next"])


class Fail:
    @staticmethod
    def process(job):
        _record(job)
        raise ValueError("this job always fails")


class Sleep:
    """Sleeps ``data["seconds"]``; only on its first attempt when ``data["once"]``."""

    @staticmethod
    def process(job):
        _record(job, attempt=job.original_retries - job.retries_left + 1)
        first = job.retries_left == job.original_retries
        if first or not job.data.get("once"):
            time.sleep(job.data.get("seconds", 0))


class Exit:
    @staticmethod
    def process(job):
        _record(job)
        sys.stdout.flush()
        os._exit(job.data.get("status", 3))


class SysExit:
    @staticmethod
    def process(job):
        _record(job)
        sys.exit(4)


class Chain:
    """Puts its follow-up on its own queue, ``data["left"]`` times, after a short pause."""

    @staticmethod
    def process(job):
        _record(job)
        time.sleep(0.2)
        left = job.data["left"]
        if left:
            job.client.queues[job.queue_name].put("testjobs.Chain", {"left": left - 1})


class SignalMask:
    """Records the signals blocked in the job child (none should be)."""

    @staticmethod
    def process(job):
        import signal

        blocked = sorted(
            signal.Signals(s).name for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        )
        _record(job, blocked=blocked)


class Spawn:
    """Starts ``sleep 300`` in the background (in a session of its own if ``data["setsid"]``),
    records its pid, then sleeps ``data["seconds"]`` (on its first attempt only)."""

    @staticmethod
    def process(job):
        import subprocess

        background = subprocess.Popen(
            ["sleep", "300"], start_new_session=bool(job.data.get("setsid"))
        )
        _record(job, background=background.pid)
        if job.retries_left == job.original_retries:
            time.sleep(job.data.get("seconds", 0))


class Interrupt:
    @staticmethod
    def process(job):
        _record(job)
        raise KeyboardInterrupt


class BigFailure:
    """Raises an exception whose message is ``data["size"]`` characters long."""

    @staticmethod
    def process(job):
        _record(job)
        raise ValueError("x" * job.data["size"] + " the end")


class Quiet:
    """Sleeps ``data["seconds"]`` without touching Redis."""

    @staticmethod
    def process(job):
        time.sleep(job.data.get("seconds", 0))


class Hog:
    """Holds ``data["mb"]`` megabytes, then sleeps ``data["seconds"]``."""

    @staticmethod
    def process(job):
        _record(job)
        ballast = bytearray(job.data["mb"] * 1024 * 1024)
        for i in range(0, len(ballast), 4096):  # touch every page: it is resident
            ballast[i] = 1
        time.sleep(job.data.get("seconds", 0))


class CompleteThenFail:
    """Completes its job, then raises: the job stays complete (qless refuses the fail)."""

    @staticmethod
    def process(job):
        job.complete()
        raise RuntimeError("after complete")


class CompleteThenSleep:
    """Completes its job, then sleeps ``data["seconds"]``: whatever then ends its run, the job
    stays complete."""

    @staticmethod
    def process(job):
        _record(job)
        job.complete()
        time.sleep(job.data["seconds"])


class Unsaveable:
    """Puts a datetime in its data (which JSON cannot hold), then returns, or raises if
    ``data["raise"]``."""

    @staticmethod
    def process(job):
        import datetime

        _record(job)
        job.data["when"] = datetime.datetime(2026, 11, 28)
        if job.data.get("raise"):
            raise KeyError("raised with unsaveable data")


class Swallow:
    """Swallows every interruption, for ever (until killed)."""

    @staticmethod
    def process(job):
        _record(job)
        while True:
            try:
                time.sleep(60)
            except BaseException:  # the point of this job
                job.client.redis.rpush("test:swallowed", job.jid)


class FailLater:
    """Sleeps ``data["seconds"]``, then raises an exception ``data["size"]`` characters long."""

    @staticmethod
    def process(job):
        _record(job)
        time.sleep(job.data["seconds"])
        raise ValueError("y" * job.data["size"])


class MoveThenWork:
    """Moves its job to ``data["to"]``, works on for ``data["seconds"]``, then records that it
    finished: qless's news of the move must not get it killed."""

    @staticmethod
    def process(job):
        _record(job)
        job.move(job.data["to"])
        time.sleep(job.data["seconds"])
        _record(job, finished=True)


class FlushScripts:
    """Makes Redis forget its scripts (as a restart without persistence would), then returns."""

    @staticmethod
    def process(job):
        _record(job)
        job.client.redis.script_flush()


class ExitOnce:
    """``os._exit`` on its first attempt (a crash of whatever process runs it); returns after."""

    @staticmethod
    def process(job):
        _record(job, attempt=job.original_retries - job.retries_left + 1)
        if job.retries_left == job.original_retries:
            sys.stdout.flush()
            os._exit(3)


class Borrowed:
    """Its method is a function of another module (``posixpath``): outside an allowlist of
    ``testjobs``, though the class itself is inside."""

    process = staticmethod(os.path.basename)


class RaiseBase:
    """Raises a BaseException qless-py does not catch, on its first attempt: in process, it
    ends the worker with an error (an unclean exit, with its will left for the settler)."""

    class Escape(BaseException):
        pass

    @staticmethod
    def process(job):
        _record(job, attempt=job.original_retries - job.retries_left + 1)
        if job.retries_left == job.original_retries:
            raise RaiseBase.Escape("out of the worker's hands")


class SpawnAndHang:
    """Starts ``sleep 300`` in the background (in its own process group when run in a child;
    in the worker's group when run in process), records its pid, and sleeps for ever."""

    @staticmethod
    def process(job):
        import subprocess

        background = subprocess.Popen(["sleep", "300"])
        _record(job, background=background.pid)
        time.sleep(3600)
