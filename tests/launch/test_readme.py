"""The README's two commands are the project's contract with a new machine and with CI."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]


def readme_commands() -> list[str]:
    block = re.search(r"```(?:sh|bash)\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_two_commands():
    run, test = readme_commands()
    assert run.startswith("pip install torch==2.13.0 -e '.[dev]' && ")
    assert test.startswith("tools/install_slurm.sh && pip install torch==2.13.0 -e '.[dev]' && pytest")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci
