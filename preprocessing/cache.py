"""The per-clip cache of stage `preprocess`: what was derived from a clip's media, and nothing else.

Layout: `CACHE/<key[:2]>/<key>.tar` holds the clip's samples (webdataset members as `process_clip`
made them) and `CACHE/<key[:2]>/<key>.json` its record: the input digest, each sample's key, frames
and seconds, the media-derived failures and frame rejections, and the tar's size. The tar is written
first and the record last (both atomically), so a record means "done" and a killed run resumes.

Only media-derived results are cached. The record is keyed by `input_digest`: the media sha256, the
clip key (it names the samples), the VoxCeleb A/V offset (a filter reads it), the params that shape
samples and the code digest. Provenance (speaker, licence, source URL, split) is deliberately left
out: it is joined from the manifest when shards are written (`preprocessing.writer`), so a licence
or split change never leaves a stale value in a shard and never forces re-processing.

Outcomes caused by the environment (missing file, permission denied, out of memory:
`Outcome.transient`) are not cached, so a fixed environment heals them on the next run.

`CACHE/records.parquet` gathers every record in one table (each sample with its media digest,
`Sample.digest`), rewritten by the driver at the end of a run. A re-run reads that table (a few
hundred bytes per clip) and decides from it alone which clips to process and which shards change;
the per-clip JSON is read only for clips the table does not hold (a killed run's finished clips), and
a clip's tar is opened only when a shard holding it is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from preprocessing.shards import Sample, write_shard
from vasa.core.config import PreprocessConfig
from vasa.core.digests import NEUTRAL, ROOT, import_closure
from vasa.core.files import atomic_path, read_json, write_json

PREPROCESSING = Path(__file__).resolve().parent
# Modules of preprocessing/ that never shape a cached clip (the shard writer and the run's survey read
# the cache and the manifest; ingest/ and sample/ are other stages). Every other top-level module is in the code digest,
# so a new module imported by process.py can never be forgotten (tests/test_preprocess.py checks that
# every module process.py imports, directly or not, is covered).
CLIP_MODULES = ("preprocessing.process",)  # what turns one clip into its sample (not the writer, not the survey)
# Installed packages whose version changes the bytes of a sample: the FaceMesh model and graph,
# OpenCV's warps and resizes, numpy's maths, PyAV/libx264 encoding and decoding, librosa's mel
# filters, decord's decoding, soxr's resampling (the sample corpus digests its packages the same way).
VERSIONED_PACKAGES = ("mediapipe", "opencv-contrib-python", "numpy", "av", "librosa", "decord", "soxr")
# Params sections that do not change what a clip yields (where it runs, how samples are sharded).
NOT_SHAPING_PARAMS = frozenset({"runner", "shards"})
RECORDS_FILE = "records.parquet"
_FAILURE = pa.struct([(name, pa.string()) for name in ("key", "status", "reason", "detail")])
_SAMPLE = pa.struct([("key", pa.string()), ("frames", pa.int32()), ("seconds", pa.float64()), ("digest", pa.string())])
RECORDS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("input_digest", pa.string()),
        ("tar_bytes", pa.int64()),
        ("samples", pa.list_(_SAMPLE)),
        ("failures", pa.list_(_FAILURE)),
        ("frame_rejections", pa.map_(pa.string(), pa.int64())),
    ]
)


class Outcome(Protocol):
    """What `preprocessing.process.process_clip` returns (its `Outcome` dataclass)."""

    samples: list[Sample]
    failures: list[dict]
    frame_rejections: dict[str, int]
    transient: bool


def code_modules() -> list[Path]:
    """The files whose content is in the code digest: the import closure of the per-clip processing
    (preprocessing.process, vasa.core.digests.import_closure; the writer and the survey that read the
    cache are not in it) and the assets (the face template), sorted."""
    assets = sorted(p for p in (PREPROCESSING / "assets").glob("*") if p.is_file())
    return [*import_closure(CLIP_MODULES, skip=NEUTRAL), *assets]


def package_versions() -> dict[str, str]:
    """Version of each VERSIONED_PACKAGES distribution ("absent" when not installed, e.g. decord on a
    platform without wheels: then the PyAV fallback decodes, and the digest must say so)."""
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def code_digest() -> str:
    """sha256 over the project version, the versions of the packages that shape the bytes, and the
    content of every module and asset that shapes a cached clip: changed code invalidates the cache."""
    digest = hashlib.sha256(metadata.version("vasa-pipeline").encode() + b"\0")
    digest.update(json.dumps(package_versions(), sort_keys=True).encode())
    for path in code_modules():
        content = path.read_bytes()
        digest.update(f"\0{path.relative_to(ROOT).as_posix()}\0{len(content)}\0".encode() + content)
    return digest.hexdigest()


def input_digest(row: dict, cfg: PreprocessConfig, code: str) -> str:
    """What a clip's cached outcome depends on, and nothing else (no provenance, no split)."""
    return _input_digest(row["sha256"], row["key"], row["av_offset"], _params_code(cfg, code))


def input_digests(rows: pa.Table, cfg: PreprocessConfig, code: str) -> pa.Array:
    """`input_digest` of every row of a manifest table, in row order; the params are serialised once."""
    shared = _params_code(cfg, code)
    digests = []
    for batch in rows.select(["sha256", "key", "av_offset"]).to_batches(max_chunksize=1 << 16):
        columns = (batch.column(name).to_pylist() for name in ("sha256", "key", "av_offset"))
        digests += [_input_digest(*values, shared) for values in zip(*columns, strict=True)]
    return pa.array(digests, pa.string())


def _params_code(cfg: PreprocessConfig, code: str) -> str:
    params = json.dumps(cfg.model_dump(mode="json", exclude=set(NOT_SHAPING_PARAMS)), sort_keys=True)
    return hashlib.sha256(f"{params}\0{code}".encode()).hexdigest()


def _input_digest(sha256: str, key: str, av_offset: int | None, params_code: str) -> str:
    payload = {
        "sha256": sha256,
        "key": key,  # names the samples (`<key>_<start>`)
        "av_offset": av_offset,  # filters.segment_problems rejects large A/V offsets
        "params_code": params_code,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def paths(cache: Path, key: str) -> tuple[Path, Path]:
    """(samples tar, record JSON) of a clip; two hex levels keep folders small at VoxCeleb2 scale."""
    folder = cache / key[:2]
    return folder / f"{key}.tar", folder / f"{key}.json"


def lookup(cache: Path, key: str, digest: str) -> dict | None:
    """The cached record of a clip if it was made from the same inputs and its tar is intact, else
    None (never seen, other inputs, or a damaged cache entry: then the clip is processed again)."""
    tar_path, json_path = paths(cache, key)
    record = read_json(json_path)
    if record is None or record.get("input_digest") != digest:
        return None
    if not all("digest" in sample for sample in record.get("samples", [])):
        return None  # written before samples carried their digest: made again
    try:
        intact = tar_path.stat().st_size == record.get("tar_bytes")
    except OSError:
        return None
    return record if intact else None


def make_record(key: str, digest: str, outcome: Outcome) -> dict:
    """The JSON record of an outcome (without the sample bytes). Failures keep only media-derived
    fields: `clip_id` and `split` are joined from the manifest when shards are written."""
    return {
        "key": key,
        "input_digest": digest,
        "samples": [
            {"key": s.key, "frames": s.frames, "seconds": s.seconds, "digest": s.digest()} for s in outcome.samples
        ],
        "failures": [{k: f[k] for k in ("key", "status", "reason", "detail")} for f in outcome.failures],
        "frame_rejections": dict(outcome.frame_rejections),
        "transient": bool(getattr(outcome, "transient", False)),
    }


def store(cache: Path, key: str, digest: str, outcome: Outcome) -> dict:
    """Cache an outcome (tar, then the record that marks it done) and return its record. A transient
    outcome is returned but not stored, and its samples are dropped: the clip is retried next run."""
    record = make_record(key, digest, outcome)
    if record["transient"]:
        record["samples"] = []
        return record
    tar_path, json_path = paths(cache, key)
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    write_shard(tar_path, outcome.samples)
    record["tar_bytes"] = tar_path.stat().st_size
    write_json(json_path, record)
    return record


def drop(cache: Path, key: str) -> bool:
    """Remove a clip's cached outcome (tar and record); True when there was one (a takedown)."""
    found = False
    for path in paths(cache, key):
        try:
            path.unlink()
            found = True
        except FileNotFoundError:
            pass
    return found


def read_records(cache: Path) -> pa.Table:
    """CACHE/records.parquet as a table of RECORDS_SCHEMA (empty when there is none or it is
    unreadable: then the per-clip JSON records are read, which is slower but always right)."""
    path = Path(cache) / RECORDS_FILE
    if not path.is_file():
        return RECORDS_SCHEMA.empty_table()
    try:
        return pq.read_table(path, schema=RECORDS_SCHEMA).replace_schema_metadata(None)
    except (OSError, pa.ArrowException):
        return RECORDS_SCHEMA.empty_table()


def records_table(records: Iterable[dict]) -> pa.Table:
    """Records (as `store` or `lookup` give them) as a table of RECORDS_SCHEMA. A transient record
    keeps its failures but gets no `tar_bytes`: it is never written to records.parquet."""
    rows = [
        {name: record.get(name) for name in RECORDS_SCHEMA.names}
        | {"frame_rejections": sorted(record.get("frame_rejections", {}).items())}
        | ({"tar_bytes": None} if record.get("transient") else {})
        for record in records
    ]
    return pa.Table.from_pylist(rows, schema=RECORDS_SCHEMA)


def record_dicts(table: pa.Table) -> dict[str, dict]:
    """Clip key -> record as `store` returns it, for the rows of a records table (a few at a time:
    a record as a dict takes a few KB)."""
    rows = table.to_pylist()
    for row in rows:
        row["frame_rejections"] = dict(row["frame_rejections"] or [])
        row["transient"] = row["tar_bytes"] is None
    return {row["key"]: row for row in rows}


def write_records(cache: Path, records: pa.Table) -> None:
    """Write every stored record (one with `tar_bytes`) of a records table to CACHE/records.parquet,
    sorted by key, atomically."""
    stored = records.filter(pc.is_valid(records["tar_bytes"]))
    table = stored.sort_by("key").combine_chunks().cast(RECORDS_SCHEMA)
    os.makedirs(cache, exist_ok=True)
    with atomic_path(Path(cache) / RECORDS_FILE) as tmp:
        pq.write_table(table, tmp, compression="zstd")


class CacheError(RuntimeError):
    """A cache entry does not hold what its record says (damaged or edited cache)."""


def load_samples(cache: Path, key: str, record: dict) -> Iterator[Sample]:
    """The samples of a cached clip, in key order, exactly as `process_clip` made them. Raises
    CacheError when the tar and the record disagree."""
    tar_path, _ = paths(cache, key)
    sizes = {s["key"]: s for s in record["samples"]}
    try:
        size = tar_path.stat().st_size
    except OSError as err:
        raise CacheError(f"{tar_path}: missing cache entry ({err}); delete its record to re-process the clip") from err
    if record.get("tar_bytes") is not None and size != record["tar_bytes"]:
        raise CacheError(f"{tar_path}: {size} bytes, its record says {record['tar_bytes']}; delete it to re-process")
    members: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(tar_path) as tar:
            for info in tar.getmembers():
                sample_key, _, ext = info.name.partition(".")
                members.setdefault(sample_key, {})[ext] = tar.extractfile(info).read()
    except (OSError, tarfile.TarError) as err:
        raise CacheError(f"{tar_path}: unreadable cache entry ({err}); delete it to re-process the clip") from err
    if set(members) != set(sizes):
        raise CacheError(f"{tar_path}: holds samples {sorted(members)}, its record lists {sorted(sizes)}")
    for sample_key in sorted(members):
        yield Sample(sample_key, members[sample_key], sizes[sample_key]["frames"], sizes[sample_key]["seconds"])
