"""Peak RSS of a command, run several times: the `ru_maxrss` of each child process.

    python bench/peak_rss.py --runs 3 -- fastinfer generate --model gemma-3-270m -n 128 --temperature 0 "The capital of France is"

Prints one JSON line: the command, each run's peak in MiB, and their mean and std.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys


def peak_mib(cmd: list[str]) -> float:
    """Run cmd in a child that forks nothing else; its ru_maxrss is the child's own peak."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True).stdout
    rc, kib = out.split()
    if rc != "0":
        raise SystemExit(f"{cmd[0]} exited with {rc}")
    return int(kib) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the command after --")
    runs = [peak_mib(cmd) for _ in range(args.runs)]
    print(json.dumps({"cmd": cmd, "peak_mib": [round(r, 1) for r in runs], "mean": round(statistics.mean(runs), 1),
                      "std": round(statistics.stdev(runs), 1) if len(runs) > 1 else 0.0}))


if __name__ == "__main__":
    main()
