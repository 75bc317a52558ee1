"""`scalelm` and `python -m scalelm`: the command line, in a process whose worker processes (data loading, the data
pipeline) start from a forkserver that has imported what they run (scalelm/data/workers.py)."""

from scalelm.cli import main
from scalelm.data.workers import preload_workers


def run() -> int:
    preload_workers()
    return main()


if __name__ == "__main__":
    raise SystemExit(run())
