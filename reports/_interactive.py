"""The report's interactive parts: inline SVG charts, sortable and filterable tables, hover values.

Everything is written into the one HTML file: the charts are SVG built here, the behaviour a small
inline script (:data:`SCRIPT`, no library, no network). Without JavaScript the page still reads: the
tables are plain tables and every chart cell carries its value as an SVG ``<title>``.

Hooks the script reads:

- ``table.sortable``: a click on a header sorts by that column (again: the other way); a cell's
  ``data-v`` is its sort key (a number where the cell shows one, so "1.2 ± 0.3" sorts as 1.2).
- ``input[data-filter=ID]``: shows only the rows of table ``ID`` whose text contains every word typed.
- ``[data-tip]``: its text is shown beside the pointer on hover.
- ``[data-unit]`` in a chart: a click selects the unit's rows in the per-unit table (``#units``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

CSS = """*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1600px;
color:#222;padding:0 1em;line-height:1.4}
h1{font-size:1.5em;word-break:break-word}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
h3{font-size:1.02em}
.scroll{overflow-x:auto;max-width:100%;margin:.5em 0}
table{border-collapse:collapse;font-size:.85em}
td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4;position:sticky;top:0}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th::after{content:" \\2195";color:#aaa;font-size:.8em}
table.sortable th.asc::after{content:" \\2191";color:#333}table.sortable th.desc::after{content:" \\2193";color:#333}
tr.sel td{background:#fff6c8}
img{max-width:100%;height:auto;border:1px solid #eee}
svg.chart{width:100%;height:auto;display:block;max-width:var(--w,900px);border:1px solid #eee;background:#fff}
svg.chart text{font-family:inherit}
svg.chart .cell:hover{stroke:#000;stroke-width:1.5}svg.chart g[data-tip] text{pointer-events:none}
svg.chart [data-unit]{cursor:pointer}
code{background:#f4f4f4;padding:0 .2em;word-break:break-all}
.bad{color:#b00;font-weight:600}.ok{color:#070}.tie{color:#333}.muted{color:#777;font-size:.85em}
.warn{border:2px solid #b00;background:#fff3f3;padding:.6em 1em;margin:1em 0}
.verdict{font-size:1.1em;padding:.7em 1em;margin:1em 0;border-left:6px solid #999;background:#f7f7f7}
.verdict.ok{border-color:#2a8a2a;color:#222;font-weight:400}.verdict.bad{border-color:#b00;color:#222}
.verdict.tie{border-color:#c90}
.filter{margin:.4em 0;padding:.3em .5em;font-size:.95em;width:min(24em,100%)}
.figs{display:flex;flex-wrap:wrap;gap:1em}.figs>div{flex:1 1 320px;min-width:0}
#tip{position:fixed;pointer-events:none;background:#222;color:#fff;padding:.25em .5em;border-radius:3px;
font-size:.8em;display:none;z-index:9;max-width:26em}
@media (max-width:600px){body{padding:0 .4em}td,th{padding:.2em .35em}table{font-size:.78em}}"""

SCRIPT = r"""(function(){
function key(td){var v=td.getAttribute('data-v');if(v===null){v=td.textContent.trim();}
  var n=parseFloat(v.replace(/[,%]/g,''));return isNaN(n)?[1,v.toLowerCase()]:[0,n];}
function cmp(a,b){if(a[0]!==b[0])return a[0]-b[0];return a[1]<b[1]?-1:a[1]>b[1]?1:0;}
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('thead th').forEach(function(th,i){th.addEventListener('click',function(){
    var asc=!th.classList.contains('asc');
    t.querySelectorAll('thead th').forEach(function(h){h.classList.remove('asc','desc');});
    th.classList.add(asc?'asc':'desc');
    var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(r,s){var c=cmp(key(r.cells[i]),key(s.cells[i]));return asc?c:-c;});
    rows.forEach(function(r){body.appendChild(r);});});});});
document.querySelectorAll('input[data-filter]').forEach(function(inp){
  inp.addEventListener('input',function(){
    var t=document.getElementById(inp.getAttribute('data-filter'));
    var words=inp.value.toLowerCase().split(/\s+/).filter(Boolean);
    Array.prototype.forEach.call(t.tBodies[0].rows,function(r){var s=r.textContent.toLowerCase();
      r.style.display=words.every(function(w){return s.indexOf(w)>=0;})?'':'none';});});});
var tip=document.getElementById('tip');
document.addEventListener('mouseover',function(e){var el=e.target.closest&&e.target.closest('[data-tip]');
  if(!el){tip.style.display='none';return;}
  tip.textContent=el.getAttribute('data-tip');tip.style.display='block';});
document.addEventListener('mousemove',function(e){if(tip.style.display==='block'){
  var x=Math.min(e.clientX+12,window.innerWidth-tip.offsetWidth-4);
  tip.style.left=x+'px';tip.style.top=(e.clientY+14)+'px';}});
document.addEventListener('click',function(e){var el=e.target.closest&&e.target.closest('[data-unit]');
  if(!el)return;var u=el.getAttribute('data-unit'),t=document.getElementById('units');if(!t)return;
  var first=null;Array.prototype.forEach.call(t.tBodies[0].rows,function(r){
    var on=r.getAttribute('data-unit')===u;r.classList.toggle('sel',on);if(on){r.style.display='';if(!first)first=r;}});
  if(first){first.scrollIntoView({block:'center'});}});
})();"""


def esc(x: Any) -> str:
    return html.escape(str(x))


def _isnum(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def sort_key(v: Any) -> str | None:
    """The ``data-v`` of a cell: the number a numeric cell starts with (so formatted numbers sort as
    numbers); None to sort by the text."""
    if _isnum(v):
        return repr(float(v))
    return None


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, table_id: str | None = None,
          sortable: bool = True, cell_class: Any = None, keys: Sequence[Sequence[Any]] | None = None,
          row_units: Sequence[str | None] | None = None, filter_label: str | None = None) -> str:
    """A table in a horizontally scrolling box; every cell escaped. ``keys[i][j]``: a sort key for a
    cell (a number) where its text is not one; ``row_units[i]``: the unit a row belongs to (chart
    clicks select it); ``filter_label``: add a filter box (needs ``table_id``)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for i, r in enumerate(rows):
        unit = row_units[i] if row_units else None
        cells = []
        for j, c in enumerate(r):
            k = cell_class(j, c) if cell_class else ""
            kv = keys[i][j] if keys and j < len(keys[i]) else None
            attrs = (f" class='{k}'" if k else "") + (f" data-v='{esc(kv)}'" if _isnum(kv) else "")
            cells.append(f"<td{attrs}>{esc(c)}</td>")
        unit_attr = f" data-unit='{esc(unit)}'" if unit else ""
        body.append(f"<tr{unit_attr}>" + "".join(cells) + "</tr>")
    tid = f" id='{esc(table_id)}'" if table_id else ""
    cls = " class='sortable'" if sortable else ""
    box = ""
    if filter_label and table_id:
        box = (f"<input class='filter' type='search' data-filter='{esc(table_id)}' "
               f"placeholder='{esc(filter_label)}' aria-label='{esc(filter_label)}'>")
    return (f"{box}<div class='scroll'><table{tid}{cls}><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


# -- colours -------------------------------------------------------------------------------------
_RAMP = ((255, 255, 229), (254, 227, 145), (254, 153, 41), (204, 76, 2), (102, 37, 6))  # light -> dark


def ramp(t: float) -> str:
    """A colour for ``t`` in [0, 1] on a light-to-dark sequential ramp."""
    t = min(1.0, max(0.0, t)) * (len(_RAMP) - 1)
    i = min(int(t), len(_RAMP) - 2)
    f = t - i
    c = [round(a + (b - a) * f) for a, b in zip(_RAMP[i], _RAMP[i + 1], strict=True)]
    return f"rgb({c[0]},{c[1]},{c[2]})"


def nice_max(v: float) -> float:
    """A round upper end for a colour scale or an axis at or above ``v``."""
    if v <= 0:
        return 1.0
    e = 10.0 ** math.floor(math.log10(v))
    for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * e >= v * (1 - 1e-9):
            return m * e
    return 10 * e


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values inside [lo, hi], about ``n`` of them."""
    step = nice_max((hi - lo) / max(1, n - 1)) if hi > lo else 1.0
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + k * step, 10) for k in range(int((hi - first) / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Round tick values inside [10**lo, 10**hi] for a logarithmic axis (``lo``, ``hi``: decimal
    logarithms): the powers of ten, with 2 and 5 times them where fewer than three powers fit."""
    first, last = math.ceil(lo - 1e-9), math.floor(hi + 1e-9)
    mults = (1.0,) if last - first >= 2 else (1.0, 2.0, 5.0)
    return [m * 10.0 ** k for k in range(first - 1, last + 1) for m in mults
            if lo - 1e-9 <= math.log10(m * 10.0 ** k) <= hi + 1e-9]


def _text(x: float, y: float, s: str, *, size: int = 11, anchor: str = "start", rotate: float | None = None,
          fill: str = "#222", weight: str = "normal") -> str:
    rot = f" transform='rotate({rotate} {x:.1f} {y:.1f})'" if rotate is not None else ""
    return (f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' text-anchor='{anchor}' fill='{fill}' "
            f"font-weight='{weight}'{rot}>{esc(s)}</text>")


def _svg(w: float, h: float, body: Sequence[str], label: str, zoom: float = 1.3) -> str:
    """An SVG shown at up to ``zoom`` times its drawn size, never wider than the page."""
    return (f"<svg class='chart' role='img' aria-label='{esc(label)}' viewBox='0 0 {w:.0f} {h:.0f}' "
            f"style='--w:{max(320, int(w * zoom))}px' xmlns='http://www.w3.org/2000/svg'>"
            f"<title>{esc(label)}</title>{''.join(body)}</svg>")


# -- heatmap -------------------------------------------------------------------------------------
def heatmap(title: str, units: Sequence[str], names: Mapping[str, str], columns: Sequence[str],
            values: Sequence[Sequence[float | None]], ses: Sequence[Sequence[float | None]], *,
            unit_label: str, fmt_value: Any, vmax: float | None = None) -> str:
    """One method's units x settings as an SVG heatmap with its own colour scale (0 to the largest
    drop it shows, rounded up), a legend, a hover value per cell (``data-tip`` and ``<title>``), and
    a click that selects the unit in the per-unit table. ``values[i][j]``: the drop in display
    units (None: not probed); ``ses``: its standard error."""
    finite = [float(v) for row in values for v in row if v is not None and _isnum(v)]
    top = nice_max(max([0.0, *finite]) if vmax is None else vmax)
    label_w = min(260, 14 + 6.6 * max([len(names.get(u, u)) for u in units] + [4]))
    cw = max(34.0, min(90.0, 560 / max(1, len(columns))))
    ch = 16 if len(units) > 40 else 20
    head_h = 34 + 4.2 * min(40, max(len(c) for c in columns)) if columns else 34
    w = label_w + cw * len(columns) + 120
    h = head_h + ch * len(units) + 30
    parts = [_text(4, 14, title, size=12, weight="600")]
    x0, y0 = label_w, head_h
    for j, c in enumerate(columns):
        x = x0 + cw * (j + 0.5)
        parts.append(_text(x, y0 - 6, c, size=10, rotate=-35))
    for i, u in enumerate(units):
        y = y0 + ch * i
        name = names.get(u, u)
        parts.append(f"<g data-unit='{esc(u)}'>" + _text(label_w - 6, y + ch * 0.7, name, size=10, anchor="end")
                     + "</g>")
        for j, c in enumerate(columns):
            v = values[i][j]
            x = x0 + cw * j
            if v is None or not _isnum(v):
                tip = f"{name} · {c}: not probed"
                fill = "#eee"
                txt = ""
            else:
                se = ses[i][j]
                pm = f" ± {fmt_value(se)}" if se is not None and _isnum(se) and se > 0 else ""
                tip = f"{name} · {c}: drop {fmt_value(v)}{pm} {unit_label}"
                fill = ramp(max(0.0, float(v)) / top)
                txt = fmt_value(v)
            dark = fill.startswith("rgb(") and sum(int(p) for p in fill[4:-1].split(",")) < 380
            parts.append(f"<g data-unit='{esc(u)}' data-tip='{esc(tip)}'><rect class='cell' x='{x:.1f}' y='{y:.1f}' "
                         f"width='{cw - 1:.1f}' height='{ch - 1:.1f}' fill='{fill}'><title>{esc(tip)}</title></rect>"
                         + (_text(x + cw / 2, y + ch * 0.68, txt, size=9, anchor="middle",
                                  fill="#fff" if dark else "#222") if txt and cw >= 34 else "") + "</g>")
    # legend: this method's own scale
    lx = x0 + cw * len(columns) + 24
    steps = 24
    lh = min(160.0, max(60.0, ch * len(units)))
    for k in range(steps):
        parts.append(f"<rect x='{lx:.1f}' y='{y0 + lh * (1 - (k + 1) / steps):.1f}' width='14' "
                     f"height='{lh / steps + 0.5:.1f}' fill='{ramp(k / (steps - 1))}'/>")
    parts.append(_text(lx + 18, y0 + 8, f"{fmt_value(top)}", size=10))
    parts.append(_text(lx + 18, y0 + lh, "0", size=10))
    parts.append(_text(lx, y0 + lh + 16, unit_label, size=10))
    return _svg(w, max(h, y0 + lh + 24), parts, title)


# -- scatter / line chart ------------------------------------------------------------------------
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _marker(marker: str, x: float, y: float, col: str, k: float = 1.0) -> str:
    """A point's shape centred on (x, y), ``k`` times its size in the plot (a circle by default)."""
    if marker == "square":
        return (f"<rect x='{x - 5 * k:.1f}' y='{y - 5 * k:.1f}' width='{10 * k:.1f}' height='{10 * k:.1f}' "
                f"fill='{col}'/>")
    if marker == "star":
        star = ((0, -8), (2.4, -2.4), (8, -2.4), (3.5, 1.5), (5, 8), (0, 4), (-5, 8), (-3.5, 1.5), (-8, -2.4),
                (-2.4, -2.4))
        d = " L".join(f"{x + k * a:.1f},{y + k * b:.1f}" for a, b in star)
        return f"<path d='M{d} Z' fill='{col}' stroke='#000' stroke-width='.6'/>"
    return f"<circle cx='{x:.1f}' cy='{y:.1f}' r='{4.5 * k:g}' fill='{col}'/>"


def chart(title: str, series: Sequence[Mapping[str, Any]], *, xlabel: str, ylabel: str,
          diagonal: bool = False, fmt_x: Any = None, fmt_y: Any = None, log_x: bool = False) -> str:
    """An SVG scatter or line chart. Each series: ``name``, ``points`` (``[{x, y, tip, xerr?,
    unit?, link?}]``; ``link``: another y value, joined to the point by a dashed vertical line),
    ``line`` (join the points), ``marker`` (``circle``, ``square``, ``star``, or ``none``: a line
    alone, with the series' ``tip`` on hover), ``cls`` (a class on each point's group and on the
    line, for tests and styles). ``diagonal``: draw y = x (measured = predicted). ``log_x``: a
    logarithmic x axis (points at x <= 0 are not drawn). Every point has a hover tip."""
    fmt_x = fmt_x or (lambda v: f"{v:.4g}")
    fmt_y = fmt_y or (lambda v: f"{v:.4g}")

    def drawn(p: Mapping[str, Any]) -> bool:
        return _isnum(p.get("x")) and _isnum(p.get("y")) and (not log_x or float(p["x"]) > 0)

    def tx(v: float) -> float:  # the x axis' own coordinate
        return math.log10(v) if log_x else v

    pts = [p for s in series for p in s["points"] if drawn(p)]
    xs = [tx(float(p["x"])) for p in pts] + [tx(float(p["x"]) + e) for p in pts for e in (p.get("xerr") or (0, 0))
                                              if not log_x or float(p["x"]) + e > 0]
    ys = [float(p["y"]) for p in pts] + [float(p["link"]) for p in pts if _isnum(p.get("link"))]
    if diagonal:
        xs, ys = xs + [0.0], ys + [0.0]
    lo_x, hi_x = (min(xs), max(xs)) if xs else (0.0, 1.0)
    lo_y, hi_y = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if diagonal:
        lo_x = lo_y = min(lo_x, lo_y)
        hi_x = hi_y = max(hi_x, hi_y)
    pad_x = (hi_x - lo_x) * 0.08 or (0.5 if log_x else 1.0)
    pad_y = (hi_y - lo_y) * 0.08 or 1.0
    lo_x, hi_x, lo_y, hi_y = lo_x - pad_x, hi_x + pad_x, lo_y - pad_y, hi_y + pad_y
    w, h, ml, mr, mt, mb = 640.0, 400.0, 64.0, 16.0, 30.0, 92.0
    pw, ph = w - ml - mr, h - mt - mb

    def X(v: float) -> float:
        return ml + (tx(v) - lo_x) / (hi_x - lo_x) * pw

    def Y(v: float) -> float:
        return mt + ph - (v - lo_y) / (hi_y - lo_y) * ph

    parts = [_text(ml, 18, title, size=12, weight="600"),
             f"<rect x='{ml}' y='{mt}' width='{pw}' height='{ph}' fill='none' stroke='#ccc'/>"]
    for vx in (log_ticks(lo_x, hi_x) if log_x else ticks(lo_x, hi_x)):
        parts.append(f"<line x1='{X(vx):.1f}' y1='{mt}' x2='{X(vx):.1f}' y2='{mt + ph}' stroke='#f0f0f0'/>")
        parts.append(_text(X(vx), mt + ph + 14, fmt_x(vx), size=10, anchor="middle"))
    for vy in ticks(lo_y, hi_y):
        parts.append(f"<line x1='{ml}' y1='{Y(vy):.1f}' x2='{ml + pw}' y2='{Y(vy):.1f}' stroke='#f0f0f0'/>")
        parts.append(_text(ml - 4, Y(vy) + 3, fmt_y(vy), size=10, anchor="end"))
    parts.append(_text(ml + pw / 2, mt + ph + 32, xlabel + (" (log scale)" if log_x else ""), size=11,
                       anchor="middle"))
    parts.append(_text(14, mt + ph / 2, ylabel, size=11, anchor="middle", rotate=-90))
    if diagonal:
        a, b = (10.0 ** lo_x, 10.0 ** hi_x) if log_x else (lo_x, hi_x)
        parts.append(f"<line x1='{X(a):.1f}' y1='{Y(a):.1f}' x2='{X(b):.1f}' y2='{Y(b):.1f}' "
                     f"stroke='#999' stroke-dasharray='4 3'><title>measured = predicted</title></line>")
    legend_x = ml
    for si, s in enumerate(series):
        col = s.get("colour") or _COLOURS[si % len(_COLOURS)]
        cls = f" class='{esc(s['cls'])}'" if s.get("cls") else ""
        marker = s.get("marker", "circle")
        good = [p for p in s["points"] if drawn(p)]
        if s.get("line") and len(good) > 1:
            d = " ".join(f"{X(float(p['x'])):.1f},{Y(float(p['y'])):.1f}" for p in good)
            tip = f"><title>{esc(s['tip'])}</title></polyline>" if s.get("tip") else "/>"
            parts.append(f"<polyline{cls} points='{d}' fill='none' stroke='{col}' stroke-width='1.6'{tip}")
        for p in good if marker != "none" else ():
            x, y = X(float(p["x"])), Y(float(p["y"]))
            tip = str(p.get("tip") or f"{s['name']}: ({fmt_x(p['x'])}, {fmt_y(p['y'])})")
            err = p.get("xerr")
            bar = ""
            if err:
                bar = (f"<line x1='{X(float(p['x']) + err[0]):.1f}' y1='{y:.1f}' x2='{X(float(p['x']) + err[1]):.1f}' "
                       f"y2='{y:.1f}' stroke='{col}' stroke-opacity='.35' stroke-width='4'/>")
            if _isnum(p.get("link")):
                bar += (f"<line x1='{x:.1f}' y1='{Y(float(p['link'])):.1f}' x2='{x:.1f}' y2='{y:.1f}' "
                        f"stroke='{col}' stroke-width='1.2' stroke-dasharray='3 2'/>")
            unit = f" data-unit='{esc(p['unit'])}'" if p.get("unit") else ""
            parts.append(f"<g{cls} data-tip='{esc(tip)}'{unit}>{bar}{_marker(marker, x, y, col)}"
                         f"<title>{esc(tip)}</title></g>")
            if p.get("label"):
                parts.append(_text(x + 6, y - 6, str(p["label"]), size=9))
        # the legend, under the plot
        row_y = mt + ph + 52 + 16 * (si // 3)
        lx = legend_x + 200 * (si % 3)
        key = (f"<line x1='{lx:.1f}' y1='{row_y - 4:.1f}' x2='{lx + 10:.1f}' y2='{row_y - 4:.1f}' stroke='{col}' "
               f"stroke-width='2'/>" if marker == "none" else
               f"<rect x='{lx:.1f}' y='{row_y - 9:.1f}' width='10' height='10' fill='{col}'/>"
               if marker == "circle" else _marker(marker, lx + 5, row_y - 4, col, 0.7))
        parts.append(key + _text(lx + 14, row_y, str(s["name"])[:34], size=10))
    height = max(h, mt + ph + 60 + 16 * ((len(series) - 1) // 3 + 1))
    return _svg(w, height, parts, title)
