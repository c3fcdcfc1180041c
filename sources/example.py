"""A data source of your own: copy this file, change the class, and name it in params.yaml:

    data:
      dataset: sources.example:CsvSource
      kwargs: {csv: labels/train.csv}    # its constructor's keywords
      image_size: 32                     # when the images differ in size

This one reads a CSV file of `path,label` rows, each path relative to the CSV's folder. The
contract (reprolab/data/sources.py): a `name` of its own (its raw folder and the default
registered model name, without ':' or '/'); `fetch(dest, options)` puts the raw files into the
folder `dest`; `read(raw, options)` returns the class names and, for each split the data comes
with ("train" always; "val" and "test" when it has official ones), a callable yielding chunks of
uint8 images N x C x H x W and int64 labels. fetch hashes every file into the manifest and
preprocess checks them before `read`, as for the built-in datasets.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from reprolab.data.sources import Images, Options, whole

INDEX = "index.csv"  # the CSV, as fetch copies it into the raw folder


class CsvSource:
    def __init__(self, csv: str = "labels.csv"):
        self.csv = Path(csv)
        self.name = f"csv-{self.csv.stem}"

    def rows(self, csv_file: Path) -> list[tuple[str, str]]:
        with open(csv_file, newline="") as fh:
            return [(row[0], row[1]) for row in csv.reader(fh) if row and row[0] != "path"]

    def fetch(self, dest: Path, options: Options) -> dict[str, str]:
        """Copy the CSV and every image it names into the raw folder (DVC versions them)."""
        for path, _ in self.rows(self.csv):
            target = dest / path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.csv.parent / path, target)
        shutil.copyfile(self.csv, dest / INDEX)
        return {}

    def read(self, raw: Path, options: Options) -> Images:
        from reprolab.data.imagefolder import decode_files

        rows = self.rows(raw / INDEX)
        classes = sorted({label for _, label in rows})
        files = [(raw / path, classes.index(label)) for path, label in rows]
        x, y, skipped = decode_files(files, raw, options.channels, options.image_size,
                                     options.skip_bad_images, options.max_image_pixels)
        return Images(classes, {"train": whole(x, y)}, skipped)
