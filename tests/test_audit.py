"""Provenance audit: a synthetic bundle's clips, speakers and licences, verified against its lineage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from preprocessing import denylist, schema
from preprocessing.ingest import manifest
from preprocessing.shards import Sample, write_shard
from preprocessing.writer import write_failures
from vasa.cli import main
from vasa.core.digests import sha256_file
from vasa.core.errors import InputError
from vasa.core.files import write_json
from vasa.core.weights import MODEL_JSON
from vasa.provenance import audit as audit_module
from vasa.provenance import croissant
from vasa.provenance.audit import AUDIT_JSON, AUDIT_MD, CLIPS_FILE, TakedownPresentError, audit, write_report
from vasa.provenance.croissant import CROISSANT_FILE
from vasa.training.checkpoint import shards_lineage

REPO = Path(__file__).resolve().parents[1]
STAGE1 = "a" * 64
# clip id -> (speaker, licence, split, status, segments in the shards, failed segments)
CLIPS = {
    "local:ann/a0.mp4": ("ann", "cc-by-4.0", "train", manifest.OK, 2, 0),
    "local:ann/a1.mp4": ("ann", "cc-by-4.0", "train", manifest.OK, 1, 1),
    "local:bob/b0.mp4": ("bob", "public-domain", "train", manifest.OK, 1, 0),
    "local:bob/b1.mp4": ("bob", "public-domain", "train", manifest.UNREADABLE, 0, 0),
    "local:cat/c0.mp4": ("cat", "cc-by-nc-4.0", "val", manifest.OK, 1, 0),
    "local:dan/d0.mp4": ("dan", "cc-by-4.0", "test", manifest.OK, 1, 0),
}


def write_inputs(root: Path) -> dict[str, Path]:
    """Manifest, shards (index.json, tars, failures.parquet), a bundle whose lineage names them, dvc.lock."""
    rows = [
        manifest.new_row(
            clip_id,
            "local",
            speaker_id=speaker,
            licence=licence,
            split=split,
            status=status,
            source_url=f"https://example.org/{clip_id[6:]}",
            media_path=str(root / "media" / clip_id[6:]),
            sha256=manifest.clip_key(clip_id) * 4,
            duration_s=4.0,
            error=None if status == manifest.OK else "bad",
        )  # fmt: skip
        for clip_id, (speaker, licence, split, status, _, _) in CLIPS.items()
    ]
    paths = {"manifest": root / "ingest" / "manifest.parquet", "shards": root / "shards", "bundle": root / "bundle"}
    manifest.write_manifest(paths["manifest"], rows)
    paths["shards"].mkdir()
    splits: dict[str, dict] = {}
    failures = []
    for row in rows:
        _, _, split, status, n_ok, n_failed = CLIPS[row["clip_id"]]
        if status != manifest.OK:
            failures.append({**row, "status": "ingest", "reason": status, "detail": "bad"})
            continue
        samples = [Sample(f"{row['key']}_{i:05d}", {"json": b"{}", "mp4": b"\0"}, 10, 0.4) for i in range(n_ok)]
        name = f"{split}-{row['key']}-0000.tar"  # one shard per clip
        write_shard(paths["shards"] / name, samples)
        # The stats.json fields the audit compares (members digest as preprocessing.shards computes it).
        members = hashlib.sha256("".join(s.digest() for s in samples).encode()).hexdigest()
        stats = {"shard": name, "samples": n_ok, "members_sha256": members}
        write_json(
            paths["shards"] / name.replace(".tar", schema.STATS_SUFFIX),
            stats | {"tar_bytes": (paths["shards"] / name).stat().st_size},
        )
        block = splits.setdefault(split, {"shards": [], "samples": 0, "frames": 0})
        block["shards"].append({"shard": name, "samples": n_ok, "frames": 10 * n_ok})
        block["samples"] += n_ok
        for i in range(n_ok, n_ok + n_failed):
            failures.append({**row, "key": f"{row['key']}_{i:05d}", "status": "filtered", "reason": "blurry"})
    write_failures(paths["shards"] / schema.FAILURES_FILE, failures)
    dataset = {"schema_version": schema.SCHEMA_VERSION, "manifest_sha256": sha256_file(paths["manifest"])}
    index = {"dataset": dataset, "splits": splits, "failures_by_reason": {"blurry": 1, "unreadable_media": 1}}
    write_json(paths["shards"] / schema.INDEX_FILE, index)
    paths["dvc_lock"] = root / "dvc.lock"
    lock = {"stages": {"train_latent": {"params": {"params.yaml": {"train_latent.model": "tiny"}}, "outs": [
        {"path": "data/latent/model", "md5": "1" * 32 + ".dir"}]}}}  # fmt: skip
    paths["dvc_lock"].write_text(yaml.safe_dump(lock))
    paths["bundle"].mkdir()
    (paths["bundle"] / "face_latent.safetensors").write_bytes(b"weights")  # only hashed, never loaded
    lineage = {
        "train_latent": {**shards_lineage(paths["shards"] / schema.INDEX_FILE), "weights_sha256": STAGE1},
        "train_motion": {"index_sha256": "b" * 64, "stage1_weights_sha256": STAGE1},
        "speakers": ["ann", "bob"],
        "dvc_lock": {"train_latent": {"data/latent/model": "1" * 32 + ".dir"}},
        "code_sha256": "c" * 64,
        "packages": {"torch": "2.0"},
    }
    face = paths["bundle"] / "face_latent.safetensors"
    weights = {"face_latent": {"file": face.name, "sha256": sha256_file(face)}}
    write_json(
        paths["bundle"] / MODEL_JSON, {"format": "vasa-bundle", "fps": 25, "lineage": lineage, "weights": weights}
    )
    return paths


def run_audit(paths: dict[str, Path], out: Path):
    report = audit(paths["bundle"], paths["shards"], paths["manifest"], dvc_lock=paths["dvc_lock"], verify_content=True)
    write_report(report, out)
    return report


def key(clip_id: str, segment: int | None = None) -> str:
    return manifest.clip_key(clip_id) + ("" if segment is None else f"_{segment:05d}")


def test_audit_lists_exactly_the_clips_with_their_licences_and_uses(tmp_path):
    paths = write_inputs(tmp_path)
    run_audit(paths, tmp_path / "audit")
    rows = pq.read_table(tmp_path / "audit" / CLIPS_FILE).to_pylist()
    uses = {r["key"]: r["used_for"] for r in rows}
    assert uses == {
        key("local:ann/a0.mp4", 0): "train",
        key("local:ann/a0.mp4", 1): "train",
        key("local:ann/a1.mp4", 0): "train",
        key("local:ann/a1.mp4", 1): "excluded",  # a failed segment of a clip that is otherwise used
        key("local:bob/b0.mp4", 0): "train",
        key("local:bob/b1.mp4"): "excluded",  # never reached processing
        key("local:cat/c0.mp4", 0): "evaluation",
        key("local:dan/d0.mp4", 0): "evaluation",
    }
    for row in rows:
        speaker, licence, split, *_ = CLIPS[row["clip_id"]]
        assert (row["speaker_id"], row["licence"], row["split"]) == (speaker, licence, split)
        assert row["media_sha256"] == manifest.clip_key(row["clip_id"]) * 4
        assert row["media_path"] == f"../media/{row['clip_id'][6:]}"
        assert (row["shard"] is None) == (row["used_for"] == "excluded")
    assert {r["reason"] for r in rows if r["used_for"] == "excluded"} == {"blurry", manifest.UNREADABLE}
    shards = {r["shard"] for r in rows if r["clip_id"] == "local:ann/a0.mp4"}
    assert shards == {f"train-{key('local:ann/a0.mp4')}-0000.tar"}

    summary = json.loads((tmp_path / "audit" / AUDIT_JSON).read_text())
    assert summary["ok"] and {c["status"] for c in summary["checks"]} == {"ok", "skipped"}  # no motion folder given
    counts = summary["counts"]
    assert counts["samples"] == {"train": 4, "evaluation": 2, "excluded": 2}
    assert counts["clips"] == {"train": 3, "evaluation": 2, "excluded": 2}
    assert counts["by_licence"]["cc-by-4.0"]["clips"] == {"evaluation": 1, "excluded": 1, "train": 2}
    assert counts["by_licence"]["cc-by-nc-4.0"]["samples"] == {"evaluation": 1}
    assert counts["by_speaker"]["bob"]["samples"] == {"excluded": 1, "train": 1}
    assert counts["by_split"]["val"]["samples"] == {"evaluation": 1}
    assert summary["unaccounted_clips"] == []
    steps = {s["stage"]: s for s in summary["processing"]["steps"]}
    assert steps["train_latent"]["params"] == {"train_latent.model": "tiny"}
    assert steps["train_latent"]["dvc_outs_md5"] == {"data/latent/model": "1" * 32 + ".dir"}
    assert summary["processing"]["code_sha256"] == "c" * 64
    assert steps["ingest"]["manifest"]["by_status"] == {manifest.OK: 5, manifest.UNREADABLE: 1}

    report = (tmp_path / "audit" / AUDIT_MD).read_text()
    assert "| cc-by-nc-4.0 | 0 | 1 | 0 | 0 | 1 |" in report
    assert "| ann | 2 | 0 | 1 | 3 | 0 |" in report
    assert "| blurry | 1 |" in report and f"| {manifest.UNREADABLE} | 1 |" in report
    assert counts["excluded_by_reason"] == {"blurry": 1, manifest.UNREADABLE: 1}


@pytest.mark.parametrize("changed", ["index", "manifest", "weights", "dvc_lock"])
def test_a_changed_input_is_refused_naming_the_file(tmp_path, changed):
    paths = write_inputs(tmp_path)
    if changed == "index":
        index = paths["shards"] / schema.INDEX_FILE
        index.write_text(index.read_text() + " ")
        culprit = str(index)
    elif changed == "manifest":
        rows = manifest.read_manifest(paths["manifest"])
        rows[0]["licence"] = "all-rights-reserved"
        manifest.write_manifest(paths["manifest"], rows)
        culprit = str(paths["manifest"])
    elif changed == "weights":
        (paths["bundle"] / "face_latent.safetensors").write_bytes(b"other weights")
        culprit = str(paths["bundle"] / "face_latent.safetensors")
    else:
        paths["dvc_lock"].write_text(paths["dvc_lock"].read_text().replace("1111", "2222"))
        culprit = str(paths["dvc_lock"])
    with pytest.raises(InputError, match="does not match") as err:
        run_audit(paths, tmp_path / "audit")
    assert culprit in str(err.value)
    args = ["--target", str(paths["bundle"]), "--shards", str(paths["shards"]), "--manifest", str(paths["manifest"])]
    args += ["--out", str(tmp_path / "cli"), "--dvc-lock", str(paths["dvc_lock"])]
    assert main(["--params", str(REPO / "params.yaml"), "audit", *args]) == 2
    assert not (tmp_path / "cli").exists()  # nothing written about data the model did not see


def test_cli_passes_and_outputs_are_byte_identical(tmp_path):
    paths = write_inputs(tmp_path)
    args = ["--target", str(paths["bundle"]), "--shards", str(paths["shards"]), "--manifest", str(paths["manifest"])]
    for out in ("one", "two"):
        assert main(["--params", str(REPO / "params.yaml"), "audit", *args, "--out", str(tmp_path / out)]) == 0
    for name in (CLIPS_FILE, AUDIT_JSON, AUDIT_MD, CROISSANT_FILE):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert not list((tmp_path / "one").glob("*.partial"))


def test_stage_outputs_follow_their_own_lineage(tmp_path):
    assert audit_module.MODEL_JSON == MODEL_JSON  # declared apart so that an audit does not load torch
    paths = write_inputs(tmp_path)
    latent = tmp_path / "latent_model"
    latent.mkdir()
    meta = {"task": {"task": "train_latent"}, "lineage": shards_lineage(paths["shards"] / schema.INDEX_FILE)}
    write_json(latent / MODEL_JSON, {**meta, "params": {"train_latent": {"model": "tiny"}}, "weights": {}})
    report = audit(latent, paths["shards"], paths["manifest"], None)
    assert report.summary["counts"]["samples"]["train"] == 4
    steps = {s["stage"]: s for s in report.summary["processing"]["steps"]}
    assert steps["train_latent"]["model_params"] == {"train_latent": {"model": "tiny"}}

    dit = tmp_path / "dit_model"
    dit.mkdir()
    lineage = {"index_sha256": "b" * 64, "stage1_weights_sha256": STAGE1}
    write_json(dit / MODEL_JSON, {"task": {"task": "train_motion"}, "lineage": lineage, "weights": {}})
    with pytest.raises(InputError, match="--motion"):
        audit(dit, paths["shards"], paths["manifest"], None)


def test_a_changed_shard_is_refused(tmp_path):
    paths = write_inputs(tmp_path)
    clip = key("local:bob/b0.mp4")
    tar = paths["shards"] / f"train-{clip}-0000.tar"
    # Same key, member names and size: only the bytes of one member differ.
    write_shard(tar, [Sample(f"{clip}_00000", {"json": b"{}", "mp4": b"\1"}, 10, 0.4)])
    report = audit(paths["bundle"], paths["shards"], paths["manifest"])  # sizes and counts still agree
    assert next(c for c in report.checks if c.name == "shard files").status == "ok"
    with pytest.raises(InputError, match=f"shard files.*1 differ: {tar.name}"):
        audit(paths["bundle"], paths["shards"], paths["manifest"], verify_content=True)
    tar.unlink()
    with pytest.raises(InputError, match=f"{tar}: listed in index.json but missing"):
        audit(paths["bundle"], paths["shards"], paths["manifest"])


def test_motion_data_must_come_from_these_shards(tmp_path):
    paths = write_inputs(tmp_path)
    motion = tmp_path / "motion"
    motion.mkdir()
    dataset = {"source_index_sha256": sha256_file(paths["shards"] / schema.INDEX_FILE), "source_dataset": {}}
    write_json(motion / schema.INDEX_FILE, {"dataset": dataset, "splits": {}, "failures": []})
    meta = json.loads((paths["bundle"] / MODEL_JSON).read_text())
    meta["lineage"]["train_motion"]["index_sha256"] = sha256_file(motion / schema.INDEX_FILE)
    write_json(paths["bundle"] / MODEL_JSON, meta)
    report = audit(paths["bundle"], paths["shards"], paths["manifest"], motion=motion)
    assert {c.name: c.status for c in report.checks}["shards the motion came from"] == "ok"

    dit = tmp_path / "dit_model"  # a train-motion output reaches the shards through the motion index
    dit.mkdir()
    lineage = {"index_sha256": sha256_file(motion / schema.INDEX_FILE), "stage1_weights_sha256": STAGE1}
    write_json(dit / MODEL_JSON, {"task": {"task": "train_motion"}, "lineage": lineage, "weights": {}})
    assert audit(dit, paths["shards"], paths["manifest"], motion=motion).summary["counts"]["samples"]["train"] == 4

    write_json(motion / schema.INDEX_FILE, {"dataset": {**dataset, "source_index_sha256": "d" * 64}, "splits": {}})
    with pytest.raises(InputError, match=f"{motion / schema.INDEX_FILE} \\(motion index\\)"):
        audit(paths["bundle"], paths["shards"], paths["manifest"], motion=motion)


def test_croissant_description_is_written_and_an_invalid_one_writes_nothing(tmp_path, monkeypatch):
    paths = write_inputs(tmp_path)
    run_audit(paths, tmp_path / "audit")
    description = json.loads((tmp_path / "audit" / CROISSANT_FILE).read_text())
    assert croissant.validate(description) is not None
    assert sorted(d["name"] for d in description["distribution"] if d["@id"].startswith("shard/")) == sorted(
        p.name for p in paths["shards"].glob("*.tar")
    )
    assert "https://creativecommons.org/licenses/by-nc/4.0/" in description["license"]  # cat's val clip

    broken = croissant.describe  # a description that lost its shard files
    monkeypatch.setattr(
        croissant,
        "describe",
        lambda *a: {**broken(*a), "distribution": [d for d in broken(*a)["distribution"] if d["@id"] == "manifest"]},
    )
    args = ["--target", str(paths["bundle"]), "--shards", str(paths["shards"]), "--manifest", str(paths["manifest"])]
    assert main(["--params", str(REPO / "params.yaml"), "audit", *args, "--out", str(tmp_path / "cli")]) == 2
    assert not (tmp_path / "cli").exists()


def test_takedown_requests_are_reported_absent_or_present(tmp_path):
    paths = write_inputs(tmp_path)
    requests = [
        denylist.Request("speaker", "bob", "asked by bob", "2026-11-20"),  # b0 trained on: PRESENT
        denylist.Request("clip", "local:bob/b1.mp4", "asked", "2026-11-21"),  # unreadable, never used: absent
        denylist.Request("video", "https://example.org/eve/e0.mp4", "asked", "2026-11-21"),  # not in the data
    ]
    listed = tmp_path / "denylist.csv"
    denylist.write(listed, denylist.Denylist(tuple(requests[1:])))
    args = ["--target", str(paths["bundle"]), "--shards", str(paths["shards"]), "--manifest", str(paths["manifest"])]
    cli = ["--params", str(REPO / "params.yaml"), "audit", *args, "--denylist", str(listed)]
    assert main([*cli, "--out", str(tmp_path / "clean")]) == 0
    summary = json.loads((tmp_path / "clean" / AUDIT_JSON).read_text())
    assert [(r["id"], r["status"]) for r in summary["takedown"]] == [
        ("local:bob/b1.mp4", "absent"),
        ("https://example.org/eve/e0.mp4", "absent"),
    ]
    assert "| clip | local:bob/b1.mp4 | 2026-11-21 | absent |" in (tmp_path / "clean" / AUDIT_MD).read_text()

    report = audit(paths["bundle"], paths["shards"], paths["manifest"], denylist=denylist.Denylist(tuple(requests)))
    bob = next(r for r in report.summary["takedown"] if r["kind"] == "speaker")
    assert bob["status"] == "PRESENT" and bob["samples"] == [key("local:bob/b0.mp4", 0)]
    assert report.summary["ok"] is False
    with pytest.raises(TakedownPresentError, match="speaker bob \\(1 samples\\)"):
        write_report(report, tmp_path / "dirty")
    assert "| speaker | bob | 2026-11-20 | PRESENT (1 samples) |" in (tmp_path / "dirty" / AUDIT_MD).read_text()
    denylist.write(listed, denylist.Denylist(tuple(requests)))
    assert main([*cli, "--out", str(tmp_path / "cli")]) == 2
