"""CI runs the README's Quick start as a new user would: .ci/run holds its commands, as written."""

import re

from conftest import ROOT


def commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_ci_runs_the_readme_quick_start_as_written():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", quick_start, re.S).group(1)
    ci = (ROOT / ".ci" / "run").read_text()
    ci_commands = [c for c in commands(ci) if c not in ("set -euo pipefail", 'cd "$(dirname "$0")/.."')]
    assert ci_commands == commands(block) and len(ci_commands) == 2
