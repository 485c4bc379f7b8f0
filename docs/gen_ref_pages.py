"""Build the API reference from the package tree at `mkdocs build` time.

One page per module of `fedtune/`, `clients/` and `strategies/`, whatever folders they sit in
today, so moving a module moves its page and no page list goes stale. mkdocstrings reads the
docstrings statically (griffe): nothing is imported, so torch and Flower need not be installed
to build the docs. The navigation goes to `reference/SUMMARY.md` for mkdocs-literate-nav.
"""

from __future__ import annotations

from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedtune", "clients", "strategies")


def _in_a_package(path: Path) -> bool:
    """Every folder from the top package down to the module's holds an `__init__.py`
    (griffe resolves `a.b.c` only through regular packages)."""
    folder = path.parent
    while folder != ROOT:
        if not (folder / "__init__.py").is_file():
            return False
        folder = folder.parent
    return True


def _modules() -> tuple[list[tuple[str, ...]], list[str]]:
    found, outside = [], []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = tuple(rel.parts)
            if parts[-1] == "__main__" or any(p.startswith(".") for p in parts):
                continue
            if not _in_a_package(path):
                outside.append(str(path.relative_to(ROOT)))
                continue
            found.append(parts[:-1] if parts[-1] == "__init__" else parts)
    return sorted(set(found)), outside


def _child_link(child: tuple[str, ...]) -> str:
    """The link from a package's page to a direct child's page, beside it."""
    if (ROOT.joinpath(*child) / "__init__.py").is_file():
        return f"{child[-1]}/index.md"
    return f"{child[-1]}.md"


def main() -> None:
    nav = mkdocs_gen_files.Nav()
    modules, outside = _modules()
    for parts in modules:
        is_package = (ROOT.joinpath(*parts) / "__init__.py").is_file()
        doc = Path(*parts, "index.md") if is_package else Path(*parts).with_suffix(".md")
        nav[parts] = doc.as_posix()
        with mkdocs_gen_files.open(Path("reference", doc), "w") as page:
            page.write(f"# `{'.'.join(parts)}`\n\n::: {'.'.join(parts)}\n")
            children = [m for m in modules if m[:-1] == parts]
            if is_package and children:
                page.write("\n## Modules\n\n" + "".join(
                    f"- [`{'.'.join(child)}`]({_child_link(child)})\n" for child in children))

    with mkdocs_gen_files.open("reference/index.md", "w") as page:
        page.write("# API reference\n\nGenerated from the docstrings of every module in "
                   "`fedtune/`, `clients/` and `strategies/` each time the site is built "
                   "(`docs/gen_ref_pages.py`), so it follows the package tree as it is.\n\n")
        page.writelines(f"- [`{top}`]({top}/index.md)\n" for top in PACKAGES
                        if (top,) in modules)
        if outside:
            page.write("\nNot documented here, because a folder above them has no "
                       "`__init__.py`:\n\n" + "".join(f"- `{p}`\n" for p in outside))
    with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as summary:
        summary.write("* [Overview](index.md)\n")
        summary.writelines(nav.build_literate_nav())


main()
