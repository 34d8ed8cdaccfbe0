"""A minimal case for the stop-API benchmarks: becomes `sleep SECONDS`.

One process per instance, a few ms of start-up, ~1 MB resident, ends on
SIGTERM: it isolates the stop path (collector -> executor -> cancel) from the
cost of building trees, which bench section 1 measures separately.
Usage (through an executor whose --cases-dir is the repository):
    {"script": "bench/idle_case.py", "args": ["600"]}
"""

import os
import sys

seconds = sys.argv[1] if len(sys.argv) > 1 else "600"
os.execvp("sleep", ["sleep", seconds])
