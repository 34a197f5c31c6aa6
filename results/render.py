"""A tiny document model rendered twice: Markdown (plots as files) and self-contained HTML
(plots inline as base64 PNG). No template engine, no network: the HTML opens offline."""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    frame: pd.DataFrame
    caption: str = ""


@dataclass(frozen=True)
class Image:
    name: str  # file stem under plots/
    png: bytes
    alt: str


Block = Heading | Para | Bullets | Table | Image

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f0f0}tr:nth-child(even) td{background:#fafafa}
caption{caption-side:top;text-align:left;font-style:italic;padding:2px 0}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #aaa;margin-top:2em}
"""


def cell(value: object) -> str:
    """One table cell as text: 4 significant digits, blanks for missing values."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


def to_markdown(blocks: list[Block], plot_dir: str = "plots") -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}\n")
        elif isinstance(block, Para):
            out.append(block.text + "\n")
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {item}" for item in block.items) + "\n")
        elif isinstance(block, Table):
            out.append(_md_table(block))
        elif isinstance(block, Image):
            out.append(f"![{block.alt}]({plot_dir}/{block.name}.png)\n")
    return "\n".join(out)


def _md_table(block: Table) -> str:
    frame = block.frame
    if frame.empty:
        return "_(no rows)_\n"
    esc = lambda s: cell(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [f"*{block.caption}*\n"] if block.caption else []
    lines.append("| " + " | ".join(esc(c) for c in frame.columns) + " |")
    lines.append("|" + "---|" * len(frame.columns))
    lines += ["| " + " | ".join(esc(v) for v in row) + " |"
              for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def to_html(blocks: list[Block], title: str) -> str:
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            out.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Bullets):
            out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in block.items)
                       + "</ul>")
        elif isinstance(block, Table):
            out.append(_html_table(block))
        elif isinstance(block, Image):
            data = base64.b64encode(block.png).decode("ascii")
            out.append(f"<figure><img alt='{html.escape(block.alt)}' "
                       f"src='data:image/png;base64,{data}'></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def _html_table(block: Table) -> str:
    if block.frame.empty:
        return "<p><em>(no rows)</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in block.frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>"
                   for row in block.frame.itertuples(index=False))
    caption = f"<caption>{html.escape(block.caption)}</caption>" if block.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
