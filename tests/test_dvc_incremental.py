"""`dvc repro` of the project's own `preprocess` stage after 1 % new clips rewrites only their shards.

DVC empties a stage's outputs before running it unless they are `persist`; then every run would
write every shard again, whatever the stage decides. Here the stage's command and outputs are taken
from the project's dvc.yaml, on a synthetic cached corpus (tests/test_incremental.py), and a shard
counts as rewritten when its inode or mtime changed (equal bytes written again would pass a hash).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from preprocessing import shards
from preprocessing.ingest import manifest
from tests.conftest import REPO
from tests.test_dvc_pipeline import _run
from tests.test_incremental import _cache, _cfg, _rows
from tests.test_shard_pin import _clips_of, _written


def test_dvc_versions_the_manifest_not_the_media_work_area():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in stages["ingest"]["outs"]]
    assert outs == ["data/ingest/manifest.parquet"]  # downloads, zips and media stay out of the DVC cache
    assert {"data/ingest/manifest.parquet": {"persist": True}} in stages["ingest"]["outs"]
    assert {"data/shards": {"persist": True}} in stages["preprocess"]["outs"]
    assert "data/layout/shards_pin.txt" in {d.split()[0] for d in stages["preprocess"]["deps"]}


def _project(tmp_path: Path, params) -> tuple[Path, object]:
    project = tmp_path / "project"
    (project / "data" / "ingest").mkdir(parents=True)
    for versioned in ("data/takedown/denylist.csv", "data/layout/shards_pin.txt"):
        (project / versioned).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / versioned, project / versioned)
    cfg = _cfg(params, digits=1, per_shard=8)
    settings = yaml.safe_load((REPO / "params.yaml").read_text())
    settings["preprocess"]["shards"] |= {"bucket_hex_digits": 1, "max_clips_per_shard": 8}
    settings["preprocess"]["runner"] |= {"kind": "threads", "workers": 2}
    (project / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["preprocess"]
    assert {"data/shards": {"persist": True}} in stage["outs"], "data/shards must be a persist output"
    stage["deps"] = ["data/ingest/manifest.parquet", "data/takedown/denylist.csv", "data/layout/shards_pin.txt"]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"preprocess": stage}}, sort_keys=False))
    _run(["git", "init", "-q"], project)
    _run(["dvc", "init", "-q"], project)
    return project, cfg


@pytest.mark.slow
def test_dvc_repro_after_new_clips_rewrites_only_their_shards(params, tmp_path):
    project, cfg = _project(tmp_path, params)
    old, new = _rows(400, seed=31), _rows(4, seed=32)
    _cache(old + new, cfg, project / "data" / "preprocess_cache")  # outcomes cached: no FaceMesh runs
    manifest.write_manifest(project / "data/ingest/manifest.parquet", old)
    _run(["dvc", "repro", "-q"], project)
    out = project / "data" / "shards"
    before = _written(out)
    assert len(before) > 20
    manifest.write_manifest(project / "data/ingest/manifest.parquet", old + new)
    _run(["dvc", "repro", "-q"], project)
    after = _written(out)
    rewritten = {n for n in after if before.get(n) != after[n]}
    new_keys = {r["key"] for r in new}
    assert rewritten and all(_clips_of(out / n) & new_keys for n in rewritten)  # only shards holding a new clip
    assert len(rewritten) <= 2 * len(new) < len(after) / 4
    assert {n: before[n] for n in before.keys() & after.keys() - rewritten} == {
        n: after[n] for n in before.keys() & after.keys() - rewritten
    }
    assert "up to date" in _run(["dvc", "status"], project).lower()
    # Pin the layout, then more clips: no pinned shard is touched under `dvc repro` either.
    shards.write_pin(project / "data/layout/shards_pin.txt", shards.grow_pin({}, [r["key"] for r in old + new]))
    _run(["dvc", "repro", "-q"], project)
    pinned = _written(out)
    assert pinned == after  # pinning what is there moves no shard
    later = _rows(2, seed=33)
    _cache(later, cfg, project / "data" / "preprocess_cache")
    manifest.write_manifest(project / "data/ingest/manifest.parquet", old + new + later)
    _run(["dvc", "repro", "-q"], project)
    final = _written(out)
    assert {n: final[n] for n in pinned} == pinned
    added = set(final) - set(pinned)
    assert added and all(shards.generation_of(n.removesuffix(".tar")) == 1 for n in added)
