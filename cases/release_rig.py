"""Cleanup step: release the rig and save what was collected.

Run as an "always" step, it runs whether the collection succeeded, failed or
was stopped. It writes rig-released.txt (or --marker PATH) with the time and
which files the collection left in the working directory."""

import argparse
import json
import os
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--marker", default="rig-released.txt")
    p.add_argument("--seconds", type=float, default=0.2, help="how long releasing takes")
    a = p.parse_args(argv)
    print("releasing the rig ...", flush=True)
    time.sleep(a.seconds)
    saved = sorted(f for f in os.listdir(".") if f != os.path.basename(a.marker))
    with open(a.marker + ".tmp", "w") as f:
        json.dump({"releasedAt": time.time(), "saved": saved}, f)
    os.replace(a.marker + ".tmp", a.marker)
    print(f"rig released; saved {len(saved)} file(s)", flush=True)


if __name__ == "__main__":
    main()
