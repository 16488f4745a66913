"""An application holding about $BENCH_BALLAST_MB megabytes (default 200) of small Python
objects, built when it is imported: the memory scenario's app.

The objects are lists of an int and a str, tracked by the garbage collector, as an application's
loaded models, tables and caches would be.
"""

import os

#: Bytes of heap one entry costs (a 2-item list, an int, a short str; measured on CPython 3.11).
BYTES_PER_ENTRY = 185
MEGABYTES = int(os.environ.get("BENCH_BALLAST_MB", "200"))
BALLAST = [[i, f"item-{i}"] for i in range(MEGABYTES * 1024 * 1024 // BYTES_PER_ENTRY)]
