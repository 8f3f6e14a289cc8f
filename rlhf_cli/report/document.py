"""A page as a list of a few kinds of block, and its two renderings: a self-contained HTML page (the
PNGs it shows lie beside it) and Markdown. The report says what to show once; each format says how.
Standard library only: the CLI reads PageFormat when it declares `rlhf report`."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from enum import Enum
from typing import Union


class PageFormat(str, Enum):
    html = "html"
    md = "md"


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Images:
    files: list[str]  # PNG names, relative to the page


@dataclass
class Collapsible:
    """Preformatted text (a config) shown folded."""

    summary: str
    text: str


Block = Union[Heading, Paragraph, Table, Images, Collapsible]

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #ddd; padding: .3em .7em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td { font-variant-numeric: tabular-nums; white-space: pre-wrap; }
.images { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 1em; }
.images img { width: 100%; border: 1px solid #eee; }
details { margin: .4em 0; } pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .85em; }
"""


def page_name(page_format: PageFormat) -> str:
    return {PageFormat.html: "index.html", PageFormat.md: "index.md"}[page_format]


def render(page_format: PageFormat, title: str, blocks: list[Block]) -> str:
    return {PageFormat.html: render_html, PageFormat.md: render_markdown}[page_format](title, blocks)


def render_html(title: str, blocks: list[Block]) -> str:
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>\n"
             f"<style>{_STYLE}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(cell)}</th>" for cell in block.header)
            body = "\n".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in block.rows)
            parts.append(f"<table>\n<tr>{head}</tr>\n{body}\n</table>")
        elif isinstance(block, Images):
            images = "\n".join(f"<img src=\"{html.escape(file)}\" alt=\"{html.escape(file)}\">" for file in block.files)
            parts.append(f"<div class=\"images\">\n{images}\n</div>")
        else:
            parts.append(f"<details><summary>{html.escape(block.summary)}</summary>\n<pre>{html.escape(block.text)}</pre>\n</details>")
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


def render_markdown(title: str, blocks: list[Block]) -> str:
    parts = [f"# {_markdown_text(title)}"]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {_markdown_text(block.text)}")
        elif isinstance(block, Paragraph):
            parts.append(_markdown_text(block.text))
        elif isinstance(block, Table):
            lines = [_markdown_row(block.header), "|" + " --- |" * len(block.header)]
            parts.append("\n".join(lines + [_markdown_row(row) for row in block.rows]))
        elif isinstance(block, Images):
            parts.append("\n".join(f"![{file}]({file})" for file in block.files))
        else:
            # GitHub and most Markdown viewers fold raw <details>; the blank lines let the fence inside render.
            parts.append(f"<details><summary>{html.escape(block.summary)}</summary>\n\n```yaml\n{block.text.rstrip()}\n```\n\n</details>")
    return "\n\n".join(parts) + "\n"


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(_markdown_text(cell).replace("\n", "<br>") for cell in cells) + " |"


def _markdown_text(text: str) -> str:
    """Text shown as written: a prompt such as `3*4*5=` or a completion holding `<tag>` is not markup."""
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", text)
