"""An application whose import costs about $BENCH_IMPORT_COST seconds of CPU (default 1): the
start-up scenario's app. The cost is CPU time of this process, so eight processes importing it
at once on two cores take about four seconds of wall time."""

import os
import time

IMPORT_COST = float(os.environ.get("BENCH_IMPORT_COST", "1.0"))


def _burn(seconds: float) -> int:
    started = time.process_time()
    total = 0
    while time.process_time() - started < seconds:
        total += sum(range(2000))
    return total


_burn(IMPORT_COST)
