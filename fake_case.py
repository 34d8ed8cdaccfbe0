"""Fake case script that builds hostile process trees for executor tests.

The executor must kill a cancelled case's *whole* process tree.  Each option
below reproduces one way real case scripts make that hard: wide or deep trees,
orphans, double-forked daemons, processes that change process group, ignore or
handle SIGTERM, stop themselves, keep forking, or hide behind a shell.

Every process the tree creates appends {"pid", "create_time", "role"} to the
--pid-file JSON list as soon as it exists, so a test knows exactly what must be
gone after a cancel (create_time tells a reused pid apart).

Expected number of pid-file entries (see expected_count()):
    tree        = 1 + N + N**2 + ... + N**D     (--children N --depth D)
    --via-shell   + 1   (the sh wrapper; only when N > 0)
    --daemonize   + 2   (intermediate + daemon)
    --fork-storm  + 1 + --storm-limit   (the forker + its children)

Non-root processes register, spawn their own children, then (--orphan)
exit or (--self-stop) stop, then sleep --child-duration reaping their dead
children.  Forked children only ever leave through os._exit(), so they never run the
parent's finally blocks or atexit handlers.
"""

import argparse
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback

import psutil

STORM_INTERVAL = 0.02
REAP_INTERVAL = 1.0


def register(pid_file, role, pid=None):
    if not pid_file:
        return
    pid = pid or os.getpid()
    try:
        entry = {"pid": pid, "create_time": psutil.Process(pid).create_time(), "role": role}
    except psutil.NoSuchProcess:
        return
    # The lock lives in a separate file because the pid file itself is
    # replaced on every write; readers never lock and always see whole JSON.
    with open(pid_file + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(pid_file) as f:
                entries = json.load(f)
        except FileNotFoundError:
            entries = []
        entries.append(entry)
        tmp = f"{pid_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(entries, f)
        os.replace(tmp, pid_file)


def write_atomic(path, text):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def fork(body):
    """Run body() in a forked child that can only leave through os._exit."""
    # Unflushed parent output would otherwise be written once per child.
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        body()
        code = 0
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


def reap():
    # Dead children would otherwise linger as zombies that still "exist".
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def linger(seconds, has_children):
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, REAP_INTERVAL) if has_children else left)
        if has_children:
            reap()


def install_sigterm(args):
    """Set SIGTERM behaviour once; forked children inherit it."""
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif args.graceful:
        def on_term(signum, frame):
            # Written in place: a temp name would show up in DIR listings.
            with open(os.path.join(args.graceful, f"term-{os.getpid()}"), "w") as f:
                f.write("SIGTERM\n")
            os._exit(0)
        signal.signal(signal.SIGTERM, on_term)


def settle(args, spawned):
    """What every non-root process does once its own spawning is done."""
    if spawned and args.orphan:
        os._exit(0)
    if args.self_stop:
        os.kill(os.getpid(), signal.SIGSTOP)
    linger(args.child_duration, spawned)
    os._exit(0)


def start_non_root(args, role):
    if args.new_pgid:
        os.setpgid(0, 0)
    register(args.pid_file, role)


def node(args, level, announce=False):
    """A non-root tree process at `level`: register, spawn, then settle."""
    start_non_root(args, "child")
    if announce:
        print(f"fake_case pid={os.getpid()} scenario=child,level={level}", flush=True)
    settle(args, spawn_tree(args, level))


def spawn_tree(args, level):
    if level >= args.depth or args.children <= 0:
        return False
    for _ in range(args.children):
        fork(lambda: node(args, level + 1))
    return True


def spawn_via_shell(args):
    """One sh wrapper backgrounds N fresh interpreters, like a user's script."""
    child = [sys.executable, os.path.abspath(__file__), "--as-child", "--level", "1",
             "--children", str(args.children), "--depth", str(args.depth),
             "--child-duration", str(args.child_duration)]
    for flag in ("ignore_sigterm", "orphan", "new_pgid", "self_stop"):
        if getattr(args, flag):
            child.append("--" + flag.replace("_", "-"))
    for opt in ("graceful", "pid_file"):
        if getattr(args, opt):
            child += ["--" + opt.replace("_", "-"), getattr(args, opt)]
    cmd = " ".join([shlex.join(child) + " &"] * args.children) + " wait"
    sys.stdout.flush()
    # SIG_IGN for SIGTERM survives exec, and a non-interactive sh cannot undo
    # it, so with --ignore-sigterm the wrapper ignores SIGTERM too.
    shell = subprocess.Popen(["/bin/sh", "-c", cmd])
    register(args.pid_file, "shell", shell.pid)


def daemonize(args):
    """Classic double fork: the daemon ends up in its own session, reparented."""
    def intermediate():
        register(args.pid_file, "intermediate")
        os.setsid()
        fork(daemon)
        os._exit(0)

    def daemon():
        start_non_root(args, "daemon")
        settle(args, False)

    os.waitpid(fork(intermediate), 0)


def fork_storm(args):
    """A child that keeps forking, so a one-pass kill always misses some."""
    def storm_child():
        start_non_root(args, "storm")
        settle(args, False)

    def forker():
        start_non_root(args, "storm-forker")
        for _ in range(args.storm_limit):
            fork(storm_child)
            reap()
            time.sleep(STORM_INTERVAL)
        settle(args, True)

    fork(forker)


def expected_count(args):
    n, d = args.children, args.depth
    tree = 1 + sum(n ** level for level in range(1, d + 1)) if n > 0 else 1
    return (tree + (1 if args.via_shell and n > 0 else 0)
            + (2 if args.daemonize else 0)
            + (1 + args.storm_limit if args.fork_storm else 0))


def describe(args):
    parts = [f"children={args.children}", f"depth={args.depth}"]
    for flag in ("ignore_sigterm", "orphan", "daemonize", "new_pgid",
                 "self_stop", "fork_storm", "via_shell"):
        if getattr(args, flag):
            parts.append(flag.replace("_", "-"))
    if args.graceful:
        parts.append("graceful")
    return ",".join(parts)


def run_root(args):
    register(args.pid_file, "root")
    print(f"fake_case pid={os.getpid()} scenario={describe(args)}", flush=True)
    if args.daemonize:
        daemonize(args)
    if args.fork_storm:
        fork_storm(args)
    if args.via_shell and args.children > 0:
        spawn_via_shell(args)
    else:
        spawn_tree(args, 0)
    if args.ready_file:
        write_atomic(args.ready_file, f"{expected_count(args)}\n")
    linger(args.duration, True)
    return args.exit_code


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--children", type=int, default=0, help="children per non-leaf process")
    p.add_argument("--depth", type=int, default=1, help="levels below the root")
    p.add_argument("--duration", type=float, default=3600, help="root exits after S seconds")
    p.add_argument("--exit-code", type=int, default=0, help="root's exit status")
    p.add_argument("--child-duration", type=float, default=300,
                   help="safety cap: descendants exit after S seconds")
    term = p.add_mutually_exclusive_group()
    term.add_argument("--ignore-sigterm", action="store_true")
    term.add_argument("--graceful", metavar="DIR",
                      help="on SIGTERM write DIR/term-<pid> and exit 0")
    p.add_argument("--orphan", action="store_true",
                   help="non-root parents exit once their children are up")
    p.add_argument("--daemonize", action="store_true", help="root also starts a double-forked daemon")
    p.add_argument("--new-pgid", action="store_true", help="non-root processes call setpgid(0, 0)")
    p.add_argument("--self-stop", action="store_true", help="non-root processes SIGSTOP themselves")
    p.add_argument("--fork-storm", action="store_true", help="one child keeps forking every 20 ms")
    p.add_argument("--storm-limit", type=int, default=300, help="total forks of the storm")
    p.add_argument("--via-shell", action="store_true", help="root's children start from one sh -c")
    p.add_argument("--pid-file", metavar="PATH", help="JSON list of every process created")
    p.add_argument("--ready-file", metavar="PATH",
                   help="root writes the expected process count here once its children are started")
    p.add_argument("--as-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--level", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # Daemons and the storm may run elsewhere later; pin paths now.
    for opt in ("pid_file", "ready_file", "graceful"):
        if getattr(args, opt):
            setattr(args, opt, os.path.abspath(getattr(args, opt)))
    return args


def main(argv=None):
    args = parse_args(argv)
    install_sigterm(args)
    if args.as_child:
        # Same path as a forked node, so it too leaves only via os._exit.
        node(args, args.level, announce=True)
    return run_root(args)


if __name__ == "__main__":
    sys.exit(main())
