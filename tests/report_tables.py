"""Readers of the tables search.reports.export writes (Markdown pipe tables, booktabs LaTeX): the tests parse
exactly what the writers write."""
import re

import pandas as pd

from search.reports.export import LATEX_SPECIAL

LATEX_UNESCAPE = re.compile("|".join(re.escape(v) for v in sorted(LATEX_SPECIAL.values(), key=len, reverse=True)))


def read_markdown_table(text):
    """The first pipe table in `text` -> DataFrame of strings (empty cells -> NaN)."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        raise ValueError("no Markdown pipe table found")
    lines = [line[1:-1] if line.endswith("|") and not line.endswith(r"\|") else line[1:] for line in lines]
    cells = [[c.strip().replace(r"\|", "|") for c in re.split(r"(?<!\\)\|", line)] for line in lines]
    return pd.DataFrame(cells[2:], columns=cells[0], dtype=object).replace("", float("nan"))


def read_latex_table(text):
    """The tabular `latex_table` writes -> DataFrame of strings (the last header row names the columns)."""
    lines = [line.strip() for line in text.splitlines()]
    try:
        top, mid, bottom = lines.index(r"\toprule"), lines.index(r"\midrule"), lines.index(r"\bottomrule")
    except ValueError:
        raise ValueError("no booktabs tabular (\\toprule/\\midrule/\\bottomrule) found") from None
    unescape = {v: k for k, v in LATEX_SPECIAL.items()}
    rows = [[LATEX_UNESCAPE.sub(lambda m: unescape[m.group(0)], c.strip())
             for c in re.split(r"(?<!\\)&", line.removesuffix(r"\\"))]
            for line in lines[top + 1:bottom] if line.endswith(r"\\")]
    header = len([line for line in lines[top + 1:mid] if line.endswith(r"\\")])
    return pd.DataFrame(rows[header:], columns=rows[header - 1], dtype=object).replace("", float("nan"))
