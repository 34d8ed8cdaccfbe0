"""Sample load average, memory and CPU use once a second into a CSV.

The sampling runs in a worker process (this same script with --worker) that
the parent supervises and restarts if it dies early, the way lab collectors
are usually written.  Stopping only the parent leaves the worker sampling.
"""

import argparse
import csv
import os
import subprocess
import sys
import time

import psutil

FIELDS = ["time", "load1", "load5", "load15", "mem_percent", "mem_used_mb", "cpu_percent"]


def sample_until(deadline, path):
    new = not os.path.exists(path)
    psutil.cpu_percent(interval=None)  # first call only primes the counter
    with open(path, "a", newline="") as f:
        out = csv.writer(f)
        if new:
            out.writerow(FIELDS)
        n = 0
        while time.time() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.time())))
            mem = psutil.virtual_memory()
            row = [f"{time.time():.3f}", *(f"{x:.2f}" for x in os.getloadavg()),
                   f"{mem.percent:.1f}", mem.used // 2**20, f"{psutil.cpu_percent(interval=None):.1f}"]
            out.writerow(row)
            f.flush()
            n += 1
            print(f"sample {n}: load1={row[1]} mem={row[4]}% cpu={row[6]}%", flush=True)


def supervise(args, path):
    deadline = time.time() + args.duration
    restarts = 0
    while time.time() < deadline:
        worker = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                                   "--until", str(deadline), "--out", args.out])
        print(f"sampler worker pid={worker.pid} -> {path}", flush=True)
        rc = worker.wait()
        if rc == 0 or restarts >= 5:
            break
        restarts += 1
        print(f"worker exited rc={rc}, restarting ({restarts})", flush=True)
        time.sleep(1)
    print(f"done, {restarts} restart(s)", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=3600)
    p.add_argument("--out", default=".")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--until", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sysstat.csv")
    if args.worker:
        sample_until(args.until, path)
    else:
        supervise(args, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
