"""The README's Python example runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python example"
    for code in blocks:
        scope: dict = {}
        exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - the project's own docs
    # The example ends with a forward pass: its outputs are there and finite.
    rates = scope["out"]["output_params"]
    assert rates.shape == (128, 100, 50) and (rates > 0).all()
