"""Put the committed results on the site at `mkdocs build` time.

`experiments/RESULTS.md` and `benchmarks/RESULTS.md` stay where the scripts that make them
write them; each becomes `results/<folder>.md` with the images it links copied beside it,
so the site shows the same text and figures and never a stale copy.
"""

from __future__ import annotations

import re
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"experiments": ROOT / "experiments" / "RESULTS.md",
           "benchmarks": ROOT / "benchmarks" / "RESULTS.md"}
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
_LIST_ITEM = re.compile(r"^(?:[-*+] |\d+\. )")


def _with_list_breaks(text: str) -> str:
    """A blank line before a list that follows a paragraph line: GitHub starts the list
    without one, Python-Markdown would run it into the paragraph."""
    out: list[str] = []
    fenced = False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if (not fenced and _LIST_ITEM.match(line) and out and out[-1].strip()
                and not _LIST_ITEM.match(out[-1]) and not out[-1].startswith((" ", "|", "#"))):
            out.append("")
        out.append(line)
    return "\n".join(out)


def main() -> None:
    for name, source in SOURCES.items():
        if not source.is_file():
            continue
        text = source.read_text(encoding="utf-8")
        for target in _IMAGE.findall(text):
            image = source.parent / target
            if "://" not in target and image.is_file():
                with mkdocs_gen_files.open(Path("results", target), "wb") as out:
                    out.write(image.read_bytes())
        with mkdocs_gen_files.open(Path("results", f"{name}.md"), "w") as page:
            page.write(_with_list_breaks(text))


main()
