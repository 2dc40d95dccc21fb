"""`python -m search paper-table`: published rows beside our reruns and nested LOSO, under the paper protocol
and leak-free, as Markdown, LaTeX and CSV (printed, saved, logged to MLflow)."""
import sys

import numpy as np
import pandas as pd

from htnet.errors import UserError
from search import tracking
from search.reports.export import latex_table, markdown_table
from search.reports.leaderboard import DATASET_COLUMNS, METRIC_COLUMNS, METRICS, open_store
from search.reports.rerun import format_interval, get_run

STATS = ("std", "ci95_low", "ci95_high")  # beside each column's mean in the numbers (CSV)
CSV_COLUMNS = ["method", "protocol", "source", "kind", "n", "run_id", "commit", "data",
               *(f"{c}{s}" for c in METRIC_COLUMNS for s in ("", *(f" {stat}" for stat in STATS)))]

# Published reference numbers: copied from the publications, not reproduced here.
PUBLISHED = (
    {"method": "HTNet", "protocol": "paper", "source": "published (HTNet paper)",
     "values": {"full": (0.8603, 0.8475), "smic": (0.8049, 0.7905), "casme2": (0.9532, 0.9516),
                "samm": (0.8131, 0.8124)}},
    {"method": "STSTNet", "protocol": "final", "source": "published (STSTNet, PyTorch, final epoch)",
     "values": {"full": (0.7209, 0.7250)}},
)
EXPECTED = {"HTNet (best found)": "python -m search rerun --best SEARCH",
            "HTNet (paper config)": "python -m search rerun --preset htnet-paper",
            "STSTNet": "python -m search rerun --preset ststnet"}
PROTOCOL_ORDER = {"paper": 0, "inner": 1, "final": 2}
PROTOCOL_NOTES = {
    "paper": "paper: per subject, the epoch with the best test accuracy (the HTNet reference's "
             "protocol; it looks at the test subject, so it is optimistic)",
    "inner": "inner: leak-free; the epoch is chosen on validation subjects held out of each fold's "
             "training subjects",
    "final": "final: the last epoch (leak-free)"}


def _order(row):
    """HTNet rows, then STSTNet, then others; in each, published, paper config, best found, nested, the rest."""
    method = row["method"].lower()
    within = 0 if row["kind"] == "published" else 1 if "paper config" in method else \
        2 if "best found" in method else 3 if row["kind"] == "nested" else 4
    return (0 if "htnet" in method else 1 if "ststnet" in method else 2), within, row["method"], \
        PROTOCOL_ORDER[row["protocol"]]


def _run_rows(run, kind, method):
    """The paper and leak-free (inner, else final) rows of a rerun parent (mean over seeds, std, t-interval)
    or a nested parent (one estimate)."""
    metrics, mean = run.data.metrics, "_mean" if kind == "rerun" else ""
    n = int(metrics.get("n_seeds" if kind == "rerun" else "nested_outer_folds", 0))
    source = f"ours, {n} seed{'s' if n != 1 else ''}" if kind == "rerun" else f"ours, nested LOSO ({n} outer folds)"
    suffixes = [("", mean), *((f" {stat}", f"_{stat}") for stat in STATS if kind == "rerun")]  # (column, metric)
    leak_free = "inner" if f"inner_full_uf1{mean}" in metrics else "final"
    tags = run.data.tags
    commit = tags.get("mlflow.source.git.commit", "unknown")[:12]
    commit += " (dirty)" if tags.get("htnet.git_dirty") == "true" else ""
    return [{"method": method, "protocol": p, "source": source, "kind": kind, "n": n, "run_id": run.info.run_id,
             "commit": commit, "data": tags.get("htnet.data_fingerprint", "unknown"),
             **{column + text: metrics.get(f"{p}_{key}_{m}{suffix}", np.nan)
                for key, column, m in METRICS for text, suffix in suffixes}}
            for p in ("paper", leak_free) if f"{p}_full_uf1{mean}" in metrics]


def collect(store, methods=None, nested=True):
    """The numbers (a row per method and protocol) and the expected methods missing. methods: {label:
    run_id} of rerun or nested parents, instead of the newest finished one per htnet.method."""
    picked = {}
    for label, run_id in (methods or {}).items():
        run = get_run(store, run_id, f"--method {label}={run_id}: no such MLflow run")
        role = run.data.tags.get("htnet.role")
        if role not in ("rerun", "nested"):
            raise UserError(f"--method {label}={run_id}: run is not a rerun or nested parent (role {role})")
        picked[label] = (run, role)
    for role in () if methods else ("rerun", "nested") if nested else ("rerun",):
        newest = tracking.newest_run_ids(store.client, store.experiment_id,
                                         f"tags.`htnet.role` = '{role}' and attributes.status = 'FINISHED'",
                                         "htnet.method")
        picked.update({m: (tracking.retry(store.client.get_run, r), role) for m, r in newest.items()})
    rows = [{"method": p["method"], "protocol": p["protocol"], "source": p["source"], "kind": "published",
             "n": np.nan, "run_id": "", **{c: p["values"][key][0 if m == "uf1" else 1]
                                           for key, c, m in METRICS if key in p["values"]}}
            for p in PUBLISHED]
    rows += [row for label, (run, role) in picked.items() for row in _run_rows(run, role, label)]
    table = pd.DataFrame(sorted(rows, key=_order)).reindex(columns=CSV_COLUMNS)
    return table, [m for m in EXPECTED if m not in picked] if not methods else []


def notes(table, interval):
    spread = {"std": "mean ± standard deviation over the seeds", "ci95": "mean [95% t-interval] over the seeds",
              "none": "mean over the seeds"}[interval]
    lines = ["* published numbers, copied from the publications (not rerun here); "
             "STSTNet publishes the full composite only."]
    if (table["kind"] == "rerun").any():
        lines.append(f"Ours: {spread}.")
    if (table["kind"] == "nested").any():
        lines.append("Nested LOSO: the whole search ran inside every outer fold on its training subjects "
                     "only; one estimate pooled over the outer folds, unbiased for search + model.")
    lines += [PROTOCOL_NOTES[p] + "." for p in PROTOCOL_ORDER if (table["protocol"] == p).any()]
    ours = table[table["kind"] != "published"]
    for (commit, data), rows in ours.groupby(["commit", "data"], dropna=False, sort=True):
        lines.append(f"Built from code at commit {commit} on data {data}: {', '.join(dict.fromkeys(rows['method']))}.")
    if table["method"].str.contains("best found").any():
        lines.append("(best found): the configuration was selected by a search on these same subjects, "
                     "so even its leak-free numbers are optimistic; nested LOSO gives the unbiased "
                     "estimate of search + model.")
    return lines


def render(table, interval="std"):
    """{'md': Markdown, 'tex': LaTeX, 'csv': numbers} texts of the table (published methods starred)."""
    style = {"std": "std", "ci95": "ci"}.get(interval, "mean")  # beside each mean: std, t-interval or nothing
    cells = {c: [format_interval({"mean": r[c], "std": r[f"{c} std"], "ci_low": r[f"{c} ci95_low"],
                                  "ci_high": r[f"{c} ci95_high"]}, style) for r in table.to_dict("records")]
             for c in METRIC_COLUMNS}
    shown = pd.DataFrame({"Method": table["method"] + np.where(table["kind"] == "published", " *", ""),
                          "Protocol": table["protocol"], "Source": table["source"], **cells})
    note_lines = notes(table, interval)
    align = {"Method": "l", "Protocol": "l", "Source": "l", **dict.fromkeys(METRIC_COLUMNS, "r")}
    md = ("Table: micro-expression recognition under LOSO on the composite set (3 classes).\n\n"
          + markdown_table(shown, align=align)
          + "\n" + "\n".join(f"- {line}" for line in note_lines) + "\n")
    shown.columns = ["Method", "Protocol", "Source", *(["UF1", "UAR"] * len(DATASET_COLUMNS))]
    tex = latex_table(shown, header_groups=[("", 3), *((name, 2) for _, name in DATASET_COLUMNS)],
                      column_format="lll" + "c" * len(METRIC_COLUMNS), notes=note_lines, label="tab:htnet-loso",
                      caption="Micro-expression recognition under LOSO on the composite set (3 classes)")
    return {"md": md, "tex": tex, "csv": table.to_csv(index=False)}


def paper_table(tracking_uri=None, experiment="htnet", methods=None, interval="std", nested=True,
                out_dir=None, log=True, out=None):
    """Build, print, save and log the paper table; returns a dict: table, texts, run_id, missing, written."""
    out = out or sys.stdout
    if interval not in ("std", "ci95", "none"):
        raise UserError(f"--interval must be std, ci95 or none, got {interval!r}")
    store = open_store(tracking_uri, experiment, create=log)
    table, missing = collect(store, methods, nested)
    texts = render(table, interval)
    print(texts["md"], file=out)
    for method in missing:
        print(f"missing row {method!r}: run `{EXPECTED[method]}`", file=out)
    written = []
    if out_dir:
        from htnet.io import ensure_writable_dir, write_files

        folder = ensure_writable_dir(out_dir)
        written = [folder / f"paper_table.{ext}" for ext in texts]
        write_files(dict(zip(written, texts.values())))
        print(f"written: {', '.join(map(str, written))}", file=out)
    run_id = None
    if log:
        client, sources = store.client, ",".join(sorted({r for r in table["run_id"] if r}))
        tags = {"htnet.role": "paper_table", "htnet.sources": sources[:5000], "htnet.interval": interval,
                **tracking.provenance_tags(tracking.provenance())}
        run_id = tracking.retry(client.create_run, store.experiment_id, tags=tags, run_name="paper-table").info.run_id
        for ext, text in texts.items():
            tracking.retry(client.log_text, run_id, text, f"paper_table.{ext}")
        tracking.retry(client.set_terminated, run_id, "FINISHED")
        print(f"MLflow: paper table logged as artifacts of run {run_id}", file=out)
    return {"table": table, "texts": texts, "run_id": run_id, "missing": missing, "written": written}
