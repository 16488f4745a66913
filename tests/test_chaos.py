"""The chaos run, small enough for every CI run (at most a minute); tests/chaos.py runs it big.

``--chaos-jobs N --chaos-seconds S`` (see conftest.py) make it longer."""

from __future__ import annotations

import pytest
from chaos import run_chaos


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fork_per_job", [True, False], ids=["fork", "in-process"])
def test_chaos_loses_nothing_and_explains_every_duplicate(request, fork_per_job):
    jobs = request.config.getoption("--chaos-jobs")
    seconds = request.config.getoption("--chaos-seconds")
    report = run_chaos(jobs, seconds, fork_per_job=fork_per_job)
    assert report.problems == []
    assert report.lost == 0
    assert report.left_running == []
    assert report.states["complete"] + report.states["failed"] == jobs  # none left waiting
    # The chaos did happen.
    assert report.workers_killed and (report.children_killed or not fork_per_job)
    assert report.hups == 20 and report.pauses == 6 and report.redis_restarts == 1
    assert report.reloads == 3
