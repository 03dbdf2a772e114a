"""Evaluation pictures drawn on the server as inline SVG: per-class bars with their intervals, and a
confusion matrix. Plain SVG attributes only (no style attributes, no script), so the page's content
security policy holds and the pictures show with JavaScript off."""

from __future__ import annotations

from markupsafe import Markup, escape

ACCENT = "#7a2e6e"
INK = "#1d2330"
LINE = "#dde1e8"
LABEL_PX = 210
# Longer class names are cut in the picture; the full name is in each shape's tooltip and the JSON.
LABEL_CHARS = 20
ROW_PX = 22
BAR_PX = 320
CELL_PX = 34


def _short(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "\u2026"


def _text(x: float, y: float, content: object, anchor: str = "start", size: int = 12, fill: str = INK) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}" '
        f'font-family="system-ui, sans-serif">{escape(str(content))}</text>'
    )


def class_bars(per_class: list[dict], metric: str) -> Markup:
    """One horizontal bar per class for ``metric`` (0..1), with its 95 % interval as a whisker."""
    width = LABEL_PX + BAR_PX + 60
    height = ROW_PX * len(per_class) + 24
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(metric)} per class">'
    ]
    for row, entry in enumerate(per_class):
        figure = entry.get(metric) or {}
        value = float(figure.get("value", 0.0))
        y = row * ROW_PX + 4
        parts.append(_text(LABEL_PX - 8, y + 14, f"{_short(entry['label'])} (n={entry['n']})", anchor="end"))
        parts.append(f'<rect x="{LABEL_PX}" y="{y + 3}" width="{BAR_PX}" height="{ROW_PX - 8}" fill="{LINE}"/>')
        parts.append(
            f'<rect class="class-bar" x="{LABEL_PX}" y="{y + 3}" width="{value * BAR_PX:.1f}" height="{ROW_PX - 8}" '
            f'fill="{ACCENT}"><title>{escape(entry["label"])}: {value:.3f}</title></rect>'
        )
        if "low" in figure:
            low, high = LABEL_PX + figure["low"] * BAR_PX, LABEL_PX + figure["high"] * BAR_PX
            mid = y + ROW_PX / 2
            parts.append(f'<line x1="{low:.1f}" y1="{mid:.1f}" x2="{high:.1f}" y2="{mid:.1f}" stroke="{INK}"/>')
            for x in (low, high):
                parts.append(f'<line x1="{x:.1f}" y1="{mid - 4:.1f}" x2="{x:.1f}" y2="{mid + 4:.1f}" stroke="{INK}"/>')
        parts.append(_text(LABEL_PX + BAR_PX + 6, y + 14, f"{value:.3f}"))
    axis_y = ROW_PX * len(per_class) + 18
    for tick in (0, 0.5, 1):
        parts.append(_text(LABEL_PX + tick * BAR_PX, axis_y, tick, anchor="middle", size=10))
    parts.append("</svg>")
    return Markup("".join(parts))


def _shade(fraction: float) -> str:
    # White to the accent purple, by the share of the true class's queries in the cell.
    base = (0x7A, 0x2E, 0x6E)
    r, g, b = (round(255 - (255 - c) * fraction) for c in base)
    return f"#{r:02x}{g:02x}{b:02x}"


def confusion_matrix(labels: list[str], matrix: list[list[int]]) -> Markup:
    """Rows are the true classes, columns the predictions (last: none); cells shaded by row share."""
    columns = [*labels, "none"] if matrix and len(matrix[0]) > len(labels) else list(labels)
    if matrix and not any(row[-1] for row in matrix) and columns[-1] == "none":
        columns = columns[:-1]  # nobody went without a prediction: no empty column
    # Room above the grid for the column names, written at 45 degrees (about 6.5 px per character).
    left, top = LABEL_PX, 24 + round(6.5 * 0.71 * max(len(_short(name)) for name in columns))
    width = left + CELL_PX * len(columns) + 10
    height = top + CELL_PX * len(labels) + 10
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="confusion matrix">',
        _text(left - 8, top - 8, "true \u2193 / predicted \u2192", anchor="end", size=10),
    ]
    for c, name in enumerate(columns):
        x = left + c * CELL_PX + CELL_PX / 2
        parts.append(
            f'<text x="{x:.1f}" y="{top - 6}" font-size="11" fill="{INK}" font-family="system-ui, sans-serif" '
            f'transform="rotate(-45 {x:.1f} {top - 6})">{escape(_short(name))}</text>'
        )
    for r, (name, row) in enumerate(zip(labels, matrix, strict=True)):
        total = sum(row) or 1
        y = top + r * CELL_PX
        parts.append(_text(left - 8, y + CELL_PX / 2 + 4, _short(name), anchor="end"))
        for c in range(len(columns)):
            share = row[c] / total
            parts.append(
                f'<rect class="confusion-cell" x="{left + c * CELL_PX}" y="{y}" width="{CELL_PX}" height="{CELL_PX}" '
                f'fill="{_shade(share)}" stroke="{LINE}"><title>{escape(name)} \u2192 {escape(columns[c])}: '
                f"{row[c]}</title></rect>"
            )
            colour = "#ffffff" if share > 0.55 else INK
            parts.append(_text(left + c * CELL_PX + CELL_PX / 2, y + CELL_PX / 2 + 4, row[c], "middle", 11, colour))
    parts.append("</svg>")
    return Markup("".join(parts))
