"""The seed guide's YAML examples, verbatim, read from the copy of the guide in tests/fixtures/seed/.

Each ```yaml block of the guide starts with a comment naming the file it stands for
(`# config/sweep/scaling_experiments.yaml`); `guide_examples()` maps that path to the block's text.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

GUIDE = Path(__file__).parent / "fixtures" / "seed" / "advanced-features-guide.md"
_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.S | re.M)
_NAME = re.compile(r"^# (config/\S+\.yaml)\s*$", re.M)


@cache
def guide_examples() -> dict[str, str]:
    """Seed-format path (`config/sweep/scaling_experiments.yaml`) -> the block's YAML text, verbatim."""
    examples = {}
    for block in _BLOCK.findall(GUIDE.read_text(encoding="utf-8")):
        first = _NAME.match(block)
        assert first, f"a yaml block of the guide names no file: {block[:60]!r}"
        examples[first.group(1)] = block
    return examples


def under(section: str, text: str) -> str:
    """A seed file's text as the value of `section:` in one of our files (indented, otherwise verbatim)."""
    return f"{section}:\n" + "".join(f"  {line}" if line.strip() else line for line in text.splitlines(True))
