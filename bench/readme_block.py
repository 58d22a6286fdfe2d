"""The one way a benchmark writes its table into the docs: between its `<!-- name:start -->` and
`<!-- name:end -->` markers, in whichever page holds them (the README or a page under docs/), everything
else kept."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def page_with(name: str) -> Path:
    """The README or docs page that holds the block `name`."""
    start = f"<!-- {name}:start"
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if start in page.read_text():
            return page
    raise SystemExit(f"no page under README.md or docs/ has the {start} -->  … <!-- {name}:end --> markers")


def replace_block(name: str, body: str, page: Path | None = None) -> None:
    page = page or page_with(name)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = page.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{page} has no {start} … {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{start}\n{body}\n{end}{tail}")
