"""Prefect flow for stage `ingest`: configured sources -> media files + one parquet manifest.

    vasa ingest --out data/ingest --sample-dir data/sample [--local-dir DIR --local-csv CSV]
                [--voxceleb-dir DIR ...] [--downloads DIR]
                [--hdtf-dir DIR] [--celebvhq-json FILE] [--talkvid-json FILE ...]

The flow only wires tasks; the logic lives in preprocessing/ingest/. One bad item never stops
the run: a failed part, a corrupt archive, an unavailable video or an unreadable file becomes a
manifest row with its status and reason, and the other sources' rows still land.

Secrets stay out of Prefect's database: its flow and task parameters are stored there, so the flow
receives the config with every download URL redacted (`download.redact_url`), and `run` keeps the
real URLs (user-info, signed query tokens) in this process only, for the download task to use.
Credentials from the environment variables named in params (`ingest.voxceleb2.user_env` /
`password_env`) and `${VAR}` references in part URLs are read inside the download task.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm import tqdm

from preprocessing import denylist
from preprocessing.ingest import incremental, lists, manifest, probe, sources, splits, voxceleb
from vasa.core.config import ArchiveConfig, IngestConfig, YoutubeConfig

MANIFEST_NAME = "manifest.parquet"
STATE_NAME = "probe_state.json"  # (size, mtime) of each file when it was hashed: see incremental.py

# (archive name, part number) -> the part's URL as configured, secrets included. Filled by `run`
# for the flow's duration; never a flow or task parameter (Prefect stores those).
_REAL_URLS: dict[tuple[str, int], str] = {}
_REAL_URLS_LOCK = threading.Lock()


@task
def download_archive(archive: ArchiveConfig, downloads: Path, user_env: str, password_env: str, budget: dict) -> Path:
    """Download every part (resuming, transient errors retried within the deadline), join them in
    order and verify the joined archive."""
    from preprocessing.ingest.archive import join_parts
    from preprocessing.ingest.download import (
        ChecksumError,
        DownloadError,
        RemoteFile,
        download_with_retries,
        expand_env,
        file_digest,
        url_file_name,
    )

    user, password = os.environ.get(user_env), os.environ.get(password_env)
    auth = (user, password) if user and password else None
    parts = []
    for number, part in enumerate(archive.parts):
        with _REAL_URLS_LOCK:
            url = _REAL_URLS.get((archive.name, number), part.url)
        try:
            url = expand_env(url, os.environ)
        except KeyError as err:
            raise DownloadError(str(err.args[0])) from None
        name = url_file_name(url) or f"{archive.name}.part{number:02d}"
        remote = RemoteFile(url=url, name=name, size=part.size, md5=part.md5)
        parts.append(download_with_retries(remote, downloads, auth=auth, **budget))
    joined = downloads / archive.name
    if len(parts) == 1 and parts[0].name == archive.name:
        joined = parts[0]
    elif not joined.exists() or joined.stat().st_size != sum(p.stat().st_size for p in parts):
        join_parts(parts, joined)  # hundreds of GB for the dev set: join once, not on every run
    if archive.md5 and file_digest(joined, "md5") != archive.md5.lower():
        joined.unlink()
        raise ChecksumError(f"{archive.name}: md5 of the joined parts does not match params")
    return joined


@task
def extract_archive(archive_path: Path, dest: Path, max_bytes: int, max_ratio: float) -> list[dict]:
    """Extract safely; refused members (zip-slip, links, devices, duplicates, bombs) come back as rows."""
    from preprocessing.ingest.archive import extract_zip

    result = extract_zip(archive_path, dest, max_total_bytes=max_bytes, max_ratio=max_ratio)
    return voxceleb.rejected_member_rows(archive_path.name, result.rejected)


def _transient_failure(task, task_run, state) -> bool:
    """Prefect retry condition: retry only failures that may heal (`transient` on the exception)."""
    error = state.result(raise_on_failure=False)
    return bool(getattr(error, "transient", False))


@task(retry_condition_fn=_transient_failure)
def fetch_youtube(youtube_id: str, dest: Path, cfg: YoutubeConfig) -> Path:
    from preprocessing.ingest.youtube import fetch_reference

    return fetch_reference(youtube_id, cfg.url_template, dest, ytdlp_format=cfg.format)


@task
def probe_batch(rows: list[dict]) -> list[tuple[dict, incremental.FileStamp | None]]:
    """Probe each row's media; returns (row with media facts, the file's stamp taken BEFORE hashing,
    so a file changed while it was read gets a newer mtime than recorded and is hashed again)."""
    probed = []
    for row in rows:
        stamp = incremental.FileStamp.of(row["media_path"])
        fields = probe.probe_media(row["media_path"])
        if row["status"] != manifest.OK:  # keep the earlier verdict; still record the media facts
            fields.update(status=row["status"], error=row["error"])
        probed.append((row | fields, stamp))
    return probed


def ingest_voxceleb(
    cfg: IngestConfig,
    out_dir: Path,
    downloads: Path,
    extracted: Sequence[Path],
    deny: denylist.Denylist,
    previous: dict[str, dict],
    recorded: dict[str, incremental.FileStamp],
) -> tuple[list[dict], dict[str, incremental.FileStamp]]:
    """Download and extract the configured archives, then map every tree to manifest rows
    (VoxCeleb2 media and/or YouTube re-downloads, as the sources ask). Returns the rows and the
    stamps of the metadata files parsed (or reused from `previous`: see voxceleb.scan)."""
    from preprocessing.ingest.archive import ArchiveError, UnsafeArchiveError, extraction_folder

    vox = cfg.voxceleb2
    rows: list[dict] = []
    roots = list(extracted)
    if vox.archives:
        vox_root = out_dir / "voxceleb2"
        budget = {"retries": vox.retries, "retry_delay_s": vox.retry_delay_s, "deadline_s": vox.part_deadline_s}
        for archive in vox.archives:
            try:  # one folder per archive: a name that gives none is refused before downloading
                dest = extraction_folder(vox_root, archive.name)
            except UnsafeArchiveError as err:
                error = f"{type(err).__name__}: {err}"
                rows.append(voxceleb.archive_row(archive.name, manifest.BAD_ARCHIVE, error, vox.licence))
                continue
            try:
                path = download_archive(archive, downloads, vox.user_env, vox.password_env, budget)
            except Exception as err:  # noqa: BLE001 - any failure is a recorded status (messages are redacted)
                error = f"{type(err).__name__}: {err}"
                rows.append(voxceleb.archive_row(archive.name, manifest.DOWNLOAD_FAILED, error, vox.licence))
                continue
            try:
                rows += extract_archive(path, dest, vox.max_extract_bytes, vox.max_compression_ratio)
            except (ArchiveError, OSError) as err:
                error = f"{type(err).__name__}: {err}"
                rows.append(voxceleb.archive_row(archive.name, manifest.BAD_ARCHIVE, error, vox.licence))
        roots.append(vox_root)
    stamps: dict[str, incremental.FileStamp] = {}
    for root in roots:
        found, parsed = voxceleb.scan(root, vox.licence, previous, recorded)
        stamps.update(parsed)
        if "voxceleb2" in cfg.sources:
            rows += voxceleb.media_rows(found)
        if "youtube" in cfg.sources:
            rows += ingest_youtube(cfg, found, out_dir / "youtube", downloads / "youtube", deny)
    return rows, stamps


def ingest_youtube(
    cfg: IngestConfig, vox_rows: list[dict], out_dir: Path, cache: Path, deny: denylist.Denylist
) -> list[dict]:
    """Re-download each metadata track's YouTube video and cut + crop it at cfg.youtube.size (never
    for a row the takedown denylist covers). Each distinct video is one `fetch_youtube` task, all
    submitted at once to the flow's task runner; a track is read again only when it is cut."""
    from preprocessing.decode import DecodeError
    from preprocessing.ingest.youtube import cut_and_crop

    yt = cfg.youtube
    rows: list[dict] = []
    to_cut: list[tuple[int, dict]] = []  # (index in rows, vox row) of tracks whose re-cut is not there yet
    for vox_row in sorted(vox_rows, key=lambda r: r["clip_id"]):
        if vox_row["frame_start"] is None:  # no metadata, or metadata that did not parse
            continue
        row = voxceleb.youtube_row(vox_row, out_dir)
        taken = deny.reason(row)
        if taken is not None:
            rows.append(row | {"status": denylist.TAKEN_DOWN, "error": taken})
        elif row["bbox_units"] != "fraction":
            rows.append(row | {"status": manifest.BAD_METADATA, "error": "pixel boxes (VoxCeleb1): frame size unknown"})
        else:
            if not Path(row["media_path"]).exists():
                to_cut.append((len(rows), vox_row))
            rows.append(row)

    references = fetch_references([v["youtube_id"] for _, v in to_cut], cache, yt)
    for index, vox_row in to_cut:
        row = rows[index]
        reference = references[vox_row["youtube_id"]]
        if isinstance(reference, str):
            rows[index] = row | {"status": manifest.UNAVAILABLE, "error": reference}
            continue
        utterance = voxceleb.Utterance(vox_row["speaker_id"], vox_row["youtube_id"], vox_row["utterance"], "train")
        target = Path(row["media_path"])
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            track = voxceleb.read_track(Path(vox_row["metadata_path"]), utterance)
            cut = cut_and_crop(
                Path(reference),
                track.frames,
                track.boxes,
                target,
                size=yt.size,
                enlarge=yt.enlarge,
                smooth_frames=yt.smooth_frames,
            )
            rows[index] = row | {"max_outside_fraction": round(float(cut["max_outside_fraction"]), 6)}
        except (voxceleb.MetadataError, OSError) as err:  # changed or gone since the scan
            rows[index] = row | {"status": manifest.BAD_METADATA, "error": str(err)}
        except (ValueError, DecodeError) as err:
            rows[index] = row | {"status": manifest.UNREADABLE, "error": str(err)}
    return rows


def fetch_references(youtube_ids: Sequence[str], cache: Path, yt: YoutubeConfig) -> dict[str, Path | str]:
    """Each distinct video is one `fetch_youtube` task, all submitted at once to the flow's task
    runner. Returns youtube id -> the downloaded file, or the reason it is unavailable."""
    from prefect.futures import wait

    from preprocessing.ingest.youtube import UnavailableError

    fetch = fetch_youtube.with_options(retries=yt.retries, retry_delay_seconds=yt.retry_delay_s)
    futures = {yid: fetch.submit(yid, cache, yt) for yid in dict.fromkeys(youtube_ids)}
    wait(list(futures.values()))
    references: dict[str, Path | str] = {}
    for youtube_id, future in futures.items():
        try:
            references[youtube_id] = future.result()
        except UnavailableError as err:
            references[youtube_id] = str(err)
    return references


def read_lists(
    cfg: IngestConfig, hdtf_dir: Path | None, celebvhq_json: Path | None, talkvid_json: Sequence[Path]
) -> tuple[list[lists.Entry], list[dict]]:
    """The entries of every configured corpus list, and rows for its unusable entries."""
    entries: list[lists.Entry] = []
    rows: list[dict] = []
    if "hdtf" in cfg.sources:
        hdtf = _required(hdtf_dir, "hdtf", "--hdtf-dir")
        if not hdtf.is_dir():
            raise sources.SourceError(f"{hdtf}: HDTF list folder not found (HDTF_dataset/ of github.com/MRzzm/HDTF)")
        found, bad = lists.read_hdtf(hdtf, cfg.hdtf.subsets, cfg.hdtf.licence, cfg.hdtf.max_span_s)
        entries, rows = entries + found, rows + bad
    if "celebvhq" in cfg.sources:
        path = _existing_file(_required(celebvhq_json, "celebvhq", "--celebvhq-json"))
        found, bad = lists.read_celebvhq(path, cfg.celebvhq.licence, cfg.celebvhq.max_span_s)
        entries, rows = entries + found, rows + bad
    if "talkvid" in cfg.sources:
        if not talkvid_json:
            raise sources.SourceError("source 'talkvid' is configured but --talkvid-json was not given")
        for path in talkvid_json:
            found, bad = lists.read_talkvid(_existing_file(path), cfg.talkvid.licence, cfg.talkvid.max_span_s)
            entries, rows = entries + found, rows + bad
    return entries, rows


def ingest_lists(
    cfg: IngestConfig, entries: list[lists.Entry], out_dir: Path, cache: Path, deny: denylist.Denylist
) -> list[dict]:
    """Cut every corpus-list entry (lists.Entry) through the YouTube path, as `ingest_youtube` does
    for VoxCeleb2 tracks: one download per distinct video, the span cut at 25 fps and the list's
    box (scaled to the downloaded frame) cropped at cfg.youtube.size with the source's `enlarge`.
    Entries the denylist covers are never downloaded; media already cut is kept."""
    from preprocessing.decode import DecodeError
    from preprocessing.ingest.youtube import cut_and_crop, frame_size

    yt = cfg.youtube
    rows: list[dict] = []
    to_cut: list[tuple[int, lists.Entry]] = []
    for entry in sorted(entries, key=lambda e: e.clip_id):
        row = lists.entry_row(entry, out_dir)
        taken = deny.reason(row)
        if taken is not None:
            rows.append(row | {"status": denylist.TAKEN_DOWN, "error": taken})
            continue
        if not Path(row["media_path"]).exists():
            to_cut.append((len(rows), entry))
        rows.append(row)

    references = fetch_references([entry.youtube_id for _, entry in to_cut], cache, yt)
    for index, entry in to_cut:
        row, reference = rows[index], references[entry.youtube_id]
        if isinstance(reference, str):
            rows[index] = row | {"status": manifest.UNAVAILABLE, "error": reference}
            continue
        target = Path(row["media_path"])
        target.parent.mkdir(parents=True, exist_ok=True)
        enlarge = getattr(cfg, entry.source).enlarge
        try:
            frames, boxes = lists.track(entry, *frame_size(Path(reference)))
            cut = cut_and_crop(Path(reference), frames, boxes, target, size=yt.size, enlarge=enlarge, smooth_frames=1)
            rows[index] = row | {"max_outside_fraction": round(float(cut["max_outside_fraction"]), 6)}
        except lists.ListError as err:
            rows[index] = row | {"status": manifest.BAD_METADATA, "error": f"{entry.where}: {err}"}
        except (ValueError, DecodeError) as err:
            rows[index] = row | {"status": manifest.UNREADABLE, "error": str(err)}
    return rows


@flow(name="ingest", log_prints=True)
def ingest_flow(
    cfg: IngestConfig,
    out_dir: Path,
    sample_dir: Path | None = None,
    local_dir: Path | None = None,
    local_csv: Path | None = None,
    voxceleb_dirs: list[Path] | None = None,
    downloads_dir: Path | None = None,
    denylist_path: Path | None = None,
    hdtf_dir: Path | None = None,
    celebvhq_json: Path | None = None,
    talkvid_json: list[Path] | None = None,
) -> dict[str, int]:
    """Ingest every configured source into `out_dir/manifest.parquet`; returns counts by status.
    Rows the takedown denylist covers get status `taken_down` before any probing, new or kept.
    Call it through `run`, which keeps secrets out of these (stored) parameters."""
    out_dir.mkdir(parents=True, exist_ok=True)
    deny = denylist.load(denylist_path) if denylist_path else denylist.Denylist()
    manifest_path, state_path = out_dir / MANIFEST_NAME, out_dir / STATE_NAME
    existing = {row["clip_id"]: row for row in manifest.read_existing(manifest_path)}
    state, parsed_state = incremental.read_states(state_path)
    parsed: dict[str, incremental.FileStamp] = {}
    rows: list[dict] = []
    if "sample" in cfg.sources:
        rows += sources.scan_sample(_required(sample_dir, "sample", "--sample-dir"))
    if "local" in cfg.sources:
        rows += sources.scan_local(_required(local_dir, "local", "--local-dir"), cfg.local, local_csv)
    if {"voxceleb2", "youtube"} & set(cfg.sources):
        downloads = downloads_dir or out_dir / "downloads"
        vox_rows, parsed = ingest_voxceleb(cfg, out_dir, downloads, voxceleb_dirs or [], deny, existing, parsed_state)
        rows += vox_rows
    entries, list_rows = read_lists(cfg, hdtf_dir, celebvhq_json, talkvid_json or [])
    rows += list_rows
    if entries:
        downloads = downloads_dir or out_dir / "downloads"
        rows += ingest_lists(cfg, entries, out_dir, downloads / "youtube", deny)
    rows = splits.assign_splits(rows, cfg.holdout_speakers, cfg.val_fraction)
    rows, _ = denylist.mark(rows, deny)  # taken-down rows are `ready`: never hashed or probed

    ready, todo = incremental.plan(rows, existing, state)
    batches = [todo[i : i + cfg.probe_batch] for i in range(0, len(todo), cfg.probe_batch)]
    probed = []
    with tqdm(total=len(todo), desc="probe", unit="file", disable=not todo) as bar:
        for future in probe_batch.map(batches):
            probed += future.result()
            bar.update(len(probed) - bar.n)

    merged = manifest.merge(existing.values(), ready + [row for row, _ in probed])
    merged = incremental.mark_vanished(merged, {row["clip_id"] for row in rows})
    merged = splits.assign_splits(merged, cfg.holdout_speakers, cfg.val_fraction)  # holdout changes reach kept rows
    merged, _ = denylist.mark(merged, deny)  # rows kept from earlier runs as well
    manifest.write_manifest(manifest_path, merged)
    stamps = {cid: incremental.FileStamp(e.get("size"), e.get("mtime_ns")) for cid, e in state.items()}
    stamps.update((row["clip_id"], stamp) for row, stamp in probed)
    incremental.write_state(state_path, merged, stamps, parsed)
    counts = dict(sorted(Counter(row["status"] for row in merged).items()))
    print(f"manifest {manifest_path}: {len(merged)} clips, by status {counts}, {len(todo)} probed this run")
    return counts


def _required(path: Path | None, source: str, option: str) -> Path:
    if path is None:
        raise sources.SourceError(f"source {source!r} is configured but {option} was not given")
    return path


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise sources.SourceError(f"{path}: list file not found")
    return path


def run(cfg: IngestConfig, out_dir: Path, **paths) -> dict[str, int]:
    """Run the flow with cfg.workers threads probing media; `paths` as for ingest_flow.

    Paths are made absolute first (the manifest stores media paths that resolve from anywhere),
    and download URLs are redacted in the config the flow (and Prefect's database) sees.
    """
    from preprocessing.ingest.download import redact_url

    out_dir = Path(out_dir).absolute()
    paths = {name: _absolute(value) for name, value in paths.items()}
    real = {
        (archive.name, number): part.url
        for archive in cfg.voxceleb2.archives
        for number, part in enumerate(archive.parts)
    }
    archives = [
        archive.model_dump(mode="json")
        | {"parts": [part.model_dump(mode="json") | {"url": redact_url(part.url)} for part in archive.parts]}
        for archive in cfg.voxceleb2.archives
    ]
    shown = cfg.replace(voxceleb2=cfg.voxceleb2.replace(archives=archives))
    with _REAL_URLS_LOCK:
        _REAL_URLS.update(real)
    try:
        runner = ThreadPoolTaskRunner(max_workers=cfg.workers)
        return ingest_flow.with_options(task_runner=runner)(shown, out_dir, **paths)
    finally:
        with _REAL_URLS_LOCK:
            for key in real:
                _REAL_URLS.pop(key, None)


def _absolute(value):
    if isinstance(value, list):
        return [Path(v).absolute() for v in value]
    return Path(value).absolute() if value is not None else None
