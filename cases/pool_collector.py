"""Collect readings with a multiprocessing.Pool of 4 workers.

Each worker loops: takes a "reading" (a small checksum over fresh random
bytes), appends it to pool_results.csv and sleeps.  The pool workers are
forked children of this script; killing only the parent leaves them running.
"""

import argparse
import hashlib
import multiprocessing
import os
import sys
import time

WORKERS = 4


def collect(slot, deadline, path):
    n = 0
    while time.time() < deadline:
        digest = hashlib.sha256(os.urandom(4096)).hexdigest()[:12]
        n += 1
        # One short write per line on an O_APPEND file keeps lines whole
        # even though four processes write to the same file.
        with open(path, "a") as f:
            f.write(f"{time.time():.3f},{slot},{os.getpid()},{n},{digest}\n")
        if n % 5 == 1:
            # One write per line so the four workers' lines don't interleave.
            sys.stdout.write(f"worker {slot} pid={os.getpid()} reading {n}: {digest}\n")
            sys.stdout.flush()
        time.sleep(min(0.5, max(0.0, deadline - time.time())))
    return slot, n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=3600)
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "pool_results.csv")
    deadline = time.time() + args.duration
    print(f"pool of {WORKERS} collecting into {path}", flush=True)
    with multiprocessing.Pool(WORKERS) as pool:
        jobs = pool.starmap_async(collect, [(slot, deadline, path) for slot in range(WORKERS)])
        for slot, n in jobs.get(timeout=args.duration + 60):
            print(f"worker {slot} took {n} readings", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
