"""Read py-spy's collapsed stacks (``py-spy record --format raw``): the functions that take the
most samples, by their own time and with what they call.

    .venv/bin/python -m bench.stacks PROFILE.txt [--top 25] [--match circles/]
"""

from __future__ import annotations

import argparse
import collections
import re


def frames(stack: str) -> list:
    """``function (file:line)`` frames of one collapsed stack, outermost first, line numbers off
    (so a function's samples add up whatever line they were on)."""
    names = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
    if names[0].startswith("process "):  # py-spy --subprocesses: the process, named by its pid
        names[0] = "process " + names[0].split(":", 1)[-1][:100]
    return names


def read(path: str) -> tuple:
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    pending = ""
    with open(path) as f:
        for line in f:
            # A process's command line may hold newlines (``python -c``): a stack ends with its count.
            pending += line.rstrip("\n")
            stack, _, count = pending.rpartition(" ")
            if not count.isdigit():
                pending += "\\n"
                continue
            pending = ""
            n = int(count)
            total += n
            names = frames(stack)
            own[names[-1]] += n
            for name in set(names):
                inclusive[name] += n
    return total, own, inclusive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", default="", help="inclusive list: only frames whose text contains this")
    args = parser.parse_args()
    total, own, inclusive = read(args.profile)
    print(f"{total} samples")
    print("\nown time:")
    for name, n in own.most_common(args.top):
        print(f"{100 * n / total:5.1f}%  {name}")
    print("\nwith what it calls:")
    shown = 0
    for name, n in inclusive.most_common():
        if args.match in name:
            print(f"{100 * n / total:5.1f}%  {name}")
            shown += 1
            if shown >= args.top:
                break


if __name__ == "__main__":
    main()
