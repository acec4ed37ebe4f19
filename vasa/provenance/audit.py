"""Provenance audit (`vasa audit`): which clips, speakers and licences went into a model, verified.

Follows the lineage in a bundle's (or a stage output's) `model.json` back to its data and refuses to
describe any other data than the model saw: the shards' index.json, the ingest manifest and (when
given) the motion shards' index.json and dvc.lock must have the digests the model recorded, or the
audit raises InputError naming the file that does not match. Then every sample of the shards is
listed (sample keys from the tar member names only: nothing is decoded) and joined to its manifest
row, and every clip or segment left out (failures.parquet) is listed as excluded with its reason. With
the score table the model was trained with (`scores`, checked against the digest the model recorded), the
train clips its filters rejected are excluded too (status `filtered`, the filter as reason), and audit.json
`score_filters` / audit.md "Score filters" count how many clips each filter removed.

    croissant.json  Croissant 1.1 JSON-LD of the shards (vasa/provenance/croissant.py), validated with mlcroissant
    clips.parquet   one row per sample (a face segment of a clip) or left-out clip/segment:
                    key, clip_id, split, used_for (train | evaluation | excluded), shard, speaker,
                    source, URL / YouTube id / media path, licence, media sha256, duration, reason
    audit.json      target digest, lineage checks, processing steps (code digest, packages, params
                    and dvc.lock outputs of each stage), counts by speaker, split and licence
    audit.md        the same for a reader: licence table, counts by speaker and split, exclusions

The model trains on the train split only; val and test samples are `evaluation`. Outputs are sorted,
carry no time stamps and are written atomically (audit.json last), so the same inputs give the same
bytes.

With a takedown denylist (preprocessing/denylist.py) every request is checked against the samples the
model saw: `absent`, or `PRESENT` (an error: the outputs are written as evidence, then AuditError).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from preprocessing import denylist as takedown
from preprocessing import schema
from preprocessing.ingest import manifest as ingest_manifest
from preprocessing.shards import read_shard
from vasa.core.digests import sha256_file
from vasa.core.errors import InputError
from vasa.core.files import atomic_path, read_json, write_json
from vasa.loaders import scores as score_table
from vasa.provenance import croissant
from vasa.provenance import history as dvc_history

# vasa.training.checkpoint's file name, not imported from there: that module loads torch (2.4 s of the
# audit's 2.8 s start-up), and an audit reads files and hashes bytes only. tests/test_audit.py checks both agree.
MODEL_JSON = "model.json"

AUDIT_FORMAT, AUDIT_VERSION = "vasa-audit", 1
CLIPS_FILE, AUDIT_JSON, AUDIT_MD = "clips.parquet", "audit.json", "audit.md"
TRAIN_USE, EVAL_USE, EXCLUDED = "train", "evaluation", "excluded"
USES = (TRAIN_USE, EVAL_USE, EXCLUDED)
OK, MISMATCH, SKIPPED = "ok", "mismatch", "skipped"
# Pipeline order of the stages whose settings and dvc.lock outputs the report lists.
STAGES = (
    "sample",
    "ingest",
    "preprocess",
    "train_judges",
    "score",
    "train_latent",
    "extract_motion",
    "train_motion",
    "export",
)
# Bundle model.json blocks that hold the settings the bundle was exported with (normalisation is
# statistics, not settings; lineage and weights are reported separately).
BUNDLE_SETTINGS = ("face_latent", "motion_dit", "audio", "crop", "fps", "sampling")
MD_LIST = 100  # excluded clips listed by name in audit.md (all of them are in clips.parquet)
CLIP_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # sample key `<clip key>_<segment>`, or the failure row's key
        ("clip_id", pa.string()),
        ("split", pa.string()),
        ("used_for", pa.string()),  # USES
        ("shard", pa.string()),  # tar file name; null when excluded
        ("speaker_id", pa.string()),
        ("source_kind", pa.string()),
        ("source_url", pa.string()),
        ("youtube_id", pa.string()),
        ("media_path", pa.string()),  # relative to the manifest's folder
        ("licence", pa.string()),
        ("media_sha256", pa.string()),
        ("duration_s", pa.float64()),  # of the whole source clip
        ("status", pa.string()),  # failure status when excluded
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


@dataclass(frozen=True)
class Check:
    """One lineage check: the digest the model recorded against the one found on disk."""

    name: str
    file: str
    expected: str | None
    found: str | None
    status: str  # OK | MISMATCH | SKIPPED

    def describe(self) -> str:
        return f"{self.file} ({self.name}): recorded {_short(self.expected)}, found {_short(self.found)}"


@dataclass
class AuditReport:
    """What `audit` found: the checks (all ok or skipped), one row per sample or exclusion, audit.json."""

    checks: list[Check]
    rows: list[dict]
    summary: dict = field(default_factory=dict)
    shards: Path | None = None  # described in croissant.json by write_report
    manifest: Path | None = None


class TakedownPresentError(InputError):
    """A taken-down speaker, video or clip is among the samples the audited model saw."""


ABSENT, PRESENT = "absent", "PRESENT"


def audit(
    target: Path,
    shards: Path,
    manifest: Path,
    dvc_lock: Path | None = None,
    motion: Path | None = None,
    verify_content: bool = False,
    denylist: takedown.Denylist | None = None,
    history: Path | None = None,
    scores: Path | None = None,
) -> AuditReport:
    """Audit `target` (a bundle or a train-latent/train-motion `model/` folder) against the shards'
    folder, the ingest manifest and optionally dvc.lock and the motion shards' folder. Raises
    InputError naming every file whose digest differs from the recorded one.

    Shard tars are checked against their stats.json (size; with `verify_content` also the digest of
    their members' bytes, and motion tars against the sha256 in the motion index), which reads every
    byte of the data: off by default. With `denylist`, each request is reported absent or PRESENT; with
    `history` (the git checkout whose dvc.lock built the target) also for every earlier bundle of its
    history, from the DVC cache (vasa/provenance/history.py). With `scores` (the score table the model
    recorded), the train clips it rejected are excluded rows with their filter as reason."""
    meta = _read_json(target / MODEL_JSON, "model.json")
    lineage = target_lineage(meta, target, motion)
    checks = _weight_checks(target, meta)
    index = _read_json(shards / schema.INDEX_FILE, "shards index")
    checks.append(_digest_check("shards index", shards / schema.INDEX_FILE, lineage["index_sha256"]))
    manifest_expected = lineage.get("manifest_sha256") or (index.get("dataset") or {}).get("manifest_sha256")
    if not Path(manifest).is_file():
        raise InputError(f"manifest not found: {manifest}")
    checks.append(_digest_check("ingest manifest", manifest, manifest_expected))
    checks += _motion_checks(lineage, motion, target / MODEL_JSON, verify_content)
    checks += _dvc_checks(meta, dvc_lock)
    table, score_checks = _score_checks(lineage, scores)
    checks += score_checks
    _refuse_mismatches(checks)
    listing, shard_check = list_shards(shards, index, verify_content)  # only once index.json is the right one
    checks.append(shard_check)
    _refuse_mismatches(checks)
    rows_by_key, clip_rows = _manifest_rows(manifest)
    rows = _filtered(_sample_rows(shards, listing, rows_by_key), table) + _excluded_rows(shards, clip_rows)
    rows.sort(key=lambda r: (USES.index(r["used_for"]), _split_rank(r["split"]), r["key"], r["reason"] or ""))
    summary = {
        "format": AUDIT_FORMAT,
        "version": AUDIT_VERSION,
        "target": {"kind": lineage["kind"], "model_json_sha256": sha256_file(target / MODEL_JSON)},
        "ok": True,
        "checks": [asdict(c) for c in checks],
        "processing": _processing(meta, lineage, index, dvc_lock, motion, list(clip_rows.values())),
        "counts": counts(rows),
        "unaccounted_clips": sorted(set(clip_rows) - {r["clip_id"] for r in rows}),
    }
    if table is not None:
        summary["score_filters"] = score_filters(table)
    if denylist is not None:
        summary["takedown"] = takedown_check(rows, denylist)
        summary["ok"] = all(r["status"] == ABSENT for r in summary["takedown"])
    if history is not None:
        if denylist is None:
            raise InputError("the takedown history needs a denylist")
        root = Path(history).absolute()
        rel = [Path(os.path.relpath(Path(p).absolute(), root)).as_posix() for p in (target, shards, manifest)]
        summary["takedown_history"] = dvc_history.takedown_history(root, list(denylist.requests), *rel)
    return AuditReport(checks, rows, summary, Path(shards), Path(manifest))


def takedown_check(rows: list[dict], denylist: takedown.Denylist) -> list[dict]:
    """Each denylist request against the samples trained on or evaluated (excluded rows are not in the
    model): ABSENT, or PRESENT with the sample keys that match it."""
    found = []
    for request in denylist.requests:
        keys = sorted(
            r["key"] for r in rows if r["used_for"] != EXCLUDED and takedown.Denylist((request,)).match(r) is not None
        )
        found.append(asdict(request) | {"status": PRESENT if keys else ABSENT, "samples": keys})
    return found


def _refuse_mismatches(checks: list[Check]) -> None:
    failed = [c for c in checks if c.status == MISMATCH]
    if failed:
        raise InputError(
            "the audit would describe other data than the model saw; digest does not match for "
            + "; ".join(c.describe() for c in failed)
        )


def target_lineage(meta: dict, target: Path, motion: Path | None) -> dict:
    """The shards/manifest/motion digests a model recorded, whatever kind of model folder it is."""
    task = (meta.get("task") or {}).get("task")
    lineage = meta.get("lineage") or {}
    if meta.get("format") == "vasa-bundle":
        latent, dit = lineage.get("train_latent") or {}, lineage.get("train_motion") or {}
        return {
            "kind": "bundle",
            "index_sha256": latent.get("index_sha256"),
            "manifest_sha256": latent.get("dataset_manifest_sha256"),
            "stage1_weights_sha256": latent.get("weights_sha256"),
            "motion_index_sha256": dit.get("index_sha256"),
            "motion_stage1_weights_sha256": dit.get("stage1_weights_sha256"),
            "scores_sha256": latent.get("scores_sha256"),
        }
    if task == "train_latent":
        return {
            "kind": task,
            "index_sha256": lineage.get("index_sha256"),
            "manifest_sha256": lineage.get("dataset_manifest_sha256"),
            "stage1_weights_sha256": ((meta.get("weights") or {}).get("generator") or {}).get("sha256"),
            "scores_sha256": lineage.get("scores_sha256"),
        }
    if task == "train_motion":
        # A motion model names only its motion shards; their index names the shards they came from.
        if motion is None:
            raise InputError(f"{target}: a train-motion output records only its motion shards; pass --motion")
        dataset = (_read_json(motion / schema.INDEX_FILE, "motion index").get("dataset")) or {}
        return {
            "kind": task,
            "index_sha256": dataset.get("source_index_sha256"),
            "manifest_sha256": (dataset.get("source_dataset") or {}).get("manifest_sha256"),
            "stage1_weights_sha256": lineage.get("stage1_weights_sha256"),
            "motion_index_sha256": lineage.get("index_sha256"),
            "motion_stage1_weights_sha256": lineage.get("stage1_weights_sha256"),
            "scores_sha256": dataset.get("scores_sha256"),
        }
    raise InputError(f"{target / MODEL_JSON}: neither a bundle nor a train-latent/train-motion output")


def _weight_checks(target: Path, meta: dict) -> list[Check]:
    return [
        _digest_check(f"weights {name}", target / entry["file"], entry["sha256"])
        for name, entry in sorted((meta.get("weights") or {}).items())
    ]


def _digest_check(name: str, path: Path, expected: str | None) -> Check:
    if expected is None:
        raise InputError(f"{path}: the model records no digest for its {name}; it cannot be verified")
    found = sha256_file(path) if Path(path).is_file() else None
    return Check(name, str(path), expected, found, OK if found == expected else MISMATCH)


def _motion_checks(lineage: dict, motion: Path | None, model_json: Path, content: bool) -> list[Check]:
    """Stage 2 trained on motion extracted by this stage 1 from these shards (checked where recorded)."""
    checks = []
    if lineage.get("motion_stage1_weights_sha256"):
        expected, found = lineage["stage1_weights_sha256"], lineage["motion_stage1_weights_sha256"]
        status = OK if expected == found else MISMATCH
        checks.append(Check("stage-1 weights of the motion model", str(model_json), expected, found, status))
    if not lineage.get("motion_index_sha256"):
        return checks
    index_path = motion / schema.INDEX_FILE if motion else None
    if index_path is None:
        return [*checks, Check("motion index", "(not given)", lineage["motion_index_sha256"], None, SKIPPED)]
    checks.append(_digest_check("motion index", index_path, lineage["motion_index_sha256"]))
    dataset = (read_json(index_path) or {}).get("dataset") or {}
    found = dataset.get("source_index_sha256")
    status = OK if found == lineage["index_sha256"] else MISMATCH
    checks.append(Check("shards the motion came from", str(index_path), lineage["index_sha256"], found, status))
    if content:
        entries = [e for block in (read_json(index_path) or {}).get("splits", {}).values() for e in block["shards"]]
        wrong = [e["shard"] for e in entries if not _same_file(motion / e["shard"], e.get("sha256"))]
        expected = f"{len(entries)} motion shards with the sha256 in index.json"
        found = f"{len(wrong)} differ: {', '.join(wrong[:5])}" if wrong else expected
        checks.append(Check("motion shard files", str(motion), expected, found, MISMATCH if wrong else OK))
    return checks


def _score_checks(lineage: dict, scores: Path | None) -> tuple[score_table.Scores | None, list[Check]]:
    """The score table the model trained with: read and checked against the recorded digest; SKIPPED when the
    model recorded one and none is given. A table for a model that recorded none is refused: it trained on
    every clip, and listing filtered clips would describe other data than the model saw."""
    expected = lineage.get("scores_sha256")
    if scores is None:
        return None, [Check("score table", "(not given)", expected, None, SKIPPED)] if expected else []
    if expected is None:
        raise InputError(f"{scores}: the model records no score table (it trained on every clip); drop --scores")
    table = score_table.read_scores(Path(scores))
    status = OK if table.sha256 == expected else MISMATCH
    return table, [Check("score table", str(scores), expected, table.sha256, status)]


def _filtered(rows: list[dict], table: score_table.Scores | None) -> list[dict]:
    """Train rows whose clip the score table rejected become excluded rows (status `filtered`, the filter as
    reason); the others are unchanged."""
    if table is None:
        return rows
    rejected = table.rejected_train
    out = []
    for row in rows:
        if row["used_for"] == TRAIN_USE and row["key"] in rejected:
            found = table.rows[row["key"]]
            row = row | {"used_for": EXCLUDED, "status": "filtered"} | {k: found[k] for k in ("reason", "detail")}
        out.append(row)
    return out


def score_filters(table: score_table.Scores) -> dict:
    """How many train clips each score filter removed, how many were re-aligned, and the val/test clips the
    filters would reject (kept in the evaluation sets)."""
    rows = list(table.rows.values())
    train = [r for r in rows if r["split"] == schema.TRAIN]
    removed = Counter(r["reason"] for r in train if r["status"] == score_table.REJECTED)
    return {
        "table_sha256": table.sha256,
        "train_clips": len(train),
        "removed_by_reason": {reason: removed[reason] for reason in score_table.REASONS if removed[reason]},
        "removed": sum(removed.values()),
        "corrected": sum(r["status"] == score_table.CORRECTED for r in train),
        "evaluation_rejected_kept": sum(
            r["status"] == score_table.REJECTED for r in rows if r["split"] != schema.TRAIN
        ),
    }


def _same_file(path: Path, sha256: str | None) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def _dvc_checks(meta: dict, dvc_lock: Path | None) -> list[Check]:
    """The stage outputs recorded at export time against the dvc.lock given (bundles only)."""
    recorded = (meta.get("lineage") or {}).get("dvc_lock") or {}
    if dvc_lock is None or not recorded:
        return []
    outs = lock_outs(_read_lock(dvc_lock))
    checks = []
    for stage, paths in sorted(recorded.items()):
        for path, md5 in sorted(paths.items()):
            found = outs.get(stage, {}).get(path)
            checks.append(Check(f"{stage} output {path}", str(dvc_lock), md5, found, OK if found == md5 else MISMATCH))
    return checks


def _read_lock(path: Path) -> dict:
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise InputError(f"dvc.lock not found: {path}") from None
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML: {err}") from None


def lock_outs(lock: dict) -> dict[str, dict[str, str]]:
    """md5 of each output of each stage in a parsed dvc.lock."""
    return {
        stage: {o["path"]: o.get("md5") for o in (entry or {}).get("outs") or [] if isinstance(o, dict)}
        for stage, entry in (lock.get("stages") or {}).items()
    }


def _manifest_rows(path: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """Manifest rows by clip key and by clip id, media paths relative to the manifest's folder."""
    rows = ingest_manifest.read_manifest(path)
    base = Path(path).parent.absolute()
    for row in rows:
        if row["media_path"]:
            row["media_path"] = Path(os.path.relpath(row["media_path"], base)).as_posix()
    return {row["key"]: row for row in rows}, {row["clip_id"]: row for row in rows}


def list_shards(shards: Path, index: dict, content: bool) -> tuple[list[tuple[str, str, list[str]]], Check]:
    """(split, shard name, sample keys) of every shard index.json lists, and one check of the tars
    against their stats.json: size, sample count and (with `content`) members digest."""
    listing, wrong = [], []
    for split, block in sorted((index.get("splits") or {}).items(), key=lambda item: _split_rank(item[0])):
        for entry in block.get("shards", []):
            path = shards / entry["shard"]
            keys, members = read_shard(path, content)
            stats = read_json(path.with_name(path.name.removesuffix(".tar") + schema.STATS_SUFFIX)) or {}
            found = {"samples": len(keys), "tar_bytes": path.stat().st_size, "members_sha256": members}
            recorded = {"samples": entry.get("samples"), **{k: stats.get(k) for k in ("tar_bytes", "members_sha256")}}
            if any(found[k] is not None and recorded[k] is not None and found[k] != recorded[k] for k in found):
                wrong.append(entry["shard"])
            listing.append((split, entry["shard"], keys))
    what = "members sha256, sizes and sample counts" if content else "sizes and sample counts"
    expected = f"{len(listing)} shards as index.json and stats.json record ({what})"
    found = f"{len(wrong)} differ: {', '.join(wrong[:5])}" if wrong else expected
    return listing, Check("shard files", str(shards), expected, found, MISMATCH if wrong else OK)


def _sample_rows(shards: Path, listing: list[tuple[str, str, list[str]]], rows_by_key: dict) -> list[dict]:
    rows = []
    for split, shard, keys in listing:
        for key in keys:
            clip = rows_by_key.get(key.rsplit("_", 1)[0])
            if clip is None or clip["split"] != split:
                raise InputError(f"{shards / shard}: sample {key} has no {split} row in the manifest")
            rows.append(_row(clip, key, split, TRAIN_USE if split == schema.TRAIN else EVAL_USE, shard))
    return rows


def _excluded_rows(shards: Path, clip_rows: dict[str, dict]) -> list[dict]:
    path = shards / schema.FAILURES_FILE
    if not path.is_file():
        raise InputError(f"{path}: missing (the shards' record of left-out clips)")
    rows = []
    for failure in pq.read_table(path).to_pylist():
        clip = clip_rows.get(failure["clip_id"]) or {"clip_id": failure["clip_id"]}
        row = _row(clip, failure["key"], failure["split"], EXCLUDED, None)
        rows.append(row | {k: failure[k] for k in ("status", "reason", "detail")})
    return rows


def _row(clip: dict, key: str, split: str | None, used_for: str, shard: str | None) -> dict:
    row = dict.fromkeys(CLIP_SCHEMA.names)
    row.update({c: clip.get(c) for c in ("clip_id", "speaker_id", "source_kind", "source_url", "youtube_id")})
    row.update(
        key=key,
        split=split,
        used_for=used_for,
        shard=shard,
        media_path=clip.get("media_path"),
        licence=clip.get("licence"),
        media_sha256=clip.get("sha256"),
        duration_s=clip.get("duration_s"),
    )
    return row


def counts(rows: list[dict]) -> dict:
    """Samples and distinct clips by use, and by speaker, split and licence (each split by use)."""

    def tally(column: str) -> dict:
        found: dict = defaultdict(lambda: {"clips": Counter(), "samples": Counter()})
        clips = defaultdict(set)
        for row in rows:
            value = row[column] or "unknown"
            found[value]["samples"][row["used_for"]] += 1
            clips[(value, row["used_for"])].add(row["clip_id"])
        for (value, use), ids in clips.items():
            found[value]["clips"][use] = len(ids)
        order = sorted(found, key=lambda v: (_split_rank(v), v) if column == "split" else (0, v))
        return {v: {k: dict(sorted(c.items())) for k, c in found[v].items()} for v in order}

    by_use = {use: [r for r in rows if r["used_for"] == use] for use in USES}
    return {
        "samples": {use: len(rs) for use, rs in by_use.items()},
        "clips": {use: len({r["clip_id"] for r in rs}) for use, rs in by_use.items()},
        "by_speaker": tally("speaker_id"),
        "by_split": tally("split"),
        "by_licence": tally("licence"),
        "excluded_by_reason": dict(sorted(Counter(r["reason"] or "unknown" for r in by_use[EXCLUDED]).items())),
    }


def _processing(
    meta: dict, lineage: dict, index: dict, dvc_lock: Path | None, motion: Path | None, clips: list[dict]
) -> dict:
    """How the data became the model: code, packages, and each stage's settings and recorded outputs."""
    recorded = meta.get("lineage") or {}
    lock = _read_lock(dvc_lock) if dvc_lock else {}
    outs, lock_params = lock_outs(lock), {s: (e or {}).get("params") for s, e in (lock.get("stages") or {}).items()}
    steps = []
    for stage in STAGES:
        step: dict = {"stage": stage}
        if stage in lock_params:
            step["params"] = (lock_params[stage] or {}).get("params.yaml", {})
            step["dvc_outs_md5"] = dict(sorted(outs.get(stage, {}).items()))
        if stage in recorded.get("dvc_lock", {}):
            step["dvc_outs_md5_at_export"] = dict(sorted(recorded["dvc_lock"][stage].items()))
        steps.append(step)
    by_stage = {s["stage"]: s for s in steps}
    by_stage["ingest"]["manifest"] = {
        "clips": len(clips),
        "by_status": dict(sorted(Counter(row["status"] for row in clips).items())),
        "by_source_kind": dict(sorted(Counter(row["source_kind"] for row in clips).items())),
    }
    by_stage["preprocess"]["dataset"] = index.get("dataset") or {}
    by_stage["preprocess"]["failures_by_reason"] = index.get("failures_by_reason") or {}
    for stage in ("train_latent", "train_motion"):
        block = recorded.get(stage) if lineage["kind"] == "bundle" else recorded if stage == lineage["kind"] else None
        if block:
            by_stage[stage]["lineage"] = block
    if lineage["kind"] in ("train_latent", "train_motion"):
        by_stage[lineage["kind"]].update(step=meta.get("step"), model_params=meta.get("params") or {})
    else:
        by_stage["export"]["bundle_settings"] = {k: meta[k] for k in BUNDLE_SETTINGS if k in meta}
    if motion is not None:
        motion_index = read_json(motion / schema.INDEX_FILE) or {}
        by_stage["extract_motion"]["left_out"] = sorted(
            motion_index.get("failures") or [], key=lambda f: (str(f.get("key")), str(f.get("shard")))
        )
        by_stage["extract_motion"]["filtered"] = sorted(
            motion_index.get("filtered") or [], key=lambda f: (str(f.get("key")), str(f.get("shard")))
        )
    steps = [step for step in steps if len(step) > 1]
    return {
        "code_sha256": recorded.get("code_sha256"),
        "packages": recorded.get("packages") or {},
        "speakers_of_the_model": recorded.get("speakers") or meta.get("speakers") or [],
        "steps": steps,
    }


def write_report(report: AuditReport, out: Path) -> None:
    """croissant.json (validated first: an invalid description writes nothing), clips.parquet, audit.md,
    then audit.json (last: marks a complete audit), each atomically. Raises TakedownPresentError after
    writing when a taken-down item is among the samples."""
    description = None
    if report.shards is not None and report.manifest is not None:
        description = croissant.describe(report.shards, report.manifest, out)
        croissant.validate(description)
    out.mkdir(parents=True, exist_ok=True)
    if description is not None:
        croissant.write(description, out / croissant.CROISSANT_FILE)
    table = pa.Table.from_pylist(report.rows, schema=CLIP_SCHEMA)
    with atomic_path(out / CLIPS_FILE) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    with atomic_path(out / AUDIT_MD) as tmp:
        tmp.write_text(render_markdown(report))
    write_json(out / AUDIT_JSON, report.summary)
    present = [r for r in report.summary.get("takedown", []) if r["status"] == PRESENT]
    if present:
        raise TakedownPresentError(
            "taken-down items are among the samples: "
            + "; ".join(f"{r['kind']} {r['id']} ({len(r['samples'])} samples)" for r in present)
            + f" (report in {out})"
        )


def render_markdown(report: AuditReport) -> str:
    s = report.summary
    c = s["counts"]
    skipped = sum(check.status == SKIPPED for check in report.checks)
    lines = [
        "# Provenance audit",
        "",
        f"Target: {s['target']['kind']}, model.json sha256 `{s['target']['model_json_sha256']}`.",
        f"Code sha256 `{s['processing']['code_sha256'] or 'not recorded'}`. Every lineage check passed"
        + (f" ({skipped} skipped: input not given)." if skipped else "."),
        "",
        "| check | file | status |",
        "|---|---|---|",
        *(f"| {ch.name} | `{ch.file}` | {ch.status} |" for ch in report.checks),
        "",
        f"Samples: {c['samples'][TRAIN_USE]} trained on, {c['samples'][EVAL_USE]} used for evaluation only, "
        f"{c['samples'][EXCLUDED]} excluded; clips: {c['clips'][TRAIN_USE]} / {c['clips'][EVAL_USE]} / "
        f"{c['clips'][EXCLUDED]}.",
        "",
        "## Licences",
        "",
        *_table("licence", c["by_licence"], _licence_hours(report.rows)),
        "",
        "## Speakers",
        "",
        *_table("speaker", c["by_speaker"]),
        "",
        "## Splits",
        "",
        *_table("split", c["by_split"]),
        "",
        "## Excluded",
        "",
    ]
    excluded = [r for r in report.rows if r["used_for"] == EXCLUDED]
    if excluded:
        lines += ["| reason | clips or segments |", "|---|---|"]
        lines += [f"| {reason} | {n} |" for reason, n in c["excluded_by_reason"].items()] + [""]
    lines += [f"- `{r['key']}` ({r['clip_id']}, {r['speaker_id']}): {r['reason']}" for r in excluded[:MD_LIST]]
    if len(excluded) > MD_LIST:
        lines.append(f"- ... and {len(excluded) - MD_LIST} more (clips.parquet)")
    lines += [] if excluded else ["None."]
    if "score_filters" in s:
        f = s["score_filters"]
        lines += ["", "## Score filters", ""]
        lines += [
            f"Score table `{_short(f['table_sha256'])}`: {f['removed']} of {f['train_clips']} train clips removed, "
            f"{f['corrected']} kept with their A/V offset corrected; {f['evaluation_rejected_kept']} val/test clips "
            "the filters would reject stay in the evaluation sets.",
            "",
            "| filter (reason) | train clips removed |",
            "|---|---|",
            *(f"| {reason} | {n} |" for reason, n in f["removed_by_reason"].items()),
        ]
    if "takedown" in s:
        lines += ["", "## Takedown requests", ""]
        lines += ["| kind | id | date | in this model |", "|---|---|---|---|"] if s["takedown"] else ["None recorded."]
        lines += [
            f"| {r['kind']} | {r['id']} | {r['date']} | {r['status']}"
            + (f" ({len(r['samples'])} samples)" if r["samples"] else "")
            + " |"
            for r in s["takedown"]
        ]
    if "takedown_history" in s:
        lines += ["", "## Earlier bundles (git history of dvc.lock, data from the DVC cache)", ""]
        requests = [f"{r['kind']} {r['id']}" for r in s["takedown"]]
        lines += ["| bundle md5 | date | commits | " + " | ".join(requests) + " |", "|---" * (3 + len(requests)) + "|"]
        for b in s["takedown_history"]:
            cells = [r["status"] + (f" ({r['samples']})" if r["samples"] else "") for r in b["requests"]]
            head = f"| {_short(b['bundle_md5'])} | {b['date'][:10]} | {len(b['commits'])} ({b['commits'][0][:8]}) | "
            lines.append(head + " | ".join(cells) + " |")
        lines += [] if s["takedown_history"] else ["No bundle in the history of dvc.lock."]
    if s["unaccounted_clips"]:
        lines += ["", "Manifest clips neither in the shards nor excluded: " + ", ".join(s["unaccounted_clips"])]
    lines += ["", "Every sample with its shard, source and licence: clips.parquet. Settings and dvc.lock: audit.json."]
    return "\n".join(lines) + "\n"


def _licence_hours(rows: list[dict]) -> dict[str, float]:
    seconds: dict[str, float] = defaultdict(float)
    seen = set()
    for row in rows:
        if row["used_for"] != EXCLUDED and row["clip_id"] not in seen:
            seen.add(row["clip_id"])
            seconds[row["licence"] or "unknown"] += row["duration_s"] or 0.0
    return {k: v / 3600 for k, v in seconds.items()}


def _table(label: str, tally: dict, hours: dict[str, float] | None = None) -> list[str]:
    head = f"| {label} | clips train | clips evaluation | clips excluded | samples train | samples evaluation |"
    lines = [head + (" source hours used |" if hours is not None else ""), "|---" * (6 if hours is None else 7) + "|"]
    for value, t in tally.items():
        cells = [t["clips"].get(u, 0) for u in USES] + [t["samples"].get(u, 0) for u in (TRAIN_USE, EVAL_USE)]
        extra = f" {hours.get(value, 0.0):.3f} |" if hours is not None else ""
        lines.append(f"| {value} | " + " | ".join(str(n) for n in cells) + " |" + extra)
    return lines


def _read_json(path: Path, what: str) -> dict:
    payload = read_json(path)
    if payload is None:
        raise InputError(f"{path}: {what} missing or unreadable")
    return payload


def _split_rank(split: str | None) -> int:
    return schema.SPLITS.index(split) if split in schema.SPLITS else len(schema.SPLITS)


def _short(value: str | None) -> str:
    """A sha256 or md5 (DVC's `.dir` ones too) shortened to 12 hex digits; other values as they are."""
    if value is None:
        return "nothing"
    digest = value.removesuffix(".dir")
    return value[:12] if len(digest) in (32, 64) and all(c in "0123456789abcdef" for c in digest) else value
