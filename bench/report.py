"""`bench/RESULTS.md` is made of sections, one per benchmark script, each replaced by its own script."""

from __future__ import annotations

import re
from pathlib import Path


def update_section(path: Path, name: str, text: str) -> None:
    """Replace (or append) the section between `<!-- name -->` and `<!-- /name -->`."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    path.write_text(pattern.sub(lambda _: block, old, count=1) if pattern.search(old) else old.rstrip() + "\n\n" + block
                    if old else block)
