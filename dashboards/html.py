"""The report's HTML parts: value formatting, sortable tables, the page's style and script."""

from __future__ import annotations

import html
from typing import Any


def _conf_label(params: dict[str, Any]) -> str:
    short = {"reg_constant": "λ", "token_expansion": "k"}
    return ", ".join(f"{short.get(k, k)}={_fmt(v)}" for k, v in params.items())


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach((th, i) => {
  th.addEventListener('click', () => {
    const body = th.closest('table').tBodies[0];
    const asc = th.dataset.dir !== 'asc';
    th.closest('tr').querySelectorAll('th').forEach(h => delete h.dataset.dir);
    th.dataset.dir = asc ? 'asc' : 'desc';
    const key = tr => {
      const c = tr.cells[i];
      const v = c.dataset.v !== undefined ? c.dataset.v : c.textContent;
      const n = parseFloat(v);
      return isNaN(n) ? v : n;
    };
    [...body.rows].sort((a, b) => {
      const x = key(a), y = key(b);
      const r = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0)
                                        : (typeof x === 'number' ? -1 : 1);
      return asc ? r : -r;
    }).forEach(tr => body.appendChild(tr));
  });
});
"""

# Marks how many figures the browser decoded (a headless check reads it from the DOM).
_LOADED = """
window.addEventListener('load', () => {
  const ok = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.figuresLoaded = ok;
});
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
.skip { color: #777; font-style: italic; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f3f3f3; cursor: pointer; user-select: none; }
th[data-dir=asc]::after { content: " ▲"; } th[data-dir=desc]::after { content: " ▼"; }
td.FAILED { color: #b00; } td.RUNNING { color: #06c; } td.KILLED { color: #a60; }
.summary td, .summary th { text-align: left; }
"""


def _table(head: list[str], rows: list[list], cls: str = "sortable") -> str:
    out = [f'<table class="{cls}"><thead><tr>']
    out += [f"<th>{html.escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>")
        for h, v in zip(head, row, strict=True):
            attr = f' class="{html.escape(str(v).split()[0])}"' if h == "state" else ""
            if isinstance(v, float | int) and not isinstance(v, bool):
                attr += f' data-v="{v}"'
            # Every cell is escaped but the links this module builds itself.
            cell = v if h == "MLflow run" else html.escape(_fmt(v))
            out.append(f"<td{attr}>{cell}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)
