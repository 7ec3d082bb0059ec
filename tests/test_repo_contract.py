"""The README's two commands and CI stay in step: README starts with exactly two commands, CI runs
the second verbatim, and the scripts they name exist."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block and text.index("```bash") < text.index("\n## "), "commands must come first"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_two_commands_and_ci_runs_the_test_one():
    install_and_run, install_and_test = _readme_commands()
    assert "pytest" in install_and_test and "pytest" not in install_and_run
    ci = (ROOT / ".ci" / "run").read_text()
    assert install_and_test in ci.splitlines()
    for cmd in (install_and_run, install_and_test):
        for script in re.findall(r"bash (\S+)", cmd):
            assert (ROOT / script).is_file(), script
