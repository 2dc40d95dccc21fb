"""Tables to CSV, Markdown (GitHub pipe tables) and LaTeX (booktabs), and back.

Written here rather than with `DataFrame.to_markdown` (needs the optional `tabulate`) or
`DataFrame.to_latex` (Styler, jinja2): the paper table needs grouped column headers and
footnotes, and the readers below parse exactly what the writers write (the tests round-trip).
Cells are text: format numbers first (`format_numbers`). Missing values are empty cells.
"""
import math
import re

import pandas as pd

LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                 "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "±": r"$\pm$"}
LATEX_UNESCAPE = {v: k for k, v in LATEX_SPECIAL.items()}


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return str(value)


def format_numbers(table, digits=4, fixed=None):
    """A copy with float columns as text (NaN -> empty): `fixed` columns (default: all) with
    `digits` decimals, the others with 6 significant digits (parameters such as lr 5e-05)."""
    out = table.copy()
    for column in out.columns:
        series = out[column]
        if pd.api.types.is_float_dtype(series):
            spec = f".{digits}f" if fixed is None or column in fixed else ".6g"
            out[column] = series.map(lambda v, spec=spec: "" if pd.isna(v) else format(v, spec)).astype(object)
    return out


# ----------------------------------------------------------------------------- Markdown

def _md_escape(text):
    return text.replace("|", r"\|").replace("\n", " ")


def markdown_table(table, align=None):
    """A GitHub pipe table; align: {column: 'l'|'r'|'c'} (numbers right-aligned by default)."""
    columns = [str(c) for c in table.columns]
    rows = [[_md_escape(_cell(v)) for v in row] for row in table.itertuples(index=False)]
    align = align or {}

    def rule(i, column):
        kind = align.get(column)
        if kind is None:
            values = [r[i] for r in rows if r[i] != ""]
            kind = "r" if values and all(_is_number_text(v) for v in values) else "l"
        return {"l": ":---", "r": "---:", "c": ":---:"}[kind]

    lines = ["| " + " | ".join(_md_escape(c) for c in columns) + " |",
             "| " + " | ".join(rule(i, c) for i, c in enumerate(columns)) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _is_number_text(text):
    return bool(_NUMBER.match(text.strip()))


def _split_pipes(line):
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith(r"\|"):
        line = line[:-1]
    cells = re.split(r"(?<!\\)\|", line)
    return [c.strip().replace(r"\|", "|") for c in cells]


def read_markdown_table(text):
    """The first pipe table in `text` -> DataFrame of strings (empty cells -> NaN)."""
    lines = [line for line in text.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        raise ValueError("no Markdown pipe table found")
    header = _split_pipes(lines[0])
    rows = [_split_pipes(line) for line in lines[2:]]
    frame = pd.DataFrame(rows, columns=header, dtype=object)
    return frame.replace("", float("nan"))


# ----------------------------------------------------------------------------- LaTeX

def latex_escape(text):
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def latex_unescape(text):
    pattern = re.compile("|".join(re.escape(k) for k in sorted(LATEX_UNESCAPE, key=len, reverse=True)))
    return pattern.sub(lambda m: LATEX_UNESCAPE[m.group(0)], text)


def latex_table(table, header_groups=None, column_format=None, caption=None, label=None,
                notes=None, raw_columns=(), escape=True):
    """A booktabs tabular (in a table float when a caption is given).

    header_groups: [(text, span), ...] over all columns, a first header row with
    \\multicolumn cells and \\cmidrule under the named groups. raw_columns: columns whose cells are
    LaTeX already (not escaped). notes: lines under the table (footnotesize)."""
    columns = [str(c) for c in table.columns]
    if column_format is None:
        column_format = "".join(
            "r" if table[c].map(_cell).map(lambda v: v == "" or _is_number_text(v)).all() else "l"
            for c in table.columns)
    body = []
    if header_groups:
        cells, rules, start = [], [], 1
        for text, span in header_groups:
            cells.append(latex_escape(text) if span == 1 else
                         rf"\multicolumn{{{span}}}{{c}}{{{latex_escape(text)}}}")
            if text and span > 1:
                rules.append(rf"\cmidrule(lr){{{start}-{start + span - 1}}}")
            start += span
        body.append(" & ".join(cells) + r" \\")
        if rules:
            body.append(" ".join(rules))
    body.append(" & ".join(latex_escape(c) for c in columns) + r" \\")
    body.append(r"\midrule")
    for row in table.itertuples(index=False):
        cells = []
        for column, value in zip(table.columns, row):
            text = _cell(value)
            cells.append(text if (column in raw_columns or not escape) else latex_escape(text))
        body.append(" & ".join(cells) + r" \\")
    lines = [rf"\begin{{tabular}}{{{column_format}}}", r"\toprule", *body, r"\bottomrule", r"\end{tabular}"]
    if notes:
        lines += [r"\par\smallskip", r"{\footnotesize " + r" \\ ".join(latex_escape(n) for n in notes) + "}"]
    if caption is not None:
        lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}",
                 *([rf"\label{{{label}}}"] if label else []), *lines, r"\end{table}"]
    return "\n".join(lines) + "\n"


def _split_latex_row(line):
    line = line.strip()
    if line.endswith(r"\\"):
        line = line[:-2]
    return [c.strip() for c in re.split(r"(?<!\\)&", line)]


def read_latex_table(text, raw=False):
    """The tabular written by `latex_table` -> DataFrame of strings (the last header row names
    the columns; empty cells -> NaN). raw: leave cells LaTeX-escaped."""
    lines = [line.strip() for line in text.splitlines()]
    try:
        top, mid, bottom = lines.index(r"\toprule"), lines.index(r"\midrule"), lines.index(r"\bottomrule")
    except ValueError:
        raise ValueError("no booktabs tabular (\\toprule/\\midrule/\\bottomrule) found") from None
    header_lines = [line for line in lines[top + 1:mid] if line.endswith(r"\\")]
    header = [latex_unescape(c) for c in _split_latex_row(header_lines[-1])]
    rows = []
    for line in lines[mid + 1:bottom]:
        if not line.endswith(r"\\"):
            continue
        cells = _split_latex_row(line)
        rows.append(cells if raw else [latex_unescape(c) for c in cells])
    return pd.DataFrame(rows, columns=header, dtype=object).replace("", float("nan"))
