"""Print the README's set-up commands, for ``.ci/run``.

``python .ci/readme_commands.py install``: the ``pip install ...`` steps of the first command
under "Two commands on a fresh machine" (joined with ``&&``; the training step is left out).
``python .ci/readme_commands.py test``: the test command (the second code block there).
``python .ci/readme_commands.py check .ci/run``: exit 1 unless ``.ci/run`` holds exactly these
two commands, literally, as its install and test lines.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Two commands on a fresh machine"


def setup_blocks(text: str) -> list[str]:
    """The bash code blocks of the set-up section, in order."""
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end >= 0 else None]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def commands(text: str) -> dict[str, str]:
    """``{"install": "pip install ... && pip install ...", "test": "python -m pytest -q"}``."""
    blocks = setup_blocks(text)
    if len(blocks) < 2:
        raise ValueError(f"README section {SECTION!r} must hold two bash blocks")
    steps = [s.strip() for s in blocks[0].split("&&")]
    install = [s for s in steps if s.startswith("pip install ")]
    if not install:
        raise ValueError("the README's first command has no `pip install` step")
    return {"install": " && ".join(install), "test": blocks[1]}


def ci_commands(script: str) -> dict[str, str]:
    """The install and test lines of a CI script (the lines that run pip install and pytest)."""
    lines = [ln.strip() for ln in script.splitlines() if not ln.strip().startswith("#")]
    install = [ln for ln in lines if ln.startswith("pip install ")]
    test = [ln for ln in lines if "pytest" in ln and not ln.startswith("python .ci/")]
    return {"install": install[0] if len(install) == 1 else "",
            "test": test[0] if len(test) == 1 else ""}


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "install"
    readme = commands(README.read_text(encoding="utf-8"))
    if which == "check":
        ci = ci_commands(Path(sys.argv[2]).read_text(encoding="utf-8"))
        if ci != readme:
            sys.exit(f"CI and README disagree: README {readme}, {sys.argv[2]} {ci}")
        sys.exit(0)
    print(readme[which])
