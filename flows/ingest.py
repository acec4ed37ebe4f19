"""Prefect flow for stage `ingest`: configured sources -> media files + one parquet manifest.

    vasa ingest --out data/ingest --sample-dir data/sample [--local-dir DIR --local-csv CSV]
                [--voxceleb-dir DIR ...] [--downloads DIR]

Network steps (archive parts, YouTube references) are Prefect tasks with retries; a failed part
or an unavailable video becomes a manifest row with its status, never a crash. Credentials come
from the environment variables named in params (`ingest.voxceleb2.user_env`/`password_env`) and are
read inside the download task, so they never become flow parameters (which Prefect stores).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from preprocessing.ingest import manifest, probe, sources, voxceleb
from vasa.config import ArchiveConfig, IngestConfig, VoxCeleb2Config, YoutubeConfig

MANIFEST_NAME = "manifest.parquet"
PROBED_STATUSES = (manifest.OK, manifest.BAD_METADATA)  # rows whose media is hashed and inspected


@task
def download_archive(archive: ArchiveConfig, downloads: Path, vox: VoxCeleb2Config) -> Path:
    """Download every part (resuming), join them in order and verify the joined archive."""
    from preprocessing.ingest.archive import join_parts
    from preprocessing.ingest.download import ChecksumError, RemoteFile, download, file_digest

    user, password = os.environ.get(vox.user_env), os.environ.get(vox.password_env)
    auth = (user, password) if user and password else None
    parts = []
    for number, part in enumerate(archive.parts):
        name = Path(part.url.rstrip("/")).name or f"{archive.name}.part{number:02d}"
        remote = RemoteFile(url=part.url, name=name, size=part.size, md5=part.md5)
        parts.append(download(remote, downloads, auth=auth))
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
def extract_archive(archive_path: Path, dest: Path) -> list[dict]:
    """Extract safely; rejected members (zip-slip, links, devices) come back as manifest rows."""
    from preprocessing.ingest.archive import extract_zip

    result = extract_zip(archive_path, dest)
    return [
        manifest.new_row(
            f"voxceleb2-archive:{archive_path.name}:{member}",
            "voxceleb2",
            speaker_id="",
            licence="",
            status=manifest.UNSAFE_MEMBER,
            error=reason,
        )
        for member, reason in result.rejected
    ]


@task
def fetch_youtube(youtube_id: str, dest: Path, cfg: YoutubeConfig) -> Path:
    from preprocessing.ingest.youtube import fetch_reference

    return fetch_reference(youtube_id, cfg.url_template, dest, ytdlp_format=cfg.format)


@task
def probe_batch(rows: list[dict]) -> list[dict]:
    probed = []
    for row in rows:
        fields = probe.probe_media(row["media_path"])
        if row["status"] != manifest.OK:  # keep the earlier verdict; still record the media facts
            fields.update(status=row["status"], error=row["error"])
        probed.append(row | fields)
    return probed


def ingest_voxceleb(cfg: IngestConfig, out_dir: Path, downloads: Path, extracted: Sequence[Path]) -> list[dict]:
    """Download and extract the configured archives, then map every tree to manifest rows
    (VoxCeleb2 media and/or YouTube re-downloads, as the sources ask)."""
    rows: list[dict] = []
    roots = list(extracted)
    if cfg.voxceleb2.archives:
        vox_root = out_dir / "voxceleb2"
        for archive in cfg.voxceleb2.archives:
            try:
                path = download_archive.with_options(
                    retries=cfg.voxceleb2.retries, retry_delay_seconds=cfg.voxceleb2.retry_delay_s
                )(archive, downloads, cfg.voxceleb2)
            except Exception as err:  # noqa: BLE001 - any failure after retries is a recorded status
                rows.append(
                    manifest.new_row(
                        f"voxceleb2-archive:{archive.name}",
                        "voxceleb2",
                        speaker_id="",
                        licence=cfg.voxceleb2.licence,
                        status=manifest.DOWNLOAD_FAILED,
                        error=f"{type(err).__name__}: {err}",
                    )
                )
                continue
            rows += extract_archive(path, vox_root / Path(archive.name).stem)  # one folder per archive
        roots.append(vox_root)
    for root in roots:
        found, tracks = voxceleb.scan(root, cfg.voxceleb2.licence)
        if "voxceleb2" in cfg.sources:
            rows += voxceleb.media_rows(found)
        if "youtube" in cfg.sources:
            rows += ingest_youtube(cfg, found, tracks, out_dir / "youtube", downloads / "youtube")
    return rows


def ingest_youtube(cfg: IngestConfig, vox_rows: list[dict], tracks: dict, out_dir: Path, cache: Path) -> list[dict]:
    """Re-download each metadata track's YouTube video and cut + crop it at cfg.youtube.size."""
    from preprocessing.decode import DecodeError
    from preprocessing.ingest.youtube import UnavailableError, cut_and_crop

    yt = cfg.youtube
    references: dict[str, Path | str] = {}  # youtube id -> file, or the reason it is unavailable
    rows = []
    for vox_row in sorted(vox_rows, key=lambda r: r["clip_id"]):
        track = tracks.get(vox_row["clip_id"])
        if track is None:
            continue
        clip_id = vox_row["clip_id"].replace("voxceleb2:", "youtube:", 1)
        target = out_dir / vox_row["speaker_id"] / vox_row["youtube_id"] / f"{vox_row['utterance']}.mp4"
        carried = {k: vox_row[k] for k in manifest.IDENTITY_COLUMNS + manifest.TRACK_COLUMNS}
        row = manifest.new_row(clip_id, "youtube", **carried, media_path=str(target))
        if track.units != "fraction":
            rows.append(row | {"status": manifest.BAD_METADATA, "error": "pixel boxes (VoxCeleb1): frame size unknown"})
            continue
        if not target.exists():
            if track.youtube_id not in references:
                try:
                    references[track.youtube_id] = fetch_youtube.with_options(
                        retries=yt.retries, retry_delay_seconds=yt.retry_delay_s
                    )(track.youtube_id, cache, yt)
                except UnavailableError as err:
                    references[track.youtube_id] = str(err)
            reference = references[track.youtube_id]
            if isinstance(reference, str):
                rows.append(row | {"status": manifest.UNAVAILABLE, "error": reference})
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                cut_and_crop(
                    Path(reference),
                    track.frames,
                    track.boxes,
                    target,
                    size=yt.size,
                    enlarge=yt.enlarge,
                    smooth_frames=yt.smooth_frames,
                )
            except (ValueError, DecodeError) as err:
                rows.append(row | {"status": manifest.UNREADABLE, "error": str(err)})
                continue
        rows.append(row)
    return rows


def probe_rows(rows: list[dict], existing: dict[str, dict], batch: int) -> list[dict]:
    """Hash and inspect media of new or changed rows; rows already ingested from the same file
    (same path and size) keep their recorded fields, so re-runs touch nothing already ingested."""
    done, todo = [], []
    for row in rows:
        old = existing.get(row["clip_id"])
        if row["status"] not in PROBED_STATUSES or not row["media_path"]:
            done.append(row)
        elif old is not None and old["media_path"] == row["media_path"] and _same_size(row["media_path"], old):
            done.append(old)
        else:
            todo.append(row)
    futures = probe_batch.map([todo[i : i + batch] for i in range(0, len(todo), batch)])
    return done + [row for future in futures for row in future.result()]


def _same_size(path: str, old: dict) -> bool:
    try:
        return os.path.getsize(path) == old["size_bytes"]
    except OSError:
        return False


@flow(name="ingest", log_prints=True)
def ingest_flow(
    cfg: IngestConfig,
    out_dir: Path,
    sample_dir: Path | None = None,
    local_dir: Path | None = None,
    local_csv: Path | None = None,
    voxceleb_dirs: list[Path] | None = None,
    downloads_dir: Path | None = None,
) -> dict[str, int]:
    """Ingest every configured source into `out_dir/manifest.parquet`; returns counts by status."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if "sample" in cfg.sources:
        rows += sources.scan_sample(_required(sample_dir, "sample", "--sample-dir"))
    if "local" in cfg.sources:
        rows += sources.scan_local(_required(local_dir, "local", "--local-dir"), cfg.local, local_csv)
    if {"voxceleb2", "youtube"} & set(cfg.sources):
        rows += ingest_voxceleb(cfg, out_dir, downloads_dir or out_dir / "downloads", voxceleb_dirs or [])
    # Held-out speakers are test data whatever their source: never trained on.
    rows = [row | {"split": "test"} if row["speaker_id"] in cfg.holdout_speakers else row for row in rows]
    manifest_path = out_dir / MANIFEST_NAME
    existing = {row["clip_id"]: row for row in manifest.read_manifest(manifest_path)}
    probed = probe_rows(rows, existing, cfg.probe_batch)
    merged = manifest.merge(existing.values(), probed)
    manifest.write_manifest(manifest_path, merged)
    counts = dict(sorted(Counter(row["status"] for row in merged).items()))
    print(f"manifest {manifest_path}: {len(merged)} clips, by status {counts}")
    return counts


def _required(path: Path | None, source: str, option: str) -> Path:
    if path is None:
        raise sources.SourceError(f"source {source!r} is configured but {option} was not given")
    return path


def run(cfg: IngestConfig, out_dir: Path, **paths) -> dict[str, int]:
    """Run the flow with cfg.workers threads probing media; `paths` as for ingest_flow."""
    return ingest_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=cfg.workers))(cfg, out_dir, **paths)
