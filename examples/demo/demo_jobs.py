"""The demo's jobs: quick ones, slow ones, and some that fail on purpose.

qless-py calls the job class's static method named after the job's queue, else ``process``.
"""

import time


class Quick:
    @staticmethod
    def process(job):
        sum(range(10_000))  # a little work; the job is completed when this returns


class Slow:
    @staticmethod
    def process(job):
        time.sleep(job.data.get("seconds", 0.2))


class Failing:
    @staticmethod
    def process(job):
        raise RuntimeError(f"demo job {job.jid[:8]} fails on purpose")


class Report:
    """Advances to the next queue when done: qless's pipelines. qless-py calls the static
    method named after the job's queue."""

    @staticmethod
    def demo_foo(job):
        job.data["stage"] = "counted"
        job.complete("demo_baz")

    @staticmethod
    def demo_baz(job):
        time.sleep(0.05)
