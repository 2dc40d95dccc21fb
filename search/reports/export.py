"""Tables to Markdown (GitHub pipe tables) and LaTeX (booktabs); cells are text (`format_numbers`). Not
Styler.to_latex: it draws no \\cmidrule under the paper table's grouped headers (tests/report_tables.py reads both)."""
import re

import pandas as pd

LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                 "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "±": r"$\pm$", "†": r"\dag{}"}
NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def format_numbers(table, fixed=None):
    """A copy with float columns as text (NaN -> ""): `fixed` columns (default: all) with 4 decimals, the others
    with 6 significant digits (parameters such as lr 5e-05)."""
    out = table.copy()
    for column in out.columns[[pd.api.types.is_float_dtype(t) for t in out.dtypes]]:
        spec = ".4f" if fixed is None or column in fixed else ".6g"
        out[column] = out[column].map(lambda v, spec=spec: "" if pd.isna(v) else format(v, spec)).astype(object)
    return out


def plural(count, word):
    return f"{count} {word}{'' if count == 1 else 's'}"


def _texts(table):
    return [["" if pd.api.types.is_scalar(v) and pd.isna(v) else str(v) for v in row]
            for row in table.itertuples(index=False)]


def _numeric(rows, i):
    return all(r[i] == "" or NUMBER.match(r[i].strip()) for r in rows)


def markdown_table(table, align=None):
    """A GitHub pipe table; align: {column: 'l'|'r'|'c'} (default: numbers right, text left)."""
    columns, rows = [str(c) for c in table.columns], _texts(table)
    kinds = [(align or {}).get(c) or ("r" if any(r[i] for r in rows) and _numeric(rows, i) else "l")
             for i, c in enumerate(columns)]
    rules = [{"l": ":---", "r": "---:", "c": ":---:"}[kind] for kind in kinds]
    return "".join("| " + " | ".join(c.replace("|", r"\|").replace("\n", " ") for c in line) + " |\n"
                   for line in [columns, rules, *rows])


def latex_escape(text):
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def latex_table(table, header_groups=None, column_format=None, caption=None, label=None, notes=None):
    """A booktabs tabular, in a table float when a caption is given. header_groups: [(text, span), ...] over all
    columns, a first header row with \\cmidrule under the named groups; notes: lines under it (footnotesize)."""
    rows, body = _texts(table), []
    column_format = column_format or "".join("r" if _numeric(rows, i) else "l" for i in range(len(table.columns)))
    if header_groups:
        cells, rules, start = [], [], 1
        for text, span in header_groups:
            cells.append(latex_escape(text) if span == 1 else rf"\multicolumn{{{span}}}{{c}}{{{latex_escape(text)}}}")
            rules += [rf"\cmidrule(lr){{{start}-{start + span - 1}}}"] if text and span > 1 else []
            start += span
        body += [" & ".join(cells) + r" \\", *([" ".join(rules)] if rules else [])]
    body += [" & ".join(map(latex_escape, table.columns)) + r" \\", r"\midrule"]
    body += [" & ".join(map(latex_escape, row)) + r" \\" for row in rows]
    lines = [rf"\begin{{tabular}}{{{column_format}}}", r"\toprule", *body, r"\bottomrule", r"\end{tabular}"]
    if notes:
        lines += [r"\par\smallskip", r"{\footnotesize " + r" \\ ".join(map(latex_escape, notes)) + "}"]
    if caption is not None:
        lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}",
                 *([rf"\label{{{label}}}"] if label else []), *lines, r"\end{table}"]
    return "\n".join(lines) + "\n"
