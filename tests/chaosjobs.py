"""The chaos run's jobs: each records every run of itself before it does its thing."""

from __future__ import annotations

import json
import os
import time


def _ran(job) -> None:
    # One transaction: a kill between the two must not leave a count without its record.
    pipe = job.client.redis.pipeline()
    pipe.incr(f"chaos:runs:{job.jid}")
    pipe.rpush(
        "chaos:log",
        json.dumps({"jid": job.jid, "pid": os.getpid(), "ppid": os.getppid(), "at": time.time()}),
    )
    pipe.execute()


class Quick:
    @staticmethod
    def process(job):
        _ran(job)


class Slow:
    @staticmethod
    def process(job):
        _ran(job)
        time.sleep(job.data["seconds"])


class Failing:
    @staticmethod
    def process(job):
        _ran(job)
        raise ValueError("this job fails on purpose")


class Exit:
    @staticmethod
    def process(job):
        _ran(job)
        os._exit(3)


class Hang:
    """Runs far past the pool's --job-timeout."""

    @staticmethod
    def process(job):
        _ran(job)
        time.sleep(600)
