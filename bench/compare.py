"""A benchmark at two revisions of scalelm, in one run on this machine, side by side: for each line the benchmark
prints a figure on, that figure at the base revision and here, and their ratio.

    python bench/compare.py --base REV bench/train_throughput.py [its arguments ...]
    python bench/compare.py --base REV bench/dpo_throughput.py [its arguments ...]

The base is checked out into a temporary git worktree, and each run is a process of its own with its own bench file
and its own scalelm: base, here, here, base (--rounds times), so that a drift of the machine's speed falls on both
alike. Each figure is the mean of its runs. The figures compared are, for train_throughput, scalelm's tokens/s, the
plain loop's (the same code on both sides: how much the machine itself drifted) and their ratio within each run
(which that drift cancels from); for dpo_throughput, real tokens/s. Prints figures only.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
# bench file: lines with a figure, as (label, [figures]) of the columns compared
FIGURES = {
    "train_throughput.py": (re.compile(r"^\s+(?P<label>\S.*?\s(?:fp32|bf16|fp16))\s+(?P<a>[\d,]+)\s+(?P<b>[\d,]+)"
                                       r"\s+[\d,]+\s+(?P<c>[\d.]+)"),
                            ("scalelm tokens/s", "plain loop tokens/s", "scalelm / plain loop, each run's own")),
    "dpo_throughput.py": (re.compile(r"^\s+(?P<label>[A-Za-z][^\d]*?)\s+(?P<a>[\d,]+) real tokens/s"), ("real tokens/s",)),
}


def run(bench: Path, args: list[str], root: Path) -> str:
    """The benchmark's output, run from `root` with `root`'s scalelm first on the path."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(root / "bench" / bench.name), *args], cwd=root, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{bench.name} failed in {root}:\n{done.stderr[-3000:]}")
    return done.stdout


def figures(output: str, pattern: re.Pattern) -> dict[str, list[float]]:
    found = {}
    for line in output.splitlines():
        match = pattern.match(line)
        if match:
            found[" ".join(match["label"].split())] = [float(v.replace(",", "")) for k, v in match.groupdict().items()
                                                       if k != "label" and v is not None]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision to compare with (a commit, tag or branch)")
    parser.add_argument("--rounds", type=int, default=1, help="times to run base, here, here, base (default 1)")
    parser.add_argument("bench", type=Path, help=f"one of bench/{', bench/'.join(FIGURES)}")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    args = parser.parse_args()
    pattern, columns = FIGURES[args.bench.name]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", "-q", str(base), args.base], check=True)
        try:
            outputs = {"base": [], "here": []}
            for side in ("base", "here", "here", "base") * args.rounds:
                outputs[side].append(run(args.bench, args.args, base if side == "base" else HERE))
                print(f"ran {side}", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(base)], check=True)
    measured = {side: [figures(out, pattern) for out in outs] for side, outs in outputs.items()}
    revision = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    print(f"{args.bench.name} {' '.join(args.args)}: base {args.base} against here ({revision}), each the mean of "
          f"{2 * args.rounds} runs (base, here, here, base, ...)")
    labels = [label for label in measured["here"][0] if all(label in m for ms in measured.values() for m in ms)]
    for i, column in enumerate(columns):
        print(f"  {column:<44} {'base':>10} {'here':>10} {'here/base':>10}")
        for label in labels:
            old = statistics.mean(m[label][i] for m in measured["base"])
            new = statistics.mean(m[label][i] for m in measured["here"])
            print(f"  {label:<44} {old:10,.{2 if old < 100 else 0}f} {new:10,.{2 if new < 100 else 0}f} {new / old:10.2f}")


if __name__ == "__main__":
    main()
