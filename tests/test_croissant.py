"""Croissant 1.1 description of the shards: valid for mlcroissant, complete, deterministic; a broken one is refused."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest

from preprocessing import schema
from vasa.provenance import croissant
from vasa.provenance.croissant import CroissantError, describe, validate

# The tests marked slow describe the session's sample shards (tests/conftest.py `sample_shards`: a small sample
# corpus through the real ingest and preprocess flows, ~45 s once per session), read only.
slow = pytest.mark.slow


@slow
def test_sample_shards_description_is_valid_and_complete(sample_shards, tmp_path):
    shards, manifest = sample_shards.shards, sample_shards.manifest
    description = describe(shards, manifest, tmp_path)
    warnings = validate(description)
    assert all("is recommended" in w for w in warnings), warnings  # no real problem, only optional properties
    assert description["conformsTo"] == "http://mlcommons.org/croissant/1.1"

    index = json.loads((shards / schema.INDEX_FILE).read_text())
    names = [e["shard"] for block in index["splits"].values() for e in block["shards"]]
    tars = {d["name"]: d for d in description["distribution"] if d.get("encodingFormat") == "application/x-tar"}
    assert sorted(tars) == sorted(names)
    for name, entry in tars.items():
        assert entry["sha256"] == hashlib.sha256((shards / name).read_bytes()).hexdigest(), name
        assert (tmp_path / entry["contentUrl"]).resolve() == (shards / name).resolve()
    file_sets = {d["includes"]: d for d in description["distribution"] if d["@type"] == "cr:FileSet"}
    assert set(file_sets) == {f"*.{m}" for m in schema.MEMBERS}
    assert all(len(fs["containedIn"]) == len(names) for fs in file_sets.values())

    record_sets = {rs["@id"]: {f["name"]: f for f in rs["field"]} for rs in description["recordSet"]}
    pose = record_sets["pose"]["pose"]
    assert (pose["dataType"], pose["arrayShape"]) == ("cr:Float32", f"-1,{len(schema.POSE_COLUMNS)}")
    assert "degrees" in pose["description"] and all(c in pose["description"] for c in schema.POSE_COLUMNS)
    assert record_sets["landmarks"]["landmarks"]["arrayShape"] == f"-1,{schema.N_LANDMARKS},3"
    assert record_sets["mel"]["mel"]["arrayShape"] == f"-1,{index['dataset']['n_mels']}"
    assert record_sets["audio"]["audio"]["source"]["samplingRate"] == index["dataset"]["sample_rate"]
    assert record_sets["pose"]["key"]["references"] == {"field": {"@id": "metadata/key"}}

    assert description["license"] == ["https://creativecommons.org/publicdomain/mark/1.0/"]  # the sample corpus
    for key in ("rai:dataCollection", "rai:personalSensitiveInformation", "rai:dataLimitations"):
        assert description[key], key
    assert "Intended" in description["rai:dataUseCases"] and "per speaker" in description["rai:dataBiases"]
    assert description["prov:wasDerivedFrom"] == {"@id": "manifest"}
    assert [s["name"] for s in description["isBasedOn"]] == ["sample source"]
    manifest_object = next(d for d in description["distribution"] if d["@id"] == "manifest")
    assert manifest_object["sha256"] == index["dataset"]["manifest_sha256"]


@slow
def test_the_clips_record_set_reads_back_with_mlcroissant(sample_shards, tmp_path):
    """Not only valid: mlcroissant's reader follows the description to the manifest's provenance columns."""
    import mlcroissant as mlc
    import pyarrow.parquet as pq

    shards, manifest = sample_shards.shards, sample_shards.manifest
    croissant.write(describe(shards, manifest, tmp_path), tmp_path / croissant.CROISSANT_FILE)
    records = list(mlc.Dataset(jsonld=tmp_path / croissant.CROISSANT_FILE).records("clips"))
    rows = pq.read_table(manifest).to_pylist()
    assert sorted(r["clips/clip_id"].decode() for r in records) == sorted(r["clip_id"] for r in rows)
    assert {r["clips/licence"].decode() for r in records} == {r["licence"] for r in rows}


@slow
def test_same_shards_same_bytes(sample_shards, tmp_path):
    shards, manifest = sample_shards.shards, sample_shards.manifest
    for name in ("one", "two"):
        croissant.write(describe(shards, manifest, tmp_path), tmp_path / name)
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes()


def _drop_shard_object(d: dict) -> None:
    d["distribution"] = [x for x in d["distribution"] if not x["@id"].startswith("shard/")]


def _no_digest(d: dict) -> None:
    for x in d["distribution"]:
        x.pop("sha256", None)


def _bad_shape(d: dict) -> None:
    next(f for rs in d["recordSet"] for f in rs["field"] if f["name"] == "pose")["arrayShape"] = "-1,seven"


def _no_data_type(d: dict) -> None:
    del d["recordSet"][0]["field"][1]["dataType"]


@slow
@pytest.mark.parametrize("breakage", [_drop_shard_object, _no_digest, _bad_shape, _no_data_type])
def test_a_broken_description_fails_validation(sample_shards, tmp_path, breakage):
    shards, manifest = sample_shards.shards, sample_shards.manifest
    description = describe(shards, manifest, tmp_path)
    broken = copy.deepcopy(description)
    breakage(broken)
    with pytest.raises(CroissantError, match="does not validate"):
        validate(broken)
    validate(description)  # the intact one still passes: the breakage is what failed


@slow
def test_shards_from_another_manifest_are_refused(sample_shards, tmp_path):
    shards, manifest = sample_shards.shards, sample_shards.manifest
    from preprocessing.ingest import manifest as ingest_manifest

    rows = ingest_manifest.read_manifest(manifest)
    rows[0]["licence"] = "all-rights-reserved"  # a licence changed after the shards were made
    other = tmp_path / "manifest.parquet"
    ingest_manifest.write_manifest(other, rows)
    with pytest.raises(croissant.InputError, match="not the manifest the shards were made from"):
        describe(shards, other, tmp_path)


def test_speech_features_are_described_only_when_the_shards_hold_them(tmp_path):
    from preprocessing.shards import Sample, write_shard
    from tests.test_audit import write_inputs
    from vasa.provenance.audit import read_shard

    paths = write_inputs(tmp_path)  # synthetic shards: train, val and test, three licences
    description = describe(paths["shards"], paths["manifest"], tmp_path / "audit")
    assert "speech" not in {rs["@id"] for rs in description["recordSet"]}
    assert description["license"] == [
        "https://creativecommons.org/licenses/by-nc/4.0/",
        "https://creativecommons.org/licenses/by/4.0/",
        "https://creativecommons.org/publicdomain/mark/1.0/",
    ]
    tar = sorted(paths["shards"].glob("train-*.tar"))[0]
    keys, _ = read_shard(tar)
    write_shard(tar, [Sample(k, {"json": b"{}", "mp4": b"\0", schema.SPEECH: b"\0"}, 10, 0.4) for k in keys])
    description = describe(paths["shards"], paths["manifest"], tmp_path / "audit")
    assert all("is recommended" in w for w in validate(description))
    speech = {rs["@id"]: rs for rs in description["recordSet"]}["speech"]["field"][1]
    assert (speech["dataType"], speech["arrayShape"]) == ("cr:Float32", "-1,-1")
    assert any(d["@id"] == f"member/{schema.SPEECH}" for d in description["distribution"])
