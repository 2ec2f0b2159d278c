"""The several-images results as CSV and JSON files to download, kept for an hour."""

import csv
import json
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path


class Exports:
    """Writes each export into a private temporary folder, removing the files older than an hour as it goes, and the
    folder itself when the app exits (or the `Exports` is collected)."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="fashion-hf-exports-"))
        weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)

    def write(self, rows: list[dict], table: list[list], headers: list[str]) -> tuple[str, str]:
        """The CSV (`headers` and `table`) and JSON (`rows`) files' paths."""
        cutoff = time.time() - 3600
        for old in self.folder.glob("*"):
            if old.stat().st_mtime < cutoff:
                old.unlink(missing_ok=True)
        stem = self.folder / f"fashion-tags-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
        with open(f"{stem}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(headers)
            writer.writerows([[csv_cell(value) for value in row] for row in table])
        Path(f"{stem}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        return f"{stem}.csv", f"{stem}.json"


def csv_cell(value):
    """Spreadsheets run cells that start with = + - @ as formulas: user file names must not."""
    return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@") else value
