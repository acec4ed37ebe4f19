"""Scheduled retraining, the decisions (flows/retrain.py runs them): what changed in the source data since
the promoted bundle, whether a new bundle passes the promotion gate, and the registry tags it gets.

Promotion follows the DVC model registry (GTO) conventions for the dvc.yaml artifact, so `gto show`, DVC
Studio and `dvc artifacts get` see the promoted versions: an annotated tag `<artifact>@vX.Y.Z` registers
the commit whose dvc.lock built the bundle, and `<artifact>#<stage>#N` assigns it to a stage (N counts
assignments). The bundle's bytes are in the DVC remote (`dvc push`), addressed by that dvc.lock.
"""

from __future__ import annotations

import json
import math
import operator
import re
from pathlib import Path

from vasa.core.config import RetrainGateConfig

# Manifest columns whose change makes a clip "changed" (new media bytes, licence, split or usability).
DIFF_COLUMNS = ("sha256", "licence", "split", "status", "speaker_id")
LIST_LIMIT = 50  # clip ids listed per kind of change in a record (counts are always complete)
OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq, "!=": operator.ne}
PROMOTED, REFUSED, UNCHANGED = "promoted", "refused", "unchanged"


def manifest_diff(old: list[dict] | None, new: list[dict]) -> dict:
    """Clips added, removed and changed (DIFF_COLUMNS) between two manifests' rows, by clip id. With no old
    manifest (nothing promoted yet) every clip is added."""
    before = {row["clip_id"]: row for row in old or []}
    after = {row["clip_id"]: row for row in new}
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    changed = sorted(
        c for c in after.keys() & before.keys() if any(after[c].get(k) != before[c].get(k) for k in DIFF_COLUMNS)
    )
    return {
        "baseline": old is not None,
        "counts": {"added": len(added), "removed": len(removed), "changed": len(changed), "clips": len(after)},
        "added": added[:LIST_LIMIT],
        "removed": removed[:LIST_LIMIT],
        "changed": changed[:LIST_LIMIT],
    }


def has_changes(diff: dict) -> bool:
    counts = diff["counts"]
    return not diff["baseline"] or bool(counts["added"] or counts["removed"] or counts["changed"])


def lookup(payload: object, key: str) -> object:
    """The value at dotted `key`; a `*` part matches any key (the first match in the file's order).
    Raises KeyError naming the part that is missing."""
    head, _, rest = key.partition(".")
    if not isinstance(payload, dict):
        raise KeyError(head)
    candidates = list(payload) if head == "*" else [head]
    for name in candidates:
        if name in payload:
            try:
                return payload[name] if not rest else lookup(payload[name], rest)
            except KeyError:
                if head != "*":
                    raise
    raise KeyError(head)


def check_gate(root: Path, gate: tuple[RetrainGateConfig, ...]) -> list[dict]:
    """Each condition with the value found and whether it holds; a missing file, a missing key or a value
    that is not a finite number (or flag) fails its condition, with the reason."""
    results = []
    for condition in gate:
        result = condition.model_dump() | {"found": None, "passed": False, "reason": None}
        path = Path(root) / condition.file
        try:
            found = lookup(json.loads(path.read_text()), condition.key)
        except FileNotFoundError:
            result["reason"] = f"{condition.file} missing"
        except json.JSONDecodeError as err:
            result["reason"] = f"{condition.file} is not JSON: {err}"
        except KeyError as err:
            result["reason"] = f"{condition.file} has no {condition.key} ({err.args[0]!r} missing)"
        else:
            result["found"] = found
            if not isinstance(found, bool | int | float) or (isinstance(found, float) and not math.isfinite(found)):
                result["reason"] = f"{condition.key} = {found!r} is not a finite number or flag"
            else:
                result["passed"] = bool(OPS[condition.op](found, condition.value))
                if not result["passed"]:
                    result["reason"] = f"{condition.key} = {found!r}, needs {condition.op} {condition.value!r}"
        results.append(result)
    return results


def gate_reason(results: list[dict]) -> str | None:
    """One line naming every failed condition, or None when all passed."""
    failed = [f"{r['file']}: {r['reason']}" for r in results if not r["passed"]]
    return "; ".join(failed) if failed else None


def next_tags(tags: list[str], artifact: str, stage: str) -> tuple[str, str]:
    """The next registry tags: version `<artifact>@vX.(Y+1).0` (v1.0.0 first) and stage assignment
    `<artifact>#<stage>#N` (N = assignments so far + 1), from the repository's existing tags."""
    versions = [
        tuple(int(x) for x in m.groups())
        for t in tags
        if (m := re.fullmatch(rf"{re.escape(artifact)}@v(\d+)\.(\d+)\.(\d+)", t))
    ]
    major, minor, _ = max(versions) if versions else (1, -1, 0)
    assignments = [t for t in tags if re.fullmatch(rf"{re.escape(artifact)}#{re.escape(stage)}#\d+", t)]
    return f"{artifact}@v{major}.{minor + 1}.0", f"{artifact}#{stage}#{len(assignments) + 1}"
