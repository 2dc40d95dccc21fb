"""Ways to break a copy of a release folder, shared by test_data.py (library errors) and
test_bad_input.py (command-line errors)."""
import pandas as pd

from htnet.data.release import CSV_NAME, IMAGE_DIR


def edit_csv(root, change):
    table = pd.read_csv(root / CSV_NAME, dtype=str)
    change(table)
    table.to_csv(root / CSV_NAME, index=False)


def drop_label_column(root):
    edit_csv(root, lambda t: t.pop("label"))


def set_label_7(root):
    """Row 5 of the CSV (index 3; the header is row 1) gets label 7."""
    edit_csv(root, lambda t: t.__setitem__("label", t["label"].where(t.index != 3, "7")))


def duplicate_sample(root):
    """The second row becomes a copy of the first row's sample id."""
    def change(table):
        table.loc[1, ["sub", "filename_o"]] = table.loc[0, ["sub", "filename_o"]].to_numpy()
    edit_csv(root, change)


def first_png(root):
    return sorted((root / IMAGE_DIR).glob("*.png"))[0]
