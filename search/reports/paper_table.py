"""The paper table: rows = methods, columns = Full/SMIC/CASME II/SAMM x UF1/UAR, with our numbers
under the `paper` protocol and leak-free beside each other, and the published rows marked.

    python -m search paper-table [--out DIR] [--interval std|ci95] [--method LABEL=RUN_ID ...]

Rows:
- published (hard-coded, marked `published`; never rerun here): the HTNet paper and STSTNet
  (its PyTorch reference, final epoch; the full composite only).
- ours, from MLflow rerun parent runs (`python -m search rerun`, tag htnet.role=rerun): the
  newest finished rerun per htnet.method ("HTNet (best found)", "HTNet (paper config)",
  "STSTNet", ...), or the runs named with --method. Each gives two rows: `paper` (the epoch
  with the best test accuracy per subject, as the HTNet reference: leaks the test subject) and
  the leak-free protocol (`inner`, or `final` when the rerun did not run the inner protocol),
  each cell mean ± std over the seeds (or the 95% t-interval with --interval ci95).
- nested LOSO (`python -m search nested`, htnet.role=nested), newest per method: the unbiased
  estimate of "search + HTNet" (one estimate, no seeds).

Written as Markdown, LaTeX (booktabs) and CSV (numbers), printed, saved under --out, and logged
as artifacts of an MLflow run tagged htnet.role=paper_table.
"""
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from htnet.errors import UserError
from search import tracking
from search.reports.export import latex_table, markdown_table
from search.reports.leaderboard import DATASET_COLUMNS, open_store

METRICS = tuple((key, name, m) for key, name in DATASET_COLUMNS for m in ("uf1", "uar"))
COLUMNS = tuple(f"{name} {m.upper()}" for _, name, m in METRICS)

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
PROTOCOL_NOTES = {
    "paper": "paper: per subject, the epoch with the best test accuracy (the HTNet reference's "
             "protocol; it looks at the test subject, so it is optimistic)",
    "inner": "inner: leak-free; the epoch is chosen on validation subjects held out of each fold's "
             "training subjects",
    "final": "final: the last epoch (leak-free)"}


def _family(method):
    text = method.lower()
    return 0 if "htnet" in text else 1 if "ststnet" in text else 2


def _within(row):
    method = row["method"].lower()
    if row["kind"] == "published":
        return 0
    if "paper config" in method:
        return 1
    if "best found" in method:
        return 2
    if row["kind"] == "nested":
        return 3
    return 4


def _run_rows(run, kind, method=None):
    """Rows (paper + leak-free protocol) of a rerun or nested parent run."""
    metrics, tags = run.data.metrics, run.data.tags
    method = method or tags.get("htnet.method", run.info.run_name)
    suffix = "_mean" if kind == "rerun" else ""
    leak_free = "inner" if f"inner_full_uf1{suffix}" in metrics else "final"
    n = int(metrics.get("n_seeds", 0)) if kind == "rerun" else int(metrics.get("nested_outer_folds", 0))
    source = f"ours, {n} seed{'s' if n != 1 else ''}" if kind == "rerun" else \
        f"ours, nested LOSO ({n} outer folds)"
    rows = []
    for protocol in ("paper", leak_free):
        if f"{protocol}_full_uf1{suffix}" not in metrics:
            continue
        row = {"method": method, "protocol": protocol, "source": source, "kind": kind, "n": n,
               "run_id": run.info.run_id}
        for (key, name, m), column in zip(METRICS, COLUMNS):
            base = f"{protocol}_{key}_{m}"
            row[column] = metrics.get(f"{base}{suffix}", np.nan)
            row[f"{column} std"] = metrics.get(f"{base}_std", np.nan) if kind == "rerun" else np.nan
            row[f"{column} ci95_low"] = metrics.get(f"{base}_ci95_low", np.nan) if kind == "rerun" else np.nan
            row[f"{column} ci95_high"] = metrics.get(f"{base}_ci95_high", np.nan) if kind == "rerun" else np.nan
        rows.append(row)
    return rows


def _published_rows():
    rows = []
    for entry in PUBLISHED:
        row = {"method": entry["method"], "protocol": entry["protocol"], "source": entry["source"],
               "kind": "published", "n": np.nan, "run_id": ""}
        for (key, name, m), column in zip(METRICS, COLUMNS):
            pair = entry["values"].get(key)
            row[column] = pair[0 if m == "uf1" else 1] if pair else np.nan
            row[f"{column} std"] = row[f"{column} ci95_low"] = row[f"{column} ci95_high"] = np.nan
        rows.append(row)
    return rows


def newest_by_method(store, role):
    runs = tracking.search_runs(store.client, store.experiment_id,
                                f"tags.`htnet.role` = '{role}' and attributes.status = 'FINISHED'")
    newest = {}
    for run in runs:
        method = run.data.tags.get("htnet.method")
        if method and (method not in newest or run.info.start_time > newest[method].info.start_time):
            newest[method] = run
    return newest


def collect(store, methods=None, nested=True):
    """The numeric table (one row per method and protocol) and the missing expected methods.

    methods: {label: run_id} picks these runs (rerun or nested parents) instead of the newest."""
    picked = {}
    if methods:
        for label, run_id in methods.items():
            try:
                run = tracking.retry(store.client.get_run, run_id)
            except Exception:  # noqa: BLE001
                raise UserError(f"--method {label}={run_id}: no such MLflow run") from None
            role = run.data.tags.get("htnet.role")
            if role not in ("rerun", "nested"):
                raise UserError(f"--method {label}={run_id}: run is not a rerun or nested parent (role {role})")
            picked[label] = (run, role)
    else:
        picked.update({m: (r, "rerun") for m, r in newest_by_method(store, "rerun").items()})
        if nested:
            picked.update({m: (r, "nested") for m, r in newest_by_method(store, "nested").items()})
    rows = _published_rows()
    for label, (run, role) in picked.items():
        rows += _run_rows(run, role, label)
    table = pd.DataFrame(rows)
    table["_family"] = table["method"].map(_family)
    table["_within"] = table.apply(_within, axis=1)
    table["_protocol"] = table["protocol"].map({"paper": 0, "inner": 1, "final": 2})
    table = (table.sort_values(["_family", "_within", "method", "_protocol"], kind="mergesort")
             .drop(columns=["_family", "_within", "_protocol"]).reset_index(drop=True))
    missing = [m for m in EXPECTED if m not in picked] if not methods else []
    return table, missing


def cell(row, column, interval, latex=False):
    mean = row[column]
    if pd.isna(mean):
        return ""
    pm = r"$\pm$" if latex else "±"
    text = f"{mean:.4f}"
    if interval == "std" and pd.notna(row[f"{column} std"]):
        text += f" {pm} {row[f'{column} std']:.4f}"
    elif interval == "ci95" and pd.notna(row[f"{column} ci95_low"]):
        text += f" [{row[f'{column} ci95_low']:.4f}, {row[f'{column} ci95_high']:.4f}]"
    return text


def display(table, interval="std", latex=False):
    rows = []
    for _, row in table.iterrows():
        method = row["method"] + (" *" if row["kind"] == "published" else "")
        rows.append({"Method": method, "Protocol": row["protocol"], "Source": row["source"],
                     **{c: cell(row, c, interval, latex) for c in COLUMNS}})
    return pd.DataFrame(rows, columns=["Method", "Protocol", "Source", *COLUMNS])


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
    for protocol in ("paper", "inner", "final"):
        if (table["protocol"] == protocol).any():
            lines.append(PROTOCOL_NOTES[protocol] + ".")
    if table["method"].str.contains("best found").any():
        lines.append("(best found): the configuration was selected by a search on these same subjects, "
                     "so even its leak-free numbers are optimistic; nested LOSO gives the unbiased "
                     "estimate of search + model.")
    return lines


def render(table, interval="std"):
    """{'md': Markdown, 'tex': LaTeX, 'csv': numbers} texts of the table."""
    note_lines = notes(table, interval)
    md = ("Table: micro-expression recognition under LOSO on the composite set (3 classes).\n\n"
          + markdown_table(display(table, interval), align={"Method": "l", "Protocol": "l", "Source": "l",
                                                         **dict.fromkeys(COLUMNS, "r")})
          + "\n" + "\n".join(f"- {line}" for line in note_lines) + "\n")
    shown = display(table, interval, latex=True)
    shown.columns = ["Method", "Protocol", "Source", *(["UF1", "UAR"] * len(DATASET_COLUMNS))]
    groups = [("", 3), *((name, 2) for _, name in DATASET_COLUMNS)]
    tex = latex_table(shown, header_groups=groups, column_format="lll" + "c" * len(COLUMNS),
                      caption="Micro-expression recognition under LOSO on the composite set (3 classes)",
                      label="tab:htnet-loso", notes=note_lines,
                      raw_columns=[c for c in shown.columns if c in ("UF1", "UAR")])
    csv = table.to_csv(index=False)
    return {"md": md, "tex": tex, "csv": csv}


def paper_table(tracking_uri=None, experiment="htnet", methods=None, interval="std", nested=True,
                out_dir=None, log=True, out=None):
    """Build, print, save and log the paper table; returns a dict with table, texts, run_id."""
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
        from htnet.io import atomic_write, ensure_writable_dir

        folder = ensure_writable_dir(out_dir)
        for ext, text in texts.items():
            with atomic_write(folder / f"paper_table.{ext}") as f:
                f.write(text)
            written.append(folder / f"paper_table.{ext}")
        print(f"written: {', '.join(str(p) for p in written)}", file=out)
    run_id = None
    if log:
        client = store.client
        sources = ",".join(sorted(set(r for r in table["run_id"] if r)))
        run = tracking.retry(client.create_run, store.experiment_id,
                             tags={"htnet.role": "paper_table", "htnet.sources": sources[:5000],
                                   "htnet.interval": interval, "mlflow.runName": "paper-table"},
                             run_name="paper-table")
        run_id = run.info.run_id
        folder = Path(tempfile.mkdtemp(prefix="htnet-paper-table-"))
        try:
            for ext, text in texts.items():
                (folder / f"paper_table.{ext}").write_text(text)
            tracking.retry(client.log_artifacts, run_id, str(folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        tracking.retry(client.set_terminated, run_id, "FINISHED")
        print(f"MLflow: paper table logged as artifacts of run {run_id}", file=out)
    return {"table": table, "texts": texts, "run_id": run_id, "missing": missing, "written": written}
