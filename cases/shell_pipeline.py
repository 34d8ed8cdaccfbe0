"""Log timestamps through a shell pipeline: a loop | awk | tee.

subprocess.Popen(cmd, shell=True) gives sh plus one process per pipeline
stage (and a sleep every second).  Killing only this script, or only the sh,
leaves the pipeline stages running until --duration runs out.
"""

import argparse
import math
import os
import shlex
import subprocess
import sys

# The loop bounds itself so the pipeline ends (and tee sees EOF) on its own.
LOOP = ("end=$(( $(date +%s) + DURATION )); while [ $(date +%s) -lt $end ]; do"
        " echo \"$(date '+%F %T') load=$(cut -d' ' -f1 /proc/loadavg)\"; sleep 1; done")
AWK = "awk '{ n++; print \"tick\", n, $0; fflush() }'"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=3600)
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "pipeline.log")
    loop = LOOP.replace("DURATION", str(math.ceil(args.duration)))
    cmd = f"{loop} | {AWK} | tee -a {shlex.quote(log)}"
    print(f"starting pipeline -> {log}", flush=True)
    proc = subprocess.Popen(cmd, shell=True)
    rc = proc.wait()
    print(f"pipeline finished rc={rc}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
