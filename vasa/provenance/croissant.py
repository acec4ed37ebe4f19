"""Croissant 1.1 description of the shards (JSON-LD), written by `vasa audit` and validated with mlcroissant.

    croissant.json  one sc:Dataset: every shard tar as a cr:FileObject (sha256, size), one cr:FileSet per
                    sample member inside the tars (webdataset `<key>.<member>`), the ingest manifest as a
                    FileObject, RecordSets `samples` (one field per member: dtype, array shape, units, from
                    preprocessing/schema.py) and `clips` (the manifest's provenance columns), the licences
                    of the clips in the shards, provenance (isBasedOn the sources, prov:wasDerivedFrom the
                    manifest, prov:wasGeneratedBy the preprocess stage) and the RAI fields that apply.

Everything comes from the shards' index.json, stats.json, the tars' bytes and the manifest: no clock, no
host name, paths relative to the description's folder, so the same shards give the same bytes. The tars'
sha256 are computed here (stats.json records only the digest of their members), which reads every shard
once: seconds for the sample corpus, an I/O pass over the dataset for VoxCeleb2-sized shards. Croissant
1.1 (mlcommons.org/croissant/1.1) names no provenance vocabulary of its own beyond schema.org's
`isBasedOn` and `citeAs`; the W3C PROV-O terms are added under the `prov` prefix, which Croissant
readers ignore when they do not know them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tarfile
import warnings
from collections import Counter
from pathlib import Path

from preprocessing import schema
from preprocessing.ingest import manifest as ingest_manifest
from vasa.core.digests import sha256_file
from vasa.core.errors import InputError
from vasa.core.files import atomic_path, read_json

CROISSANT_FILE = "croissant.json"
CONFORMS_TO = "http://mlcommons.org/croissant/1.1"
# The standard Croissant 1.1 @context (mlcroissant's make_context for 1.1), plus PROV-O.
CONTEXT = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "arrayShape": "cr:arrayShape",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "containedIn": "cr:containedIn",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "prov": "http://www.w3.org/ns/prov#",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/",
    "description": {"@container": "@language"},
    "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract",
    "field": "cr:field",
    "fileProperty": "cr:fileProperty",
    "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isArray": "cr:isArray",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "name": {"@container": "@language"},
    "parentField": "cr:parentField",
    "path": "cr:path",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "samplingRate": "cr:samplingRate",
    "sc": "https://schema.org/",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
}

# Licence ids as the manifest records them -> a URL where one is canonical (else the id itself is given).
LICENCE_URLS = {
    "public-domain": "https://creativecommons.org/publicdomain/mark/1.0/",
    "cc0-1.0": "https://creativecommons.org/publicdomain/zero/1.0/",
    "cc-by-4.0": "https://creativecommons.org/licenses/by/4.0/",
    "cc-by-sa-4.0": "https://creativecommons.org/licenses/by-sa/4.0/",
    "cc-by-nc-4.0": "https://creativecommons.org/licenses/by-nc/4.0/",
    "cc-by-nc-sa-4.0": "https://creativecommons.org/licenses/by-nc-sa/4.0/",
}

# How each source kind's clips were collected (rai:dataCollection), by manifest `source_kind`.
COLLECTION = {
    "sample": (
        "Synthetic sample corpus made by `vasa sample`: public-domain portraits bundled in installed Python "
        "packages (scikit-image, matplotlib), animated with procedural 3D head motion, blinks and a jaw that "
        "follows espeak-ng speech of generated text. No person was recorded."
    ),
    "local": "Talking-head videos from a local folder, with speaker id, licence and source URL from its CSV.",
    "voxceleb2": (
        "VoxCeleb2 (Chung et al. 2018): face tracks of celebrity interviews on YouTube, downloaded from the "
        "official archives; metadata CC-BY-4.0, video copyright with the YouTube owners."
    ),
    "youtube": "High-resolution re-downloads (yt-dlp) of the YouTube videos behind VoxCeleb2's metadata tracks.",
    "hdtf": "HDTF (Zhang et al. 2021) clips cut from YouTube (yt-dlp) by its published spans and crop windows.",
    "celebvhq": "CelebV-HQ (Zhu et al. 2022) clips cut from YouTube (yt-dlp) by its published spans and boxes.",
    "talkvid": "TalkVid (Chen et al. 2025) clips cut from YouTube (yt-dlp) by its published spans.",
}

# Each always-present member: (field name, Croissant dataType, arrayShape or None, encodingFormat, what).
MEMBER_FIELDS = {
    schema.MP4: ("video", "sc:VideoObject", None, "video/mp4", "square face crop video, H.264"),
    schema.WAV: ("audio", "sc:AudioObject", None, "audio/wav", "16-bit PCM mono speech, T frames long"),
    schema.POSE: (
        "pose",
        "cr:Float32",
        f"-1,{len(schema.POSE_COLUMNS)}",
        "application/x-npy",
        "head pose per frame in the crop frame, columns "
        + ", ".join(schema.POSE_COLUMNS)
        + " (angles in degrees; translation and scale in crop pixels)",
    ),
    schema.CROP_TRANSFORM: (
        "crop_transform",
        "cr:Float32",
        "-1,2,3",
        "application/x-npy",
        "affine map source pixels -> crop pixels per frame",
    ),
    schema.LANDMARKS: (
        "landmarks",
        "cr:Float16",
        f"-1,{schema.N_LANDMARKS},3",
        "application/x-npy",
        "FaceMesh landmarks per frame in crop pixels (z scaled like x)",
    ),
    schema.GAZE: (
        "gaze",
        "cr:Float32",
        f"-1,{len(schema.GAZE_COLUMNS)}",
        "application/x-npy",
        "gaze per frame relative to the head, columns " + ", ".join(schema.GAZE_COLUMNS) + " (degrees)",
    ),
    schema.EXPRESSION: (
        "expression",
        "cr:Float32",
        f"-1,{len(schema.EXPRESSION_COLUMNS)}",
        "application/x-npy",
        "expression descriptor per frame, columns " + ", ".join(schema.EXPRESSION_COLUMNS) + " (template units)",
    ),
    schema.MEL: ("mel", "cr:Float32", None, "application/x-npy", "log-mel spectrogram"),
    schema.JSON: (
        "metadata",
        "sc:Text",
        None,
        "application/json",
        "sample metadata with `provenance` (clip id, speaker, source, licence, media sha256) from the manifest",
    ),
}
# Members present only with some settings: described when the shards hold them.
OPTIONAL_FIELDS = {
    schema.SPEECH: (
        "speech",
        "cr:Float32",
        "-1,-1",
        "application/x-npy",
        "pretrained speech-encoder features (wav2vec2/HuBERT, params preprocess.audio.encoder_dir), one row per frame",
    ),
}
# Manifest columns of the `clips` RecordSet: the provenance of every clip the shards could hold.
CLIP_COLUMNS = ("clip_id", "key", "speaker_id", "source_kind", "source_url", "youtube_id", "licence", "sha256")
CLIP_COLUMNS += ("split", "status", "error")


class CroissantError(InputError):
    """The Croissant description does not validate."""


def describe(shards: Path, manifest: Path, out_dir: Path) -> dict:
    """The Croissant JSON-LD of the shards in `shards` (index.json, tars, stats) made from `manifest`, with
    paths relative to `out_dir` (where croissant.json goes)."""
    index = read_json(Path(shards) / schema.INDEX_FILE)
    if index is None:
        raise InputError(f"{Path(shards) / schema.INDEX_FILE}: shards index missing or unreadable")
    dataset = index.get("dataset") or {}
    rows = ingest_manifest.read_manifest(manifest)
    manifest_sha256 = sha256_file(manifest)
    if dataset.get("manifest_sha256") not in (None, manifest_sha256):
        raise InputError(f"{manifest}: not the manifest the shards were made from (sha256 differs from index.json)")
    entries = [(split, e) for split, block in sorted((index.get("splits") or {}).items()) for e in block["shards"]]
    if not entries:
        raise InputError(f"{shards}: index.json lists no shards")
    used = _clips_in_shards(Path(shards), rows, entries)
    base = Path(os.path.relpath(Path(shards).absolute(), Path(out_dir).absolute()))
    tars = [_tar_object(Path(shards), base, split, entry) for split, entry in entries]
    manifest_object = {
        "@type": "cr:FileObject",
        "@id": "manifest",
        "name": "manifest",
        "description": "Ingest manifest: one row per source clip with speaker, source, licence, sha256, split, status.",
        "contentUrl": Path(os.path.relpath(Path(manifest).absolute(), Path(out_dir).absolute())).as_posix(),
        "contentSize": f"{Path(manifest).stat().st_size} B",
        "encodingFormat": "application/x-parquet",
        "sha256": manifest_sha256,
    }
    fields = MEMBER_FIELDS | {m: OPTIONAL_FIELDS[m] for m in _optional_members(Path(shards), entries)}
    members = [_member_file_set(member, fields[member], tars) for member in fields]
    samples = sum(block.get("samples", 0) for block in index["splits"].values())
    kinds = sorted({r["source_kind"] for r in used})
    return {
        "@context": CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": CONFORMS_TO,
        "name": "vasa-shards",
        "description": (
            f"Webdataset shards of talking-face segments for VASA-1-style training: {samples} samples "
            f"({_count_by(used, 'speaker_id')} speakers, {len(used)} clips) in {len(tars)} tar shards, splits "
            f"{', '.join(sorted(index['splits']))}. Each sample is one face segment of one clip: a "
            f"{dataset.get('crop_size')}² crop video at {dataset.get('fps')} fps, {dataset.get('sample_rate')} Hz "
            "speech, head pose, gaze, expression, landmarks and log-mel features aligned to the frames."
        ),
        "version": f"{dataset.get('schema_version', schema.SCHEMA_VERSION)}.0.0",
        "identifier": f"sha256:{sha256_file(Path(shards) / schema.INDEX_FILE)}",
        "license": _licences(used),
        "keywords": ["talking face", "audio-driven", "head pose", "webdataset", "VASA-1"],
        "citeAs": (
            "@misc{vasa_shards, title={vasa-pipeline shards, index.json sha256 "
            f"{sha256_file(Path(shards) / schema.INDEX_FILE)[:12]}" + "}, note={Made by vasa preprocess}}"
        ),
        "isBasedOn": [_source(kind, used) for kind in kinds],
        "prov:wasDerivedFrom": {"@id": "manifest"},
        "prov:wasGeneratedBy": {
            "@type": "prov:Activity",
            "name": "vasa preprocess",
            "description": (
                "decode at a constant frame rate and mono 16 kHz, track the face (MediaPipe FaceMesh), crop, fit "
                "head pose, gaze and expression, log-mel features, quality filters, shard per split: "
                + json.dumps({k: dataset[k] for k in sorted(dataset) if k != "splits"}, sort_keys=True)
            ),
        },
        "rai:dataCollection": " ".join(COLLECTION.get(kind, f"Source kind {kind}.") for kind in kinds),
        "rai:dataCollectionType": "Synthetic data" if kinds == ["sample"] else "Web scraping",
        "rai:dataPreprocessingProtocol": (
            "Clips failing a quality filter (too short, blurry, face too small or too much outside the frame, "
            "extreme pose, audio/video offset) or taken down are left out and recorded with their reason in "
            f"failures.parquet: {json.dumps(index.get('failures_by_reason') or {}, sort_keys=True)}."
        ),
        "rai:personalSensitiveInformation": _sensitive(kinds),
        "rai:dataLimitations": (
            f"{_count_by(used, 'speaker_id')} speakers only: {_speaker_counts(used)}. Face crops of "
            f"{dataset.get('crop_size')}² pixels; pose, gaze and expression are estimates from FaceMesh landmarks "
            "(about 1 degree of pose error on the sample corpus), not measurements. Speech is English."
        ),
        "rai:dataBiases": (
            "Speakers, ages, skin tones, languages and recording conditions are those of the sources and are "
            f"not balanced; clips per speaker: {_speaker_counts(used)}."
        ),
        "rai:dataUseCases": (
            "Intended: research on audio-driven talking faces (training and evaluating the face latent model and "
            "motion diffusion of VASA-1-style systems), with every generated video labelled as AI-generated. "
            "Not intended: identifying or verifying people, impersonating a real person, or generating content "
            "of a person without their consent."
        ),
        "rai:dataSocialImpact": (
            "Talking-face generators can make convincing fake videos of real people; the pipeline watermarks and "
            "C2PA-labels its outputs and honours takedown requests (data/takedown/denylist.csv)."
        ),
        "rai:dataReleaseMaintenancePlan": (
            "Takedown requests are recorded in the denylist; shards are rebuilt without the covered clips and "
            "`vasa audit` proves their absence from each new bundle."
        ),
        "distribution": [manifest_object, *tars, *members],
        "recordSet": [*_member_record_sets(dataset, fields), _clips_record_set()],
    }


def write(description: dict, path: Path) -> None:
    """Fixed key order and indent, written atomically: the same description gives the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(description, indent=1, ensure_ascii=False) + "\n")


def validate(description: dict | Path) -> list[str]:
    """Validate with mlcroissant (structure and operation graphs, as `mlcroissant validate` does). Raises
    CroissantError with mlcroissant's report on an error; returns its warnings."""
    import mlcroissant as mlc

    payload = json.loads(Path(description).read_text()) if isinstance(description, Path) else description
    ctx = mlc.Context()
    # absl logs every warning report at WARNING level; they are returned instead.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # rdflib's ConjunctiveGraph inside mlcroissant
            metadata = mlc.Metadata.from_json(ctx=ctx, json_=copy.deepcopy(payload))
            mlc.Dataset.from_metadata(metadata)
    except mlc.ValidationError as err:
        raise CroissantError(f"the Croissant description does not validate:\n{err}") from None
    finally:
        absl_logger.setLevel(level)
    if ctx.issues.errors:
        raise CroissantError("the Croissant description does not validate:\n" + "\n".join(sorted(ctx.issues.errors)))
    return sorted(ctx.issues.warnings)


def _tar_object(shards: Path, base: Path, split: str, entry: dict) -> dict:
    path = shards / entry["shard"]
    if not path.is_file():
        raise InputError(f"{path}: listed in index.json but missing")
    stats = read_json(path.with_name(path.name.removesuffix(".tar") + schema.STATS_SUFFIX)) or {}
    return {
        "@type": "cr:FileObject",
        "@id": f"shard/{entry['shard']}",
        "name": entry["shard"],
        "description": (
            f"split {split}: {entry.get('samples')} samples, {entry.get('frames')} frames; members sha256 "
            f"{stats.get('members_sha256')}"
        ),
        "contentUrl": (base / entry["shard"]).as_posix(),
        "contentSize": f"{path.stat().st_size} B",
        "encodingFormat": "application/x-tar",
        "sha256": sha256_file(path),
    }


def _optional_members(shards: Path, entries: list[tuple[str, dict]]) -> list[str]:
    """OPTIONAL_FIELDS members that some shard holds (tar headers only)."""
    found = set()
    for _, entry in entries:
        with tarfile.open(shards / entry["shard"]) as tar:
            found |= {m for name in tar.getnames() for m in OPTIONAL_FIELDS if name.endswith(f".{m}")}
    return sorted(found)


def _member_file_set(member: str, field: tuple, tars: list[dict]) -> dict:
    name, _, _, encoding, what = field
    return {
        "@type": "cr:FileSet",
        "@id": f"member/{member}",
        "name": f"{name}-files",
        "description": f"`<key>.{member}` in every shard: {what}",
        "containedIn": [{"@id": t["@id"]} for t in tars],
        "encodingFormat": encoding,
        "includes": f"*.{member}",
    }


def _member_record_sets(dataset: dict, fields: dict) -> list[dict]:
    """One RecordSet per sample member, keyed by sample key (the member's file name in its tar). Members of
    one sample share the key; every key field references the `metadata` key, the join Croissant asks for."""
    record_sets = []
    for member, (name, data_type, shape, _, what) in fields.items():
        key: dict = {
            "@type": "cr:Field",
            "@id": f"{name}/key",
            "name": "key",
            "description": "sample key `<clip key>_<segment>`; the clip key is the manifest's `key` column",
            "dataType": "sc:Text",
            "source": {
                "fileSet": {"@id": f"member/{member}"},
                "extract": {"fileProperty": "filename"},
                "transform": {"regex": "^(.*)\\." + member.replace(".", "\\.") + "$"},
            },
        }
        if member != schema.JSON:
            key["references"] = {"field": {"@id": f"{MEMBER_FIELDS[schema.JSON][0]}/key"}}
        value: dict = {
            "@type": "cr:Field",
            "@id": f"{name}/{name}",
            "name": name,
            "description": what,
            "dataType": data_type,
            "source": {"fileSet": {"@id": f"member/{member}"}, "extract": {"fileProperty": "content"}},
        }
        if member == schema.MEL:
            shape = f"-1,{dataset.get('n_mels', -1)}"
            value["description"] += (
                f", {dataset.get('mel_frames_per_video_frame')} mel frames per video frame (T x that many rows), "
                f"{dataset.get('n_mels')} bands"
            )
        if member == schema.WAV:
            value["source"]["samplingRate"] = dataset.get("sample_rate")
        if shape:
            value.update(isArray=True, arrayShape=shape)
        record_sets.append(
            {
                "@type": "cr:RecordSet",
                "@id": name,
                "name": name,
                "description": (
                    f"`{member}` of every sample (one face segment of one clip; T = its frames at {dataset.get('fps')} "
                    f"fps; schema version {dataset.get('schema_version')}, pose frame {dataset.get('pose_frame')}, "
                    f"crop mode {dataset.get('crop_mode')}; preprocessing/schema.py)"
                ),
                "key": {"@id": f"{name}/key"},
                "field": [key, value],
            }
        )
    return record_sets


def _clips_record_set() -> dict:
    return {
        "@type": "cr:RecordSet",
        "@id": "clips",
        "name": "clips",
        "description": "Provenance of every source clip (the ingest manifest); samples join on clip key.",
        "key": {"@id": "clips/clip_id"},
        "field": [
            {
                "@type": "cr:Field",
                "@id": f"clips/{column}",
                "name": column,
                "description": f"manifest column `{column}`",
                "dataType": "sc:Text",
                "source": {"fileObject": {"@id": "manifest"}, "extract": {"column": column}},
            }
            for column in CLIP_COLUMNS
        ],
    }


def _clips_in_shards(shards: Path, rows: list[dict], entries: list[tuple[str, dict]]) -> list[dict]:
    """Manifest rows of the clips with samples in the shards (tar member names carry the clip key)."""
    from preprocessing.shards import read_shard

    by_key = {row["key"]: row for row in rows}
    used: dict[str, dict] = {}
    for _, entry in entries:
        keys, _ = read_shard(shards / entry["shard"])
        for key in keys:
            row = by_key.get(key.rsplit("_", 1)[0])
            if row is None:
                raise InputError(f"{shards / entry['shard']}: sample {key} has no row in the manifest")
            used[row["clip_id"]] = row
    return [used[clip_id] for clip_id in sorted(used)]


def _licences(rows: list[dict]) -> list[str]:
    return sorted({LICENCE_URLS.get((r["licence"] or "unknown").lower(), r["licence"] or "unknown") for r in rows})


def _source(kind: str, rows: list[dict]) -> dict:
    mine = [r for r in rows if r["source_kind"] == kind]
    urls = sorted({r["source_url"] for r in mine if r["source_url"]})
    source = {
        "@type": "sc:CreativeWork",
        "name": f"{kind} source",
        "description": f"{len(mine)} clips. {COLLECTION.get(kind, '')}".strip(),
        "license": _licences(mine),
    }
    if len(urls) <= 20:  # a few named sources (the sample corpus's portraits); the manifest lists them all
        source["sameAs"] = urls
    return source


def _sensitive(kinds: list[str]) -> str:
    if kinds == ["sample"]:
        return (
            "Faces of two public-domain portraits (NASA astronaut Eileen Collins; Grace Hopper, US Navy) and "
            "synthetic espeak-ng voices; no recorded personal data. Speaker ids are the portraits' names."
        )
    return (
        "Faces and voices of identifiable people (biometric data), with speaker ids and source URLs. Process "
        "under a lawful basis, honour takedown requests, and never use the data to identify people."
    )


def _count_by(rows: list[dict], column: str) -> int:
    return len({r[column] for r in rows})


def _speaker_counts(rows: list[dict]) -> str:
    return ", ".join(f"{speaker} {n}" for speaker, n in sorted(Counter(r["speaker_id"] for r in rows).items()))
