"""CPU-time sampling profiler for a running proxy: where its own CPU goes, per function.

Not a pytest test. py-spy cannot read this machine's Python build, and
cProfile's per-call overhead (and wall-clock timer) distorts an asyncio server
beyond use, so this samples the interpreter's stack on ``SIGPROF`` (a timer
that counts the process's CPU time only, never time spent waiting)::

    python -m tests.bench.cpu_profile --out /tmp/samples.txt -- run -c FILE
    # ... load it (wrk), then SIGTERM/SIGINT it; the samples are written at exit
    python -m tests.bench.cpu_profile --report /tmp/samples.txt

The samples file has one line per distinct stack, ``frame;frame;... count``
(the folded format flame-graph tools read). The report lists the functions
with the most samples, by their own time and including what they call.
Samples land between bytecodes, so time inside one long C call (a syscall)
is counted once per signal it absorbs: read syscall-heavy rows as a lower bound.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import runpy
import signal
import sys
import sysconfig
from pathlib import Path
from types import FrameType

_PREFIXES = (sysconfig.get_paths()["purelib"] + "/", sysconfig.get_paths()["stdlib"] + "/")


def _frame_name(frame: FrameType) -> str:
    path = frame.f_code.co_filename
    for prefix in _PREFIXES:
        path = path.removeprefix(prefix)
    return f"{path}:{frame.f_code.co_name}"


def profile(argv: list[str], out: Path, interval_s: float) -> None:
    """Run ``python -m proxy ARGV`` in this process, sampling its stack every ``interval_s`` of CPU."""
    stacks: collections.Counter[tuple[str, ...]] = collections.Counter()

    def sample(_signum: int, frame: FrameType | None) -> None:
        names = []
        while frame is not None:
            names.append(_frame_name(frame))
            frame = frame.f_back
        stacks[tuple(reversed(names))] += 1

    def dump() -> None:
        signal.setitimer(signal.ITIMER_PROF, 0)
        with out.open("w") as handle:
            for stack, count in stacks.most_common():
                handle.write(";".join(stack) + f" {count}\n")

    atexit.register(dump)
    signal.signal(signal.SIGPROF, sample)
    signal.setitimer(signal.ITIMER_PROF, interval_s, interval_s)
    sys.argv = ["credicorp-proxy", *argv]
    runpy.run_module("proxy", run_name="__main__", alter_sys=True)


def report(samples: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in samples.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
        for name in set(frames):
            inclusive[name] += int(count)
    if not total:
        return "no samples (was the process loaded?)"
    rows = [f"{total} samples", "", "own time:"]
    rows += [f"{n / total:6.1%}  {name}" for name, n in own.most_common(top)]
    rows += ["", "including callees:"]
    rows += [f"{n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/ccp-cpu-samples.txt"))
    parser.add_argument("--interval-ms", type=float, default=0.5, help="CPU time between samples")
    parser.add_argument("--report", type=Path, help="print the report of a samples file and exit")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("proxy_args", nargs="*", help="after --: the credicorp-proxy arguments")
    args = parser.parse_args()
    if args.report:
        print(report(args.report, args.top))
        return
    if not args.proxy_args:
        parser.error("give the proxy's arguments after --, e.g. -- run -c config.yaml")
    profile(args.proxy_args, args.out, args.interval_ms / 1000)


if __name__ == "__main__":
    main()
