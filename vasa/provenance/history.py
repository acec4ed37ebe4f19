"""Earlier states of the pipeline, read back from git (dvc.lock at a revision) and DVC's local cache.

dvc.lock records the md5 of every stage output; DVC keeps each file by that md5 under
`.dvc/cache/files/md5/<2 hex>/<30 hex>` and each directory output as a `.dir` JSON listing of
`{"relpath", "md5"}`. So the manifest, the shards' index.json or a tar of any committed run can be
opened without checking it out, as long as the cache (or a `dvc fetch` from the remote) still holds it.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from vasa.core.errors import InputError

LOCK_FILE = "dvc.lock"
CACHE = Path(".dvc") / "cache" / "files" / "md5"


@dataclass(frozen=True)
class Revision:
    """A commit that changed dvc.lock."""

    commit: str
    date: str  # committer date, ISO 8601
    subject: str


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        raise InputError(f"git {' '.join(args)} in {repo}: {done.stderr.strip()}")
    return done.stdout


def lock_revisions(repo: Path) -> list[Revision]:
    """Every commit that changed dvc.lock, newest first."""
    out = git(repo, "log", "--format=%H%x1f%cI%x1f%s", "--", LOCK_FILE)
    return [Revision(*line.split("\x1f", 2)) for line in out.splitlines() if line]


def lock_at(repo: Path, rev: str) -> dict:
    """dvc.lock as committed at `rev` (parsed)."""
    try:
        return yaml.safe_load(git(repo, "show", f"{rev}:{LOCK_FILE}")) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{LOCK_FILE} at {rev[:12]}: not valid YAML: {err}") from None


def read_lock(path: Path) -> dict:
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None


def path_md5(lock: dict, path: str) -> str | None:
    """md5 that dvc.lock records for `path`, as any stage's output or dependency (outputs first)."""
    stages = (lock.get("stages") or {}).values()
    for kind in ("outs", "deps"):
        for entry in stages:
            for item in (entry or {}).get(kind) or []:
                if isinstance(item, dict) and item.get("path") == path and item.get("md5"):
                    return item["md5"]
    return None


def cache_file(repo: Path, md5: str) -> Path | None:
    """The cached file with this md5 (`.dir` listings too), or None when the cache does not hold it."""
    path = Path(repo) / CACHE / md5[:2] / md5[2:]
    return path if path.is_file() else None


def file_at(repo: Path, lock: dict, path: str) -> Path | None:
    """A file of the workspace as it was when `lock` was written: directly recorded in the lock, or inside
    a recorded directory output (through its `.dir` listing). None when not recorded or not cached."""
    md5 = path_md5(lock, path)
    if md5 is not None and not md5.endswith(".dir"):
        return cache_file(repo, md5)
    parts = Path(path).parts
    for cut in range(len(parts) - 1, 0, -1):
        folder, rel = Path(*parts[:cut]).as_posix(), Path(*parts[cut:]).as_posix()
        listing = dir_listing(repo, path_md5(lock, folder))
        if listing is not None:
            return cache_file(repo, listing[rel]) if rel in listing else None
    return None


def dir_listing(repo: Path, md5: str | None) -> dict[str, str] | None:
    """relpath -> md5 of a cached directory output (`.dir` md5), or None."""
    if md5 is None or not md5.endswith(".dir"):
        return None
    listing = cache_file(repo, md5)
    if listing is None:
        return None
    return {entry["relpath"]: entry["md5"] for entry in json.loads(listing.read_text())}


def takedown_history(repo: Path, requests: list, bundle: str, shards: str, manifest: str) -> list[dict]:
    """For every earlier bundle in the git history of dvc.lock (each distinct bundle md5 once, newest first,
    with the commits that recorded it): whether each takedown request (preprocessing.denylist.Request)
    was in its data. `contained` with the sample count, read from that commit's shard tars in the DVC cache;
    `manifest only` when its manifest lists matching clips but its shards are not cached; `absent`; or
    `unknown` when not even its manifest is cached (`dvc fetch --rev COMMIT` brings it back)."""
    from preprocessing import denylist
    from preprocessing.ingest import manifest as ingest_manifest
    from preprocessing.shards import read_shard

    found: dict[str, dict] = {}
    for rev in lock_revisions(repo):
        lock = lock_at(repo, rev.commit)
        bundle_md5 = path_md5(lock, bundle)
        if bundle_md5 is None:
            continue
        if bundle_md5 in found:
            found[bundle_md5]["commits"].append(rev.commit)
            continue
        manifest_file = file_at(repo, lock, manifest)
        rows = None
        if manifest_file is not None:
            try:
                rows = ingest_manifest.read_manifest(manifest_file)
            except InputError:  # a manifest of an older format: its clips cannot be matched
                rows = None
        listing = dir_listing(repo, path_md5(lock, shards))
        tars = {n: cache_file(repo, md5) for n, md5 in sorted((listing or {}).items()) if n.endswith(".tar")}
        keys = None
        if listing is not None and all(tars.values()):
            keys = [k for path in tars.values() for k in read_shard(path)[0]]
        states = []
        for request in requests:
            matched = {r["key"] for r in rows or [] if denylist.Denylist((request,)).match(r) is not None}
            samples = sorted(k for k in keys or [] if k.rsplit("_", 1)[0] in matched)
            if rows is None:
                status = "unknown"
            elif keys is None:
                status = "manifest only" if matched else "absent"
            else:
                status = "contained" if samples else "absent"
            states.append({"kind": request.kind, "id": request.id, "status": status, "samples": len(samples)})
        found[bundle_md5] = {
            "bundle_md5": bundle_md5,
            "commits": [rev.commit],
            "date": rev.date,
            "subject": rev.subject,
            "requests": states,
        }
    return list(found.values())
