"""The PNGs a trial and a search log: readable axes, and a legend that hides no bar."""
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg

from search.reports.plots import per_subject_bars
from search.tracking.figures import learning_curve_png


def test_learning_curve_labels_both_axes_of_both_panels(tmp_path):
    history = pd.DataFrame([(s, run, epoch, 1.0 / epoch, 0.5, 0.4) for s in ("s1", "s2")
                            for run in ("main", "inner") for epoch in (1, 2, 3)],
                           columns=["subject", "run", "epoch", "train_loss", "test_acc", "val_uf1"])
    figure = learning_curve_png(history, tmp_path / "curve.png", title="t")
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in figure.axes)


def test_per_subject_bars_legend_overlaps_no_bar():
    """Every subject fully right (bars to the top of the axes), two datasets, three protocols."""
    rows = [(f"{d}{i}", d, p, label, label) for d in ("casme2", "samm") for i in range(8)
            for p in ("paper", "final", "inner") for label in (0, 1, 2)]
    predictions = pd.DataFrame(rows, columns=["subject", "dataset", "protocol", "label", "prediction"])
    figure = per_subject_bars(predictions, "title")
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)  # lays it out as saved
    [ax] = figure.axes
    [legend] = figure.legends
    box = legend.get_window_extent(renderer)
    bars = [patch.get_window_extent(renderer) for patch in ax.patches]
    assert len(bars) == 16 * 3 and all(bar.height > 0 for bar in bars)
    assert not any(box.overlaps(bar) for bar in bars)
    assert not box.overlaps(ax.get_window_extent(renderer))
