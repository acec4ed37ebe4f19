"""The corpus's quality over time: what the score stage (vasa/stages/score.py) kept, corrected and rejected, run
by run of scheduled retraining (flows/retrain.py), and a weekly report of it.

Each retraining run that re-runs the pipeline records `quality` in data/retrain/runs/<run>.json: the clips of
the score table by status and the rejected ones by reason (every split: the corpus, not only what trains),
with the number of clips that run added. The clips are re-scored by that week's judges, so a week's figures
describe the whole corpus as judged then, not only its new clips.

    quality.csv   one row per ISO week (the week's last run): week, run, clips, added, ok, corrected, and one
                  column per rejection reason
    quality.png   the same as stacked bars per week: kept (ok, corrected) and rejected by reason
"""

from __future__ import annotations

import csv
import datetime
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from vasa.core.errors import InputError
from vasa.core.files import atomic_path
from vasa.loaders.scores import CORRECTED, OK, REASONS, REJECTED

QUALITY_CSV, QUALITY_PNG = "quality.csv", "quality.png"
KEPT = (OK, CORRECTED)


def table_quality(path: Path) -> dict:
    """Counts of a score table: clips, by status, rejected by reason (REASONS order)."""
    try:
        rows = pq.read_table(path, columns=["status", "reason"]).to_pylist()
    except FileNotFoundError:
        raise InputError(f"{path}: no score table (is `score` among the stages retrain.targets runs?)") from None
    status = Counter(r["status"] for r in rows)
    reasons = Counter(r["reason"] for r in rows if r["status"] == REJECTED)
    return {
        "clips": len(rows),
        **{s: status[s] for s in (OK, CORRECTED, REJECTED)},
        "rejected_by_reason": {reason: reasons[reason] for reason in REASONS if reasons[reason]},
    }


def weekly(records: list[dict]) -> list[dict]:
    """One row per ISO week with a run that recorded `quality`: the week's last run's counts, in week order."""
    last: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: r["started"]):
        if record.get("quality"):
            year, number, _ = datetime.datetime.fromisoformat(record["started"]).isocalendar()
            last[f"{year}-W{number:02d}"] = record
    rows = []
    for week, record in sorted(last.items()):
        q = record["quality"]
        rows.append(
            {"week": week, "run": record["run"], "clips": q["clips"], "added": q.get("added"), OK: q[OK],
             CORRECTED: q[CORRECTED]} | {reason: q["rejected_by_reason"].get(reason, 0) for reason in REASONS}
        )  # fmt: skip
    return rows


def read_records(runs: Path) -> list[dict]:
    """Every run record in `runs` (unreadable files skipped: a record being written is not a report's concern)."""
    found = []
    for path in sorted(runs.glob("*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


def write_report(rows: list[dict], folder: Path) -> None:
    """quality.csv and quality.png in `folder` (atomically; the plot has no time stamp in its metadata)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = ["week", "run", "clips", "added", OK, CORRECTED, *REASONS]
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / QUALITY_CSV) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    figure, axes = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 2), 3.6))
    weeks = [r["week"] for r in rows]
    bottom = [0] * len(rows)
    for column in (*KEPT, *REASONS):
        values = [r[column] for r in rows]
        if not any(values):
            continue
        label = f"kept: {column}" if column in KEPT else f"rejected: {column}"
        axes.bar(weeks, values, bottom=bottom, label=label, hatch="" if column in KEPT else "//")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes.set_ylabel("clips (score table)")
    axes.set_title("corpus quality per week\n(the week's last retraining run)", fontsize=9)
    axes.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    with atomic_path(folder / QUALITY_PNG) as tmp:
        figure.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(figure)
