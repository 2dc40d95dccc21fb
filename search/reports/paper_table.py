"""`python -m search paper-table`: published rows beside our reruns and nested LOSO, under the paper protocol
and leak-free, as Markdown, LaTeX and CSV (printed, saved, logged to MLflow). Each of our rows states its data,
epochs and seeds; rows on other data than the published ones' are refused unless --allow-mixed (then marked)."""
import sys

import numpy as np
import pandas as pd

from htnet.errors import UserError
from htnet.io import ensure_writable_dir, write_files
from htnet.metrics import PROTOCOLS
from search import tracking
from search.reports.export import latex_table, markdown_table, plural
from search.reports.leaderboard import DATASET_COLUMNS, METRIC_COLUMNS, METRICS, config_of_run, get_run, open_store
from search.reports.rerun import format_interval
from search.reports.sources import PRESETS, changed_label, changed_settings
from search.reports.stats import MIN_SEEDS

STATS = ("", " std", " ci95_low", " ci95_high")  # the CSV's columns of a metric: a rerun's _mean, _std, _ci95_*
FACTS = ["kind", "n", "epochs", "data", "fingerprint", "subjects", "samples", "published_data", "run_id", "commit"]
CSV_COLUMNS = ["method", "protocol", "source", *FACTS, *(f"{c}{s}" for c in METRIC_COLUMNS for s in STATS)]
ROLES = ("rerun", "nested")
PUBLISHED_MARK, MIXED_MARK = "*", "†"

# Published reference numbers: copied from the publications, not reproduced here. Their data: the composite
# release of CASME II (145 samples, 24 subjects), SMIC (164, 16) and SAMM (133, 28).
PUBLISHED = (  # values: {dataset: (UF1, UAR)}
    {"method": "HTNet", "protocol": "paper", "source": "published (HTNet paper)", "values": {
        "full": (0.8603, 0.8475), "smic": (0.8049, 0.7905), "casme2": (0.9532, 0.9516), "samm": (0.8131, 0.8124)}},
    {"method": "STSTNet", "protocol": "final", "source": "published (STSTNet, PyTorch, final epoch)",
     "values": {"full": (0.7209, 0.7250)}},
    # MEGC2019 composite rows as the HTNet paper's Table 2 gives them (see BASELINES_NOTE)
    {"method": "OFF-ApexNet", "protocol": "final", "source": "published (MEGC2019 composite, epoch choice not stated)",
     "values": {"full": (0.7196, 0.7096), "smic": (0.6817, 0.6695), "casme2": (0.8764, 0.8681),
                "samm": (0.5409, 0.5392)}},
    {"method": "Dual-Inception", "protocol": "inner", "source": "published (MEGC2019 composite; its code: epoch of "
     "lowest validation loss)", "values": {
        "full": (0.7322, 0.7278), "smic": (0.6645, 0.6726), "casme2": (0.8621, 0.8560), "samm": (0.5868, 0.5663)}},
)
BASELINES_NOTE = ("OFF-ApexNet and Dual-Inception: their MEGC2019 composite rows as Table 2 of the HTNet paper (Wang "
                  "et al., arXiv 2307.14637) gives them; OFF-ApexNet's are also Table III of the STSTNet paper "
                  "(Liong et al., FG 2019), Dual-Inception's full row also its own abstract (Zhou et al., FG 2019). "
                  "The sources used state no epoch choice for OFF-ApexNet (its row stands under final); "
                  "Dual-Inception's released code keeps the epoch of lowest validation loss on held-out subjects "
                  "(its row stands under inner).")
PUBLISHED_DATA = {"subjects": 68, "samples": 442}
PUBLISHED_TEXT = "the composite: 68 subjects, 442 samples"
EXPECTED = {"HTNet (best found)": "python -m search rerun --best SEARCH --param model=htnet",
            **{label: f"python -m search rerun --preset {name} --data RELEASE" for name, (_, label) in PRESETS.items()}}
# every method gets a row per protocol (PROTOCOLS' order); one its run lacks says so, never another in its place
NOT_RUN, NOT_PUBLISHED = "not run", "not published"
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
        PROTOCOLS.index(row["protocol"])


def facts(store, run, label=None):
    """What the table states of a rerun or nested parent: method (a preset's label only with its settings), kind,
    n (seeds; outer folds), epochs, data (htnet.data_source, or 'unknown'), its counts, whether it is the published
    data, the commit; and the run."""
    tags, kind = run.data.tags, run.data.tags.get("htnet.role")
    label = label or tags.get("htnet.method") or run.info.run_id[:8]
    if settings := next((settings for settings, name in PRESETS.values() if name == label), None):
        label = changed_label(label, changed_settings(settings, config_of_run(store, run)))  # only its own settings
    n = int(run.data.metrics.get("n_seeds" if kind == "rerun" else "nested_outer_folds", 0))
    subjects, samples = (int(t) if str(t).isdigit() else None for t in (tags.get("htnet.data_subjects"),
                                                                        tags.get("htnet.data_samples")))
    if kind == "nested" and subjects is not None and n < subjects:  # failed outer folds: fewer subjects pooled
        subjects, samples = n, None
    data = tags.get("htnet.data_source", "unknown")
    published = data not in ("synthetic", "unknown") and (subjects, samples) == tuple(PUBLISHED_DATA.values())
    return {"run": run, "method": label, "kind": kind, "n": n, "data": data,
            "epochs": run.data.params.get("epochs", "unknown"),   # a nested run's: 'searched' or its configs'
            "fingerprint": tags.get("htnet.data_fingerprint", "unknown"), "subjects": subjects, "samples": samples,
            "published_data": published,
            "run_id": run.info.run_id, "commit": tags.get("mlflow.source.git.commit", "unknown")[:12]
            + (" (dirty)" if tags.get("htnet.git_dirty") == "true" else "")}


def counts_text(subjects, samples):
    return ", ".join(plural(int(v), k) for k, v in (("subject", subjects), ("sample", samples)) if pd.notna(v))


def data_text(f):
    return f"data {f['data']}" + "".join(f" ({text})" for text in [counts_text(f["subjects"], f["samples"])] if text)


def run_text(f):
    what = plural(f["n"], "seed" if f["kind"] == "rerun" else "outer fold")
    return f"run {f['run_id']} ({what}, {f['epochs']} epochs, {data_text(f)})"


def choose(store, picks=None, nested=True, allow_mixed=False):
    """({label: facts} of our rows, lines on how they were chosen); picks {label: run_id} name every row, else the
    rule: per method, the finished run with the most seeds on the published data (or first), the newest of those."""
    chosen = {}
    for label, run_id in (picks or {}).items():
        run = get_run(store, run_id, f"--rerun {label}={run_id}: no such MLflow run")
        if (role := run.data.tags.get("htnet.role")) not in ROLES:
            raise UserError(f"--rerun {label}={run_id}: run is not a rerun or nested parent (role {role})")
        chosen[label] = f = facts(store, run, label)
        if not (f["published_data"] or allow_mixed):
            raise UserError(f"--rerun {label}={run_id}: ran on {data_text(f)}, not the published "
                            f"data ({PUBLISHED_TEXT}); pass --allow-mixed to include it, marked {MIXED_MARK}")
    if picks:
        return chosen, ["rows: the runs named by --rerun: " + "; ".join(f"{label} = {run_text(f)}"
                                                                        for label, f in chosen.items())]
    found = [facts(store, tracking.retry(store.client.get_run, run_id))
             for role in (ROLES if nested else ROLES[:1])
             for run_id in tracking.runs(store.client, store.experiment_id,
                                         f"tags.`htnet.role` = '{role}' and attributes.status = 'FINISHED'")["run_id"]]
    by_label, left_out = {}, []
    for f in sorted(found, key=lambda f: (not f["published_data"], -f["n"], -f["run"].info.start_time)):
        by_label.setdefault(f["method"], []).append(f)
    for label, ranked in by_label.items():
        if usable := [f for f in ranked if f["published_data"] or allow_mixed]:
            chosen[label] = usable[0]
        else:
            left_out.append(f"left out {label!r}: {plural(len(ranked), 'finished run')} not on the published data "
                            f"(the best by the rule: {run_text(ranked[0])}); --allow-mixed includes "
                            f"{'it' if len(ranked) == 1 else 'them'}, marked {MIXED_MARK}")
    rule = (f"per method, the finished rerun (or nested LOSO run){'' if allow_mixed else ' on the published data'} "
            f"with the most seeds (outer folds), {'those on the published data first, ' if allow_mixed else ''}"
            f"the newest of those")
    return chosen, [f"rows ({rule}; `--rerun METHOD=RUN_ID` chooses): "
                    + ("; ".join(f"{label} = {run_text(f)}" for label, f in chosen.items()) or "none"), *left_out]


def _run_rows(f):
    """A row per protocol of a rerun (mean; from MIN_SEEDS seeds the std and the interval it logged) or of a nested
    parent (one estimate); a protocol it did not run is marked so."""
    metrics, rerun = f["run"].data.metrics, f["kind"] == "rerun"
    epochs = plural(int(f["epochs"]), "epoch") if str(f["epochs"]).isdigit() else f"epochs {f['epochs']}"
    source = f"ours, {plural(f['n'], 'seed')}, {epochs}" if rerun else \
        f"ours, nested LOSO ({plural(f['n'], 'outer fold')}), {epochs}"
    suffixes = {s: s.replace(" ", "_") or ("_mean" if rerun else "")  # std and interval: a rerun of MIN_SEEDS seeds
                for s in STATS if not s or rerun and f["n"] >= MIN_SEEDS}
    return [{"method": f["method"], "protocol": p, **{k: f[k] for k in FACTS},
             "source": source if f"{p}_full_uf1{suffixes['']}" in metrics else NOT_RUN,
             **{f"{column}{s}": metrics.get(f"{p}_{key}_{m}{suffix}", np.nan)
                for key, column, m in METRICS for s, suffix in suffixes.items()}} for p in PROTOCOLS]


def collect(store, picks=None, nested=True, allow_mixed=False):
    """(a row per method and protocol, the expected methods missing, the lines on how the rows were chosen)."""
    chosen, lines = choose(store, picks, nested, allow_mixed)
    rows = [{"method": p["method"], "source": NOT_PUBLISHED, "kind": "published", "data": "composite",
             **PUBLISHED_DATA, "published_data": True, "run_id": "", "protocol": protocol}
            for p in PUBLISHED for protocol in PROTOCOLS]
    published = {(p["method"], p["protocol"]): p for p in PUBLISHED}
    for row in rows:
        if p := published.get((row["method"], row["protocol"])):
            row.update(source=p["source"], **{c: p["values"][key][("uf1", "uar").index(m)] for key, c, m in METRICS
                                              if key in p["values"]})
    rows += [row for f in chosen.values() for row in _run_rows(f)]
    table = pd.DataFrame(sorted(rows, key=_order)).reindex(columns=CSV_COLUMNS)
    return table, [m for m in EXPECTED if m not in chosen] if not picks else [], lines


def notes(table, interval):
    ours = table[table["kind"] != "published"]
    spread = {"std": "mean ± standard deviation over the seeds",
              "ci95": "mean [95% bootstrap interval: 10,000 replicates, each resampling the subjects (within each "
                      "source dataset) and the seeds, percentile]", "none": "mean over the seeds"}[interval]
    built = [f"Built from code at commit {commit} on data {data} ({fingerprint}"
             + "".join(f"; {text}" for text in [counts_text(subjects, samples)] if text)
             + f"): {', '.join(dict.fromkeys(rows['method']))}."
             for (commit, data, fingerprint, subjects, samples), rows in
             ours.groupby(["commit", "data", "fingerprint", "subjects", "samples"], dropna=False, sort=True)]
    return [f"Rows marked {PUBLISHED_MARK}: published numbers, copied from the publications (not rerun here); "
            f"STSTNet publishes the full composite only. Their data: the composite release (CASME II 145 samples "
            f"of 24 subjects, SMIC 164 of 16, SAMM 133 of 28: 442 samples, 68 subjects).", BASELINES_NOTE,
            *([f"Rows marked {MIXED_MARK}: not on the published data (see Data), so not comparable with the "
               f"published rows."] if not ours["published_data"].astype(bool).all() else []),
            *([f"Ours: {spread}" + (f"; with fewer than {MIN_SEEDS} seeds, the mean only." if interval != "none"
                                    else ".")] if (ours["kind"] == "rerun").any() else []),
            *(["Nested LOSO: the whole search ran inside every outer fold on its training subjects only; one "
               "estimate pooled over the outer folds (no interval), unbiased for search + model."]
              if (ours["kind"] == "nested").any() else []),
            *(PROTOCOL_NOTES[p] + "." for p in PROTOCOLS if (table["protocol"] == p).any()),
            f"Every method has a row per protocol, in the order {', '.join(PROTOCOLS)}; '{NOT_RUN}' and "
            f"'{NOT_PUBLISHED}' rows have no numbers.", *built,
            *(["(best found): the configuration was selected by a search on these same subjects, so every "
               "protocol's number is optimistic, the leak-free ones too; nested LOSO gives the unbiased estimate "
               "of search + model."] if table["method"].str.contains("best found").any() else [])]


def render(table, interval="std", chosen_lines=()):
    """{'md': Markdown, 'tex': LaTeX, 'csv': numbers} of the table (published rows marked *, other data †)."""
    style = {"std": "std", "ci95": "ci"}.get(interval, "mean")  # beside each mean: std, interval or nothing
    records = table.to_dict("records")
    cells = {c: [format_interval({s.strip() or "mean": r[f"{c}{s}"] for s in STATS}, style) for r in records]
             for c in METRIC_COLUMNS}
    marks = [f" {PUBLISHED_MARK}" if r["kind"] == "published" else "" if r["published_data"] else f" {MIXED_MARK}"
             for r in records]
    data = [f"{r['data']}, {plural(int(r['subjects']), 'subject')}" if pd.notna(r["subjects"]) else r["data"]
            for r in records]
    shown = pd.DataFrame({"Method": table["method"] + marks, "Protocol": table["protocol"], "Source": table["source"],
                          "Data": data, **cells})
    note_lines = notes(table, interval)
    caption = "Micro-expression recognition under LOSO on the composite set (442 samples, 68 subjects; 3 classes)" \
        if table["published_data"].astype(bool).all() else \
        f"Micro-expression recognition under LOSO (3 classes); rows marked {MIXED_MARK} are not on the composite set"
    # a note starting with '*' after the list's '- ' would be a nested list: Markdown gets '\*'
    md = (f"Table: {caption}.\n\n" + markdown_table(shown, align=dict.fromkeys(METRIC_COLUMNS, "r")) + "\n"
          + "".join(f"- {line}\n".replace("*", r"\*") for line in note_lines)
          + "".join(f"\n{line}\n" for line in chosen_lines))
    shown.columns = ["Method", "Protocol", "Source", "Data", *(["UF1", "UAR"] * len(DATASET_COLUMNS))]
    tex = latex_table(shown, header_groups=[("", 4), *((name, 2) for _, name in DATASET_COLUMNS)],
                      column_format="llll" + "c" * len(METRIC_COLUMNS), notes=note_lines, label="tab:htnet-loso",
                      caption=caption)
    return {"md": md, "tex": tex, "csv": table.to_csv(index=False)}


def paper_table(tracking_uri=None, experiment="htnet", picks=None, interval="std", nested=True, allow_mixed=False,
                out_dir=None, log=True, out=None):
    """Build, print, save and log the paper table; returns a dict: table, texts, run_id, missing, written."""
    out = out or sys.stdout
    store = open_store(tracking_uri, experiment, create=log)
    table, missing, lines = collect(store, picks, nested, allow_mixed)
    texts = render(table, interval, lines[:1])
    print(texts["md"], file=out)
    for line in lines[1:]:
        print(line, file=out)
    for method in missing:
        print(f"missing row {method!r}: run `{EXPECTED[method]}`", file=out)
    written = []
    if out_dir:
        folder = ensure_writable_dir(out_dir)
        written = [folder / f"paper_table.{ext}" for ext in texts]
        write_files(dict(zip(written, texts.values())))
        print(f"written: {', '.join(map(str, written))}", file=out)
    run_id = None
    if log:
        client, sources = store.client, ",".join(sorted({r for r in table["run_id"] if r}))
        tags = {"htnet.role": "paper_table", "htnet.sources": sources[:5000], "htnet.interval": interval,
                "htnet.allow_mixed": str(allow_mixed).lower(), **tracking.provenance_tags(tracking.provenance())}
        run_id = tracking.retry(client.create_run, store.experiment_id, tags=tags, run_name="paper-table").info.run_id
        for ext, text in texts.items():
            tracking.retry(client.log_text, run_id, text, f"paper_table.{ext}")
        tracking.retry(client.set_terminated, run_id, "FINISHED")
        print(f"MLflow: paper table logged as artifacts of run {run_id}", file=out)
    return {"table": table, "texts": texts, "run_id": run_id, "missing": missing, "written": written}
