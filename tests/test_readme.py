"""The README's code example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out.split()
    assert len(printed) == 3 and all(float(v) >= 0 for v in printed)


def test_readme_lists_exactly_three_commands_and_ci_runs_two_of_them():
    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert len(commands) == 3
    assert commands[1] == "feedbackcam demo"
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[0] in ci and commands[2] in ci
