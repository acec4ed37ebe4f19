"""A pinned shard layout (issue #9): clips added after a pin rewrite no pinned shard.

Synthetic cached clips (as in tests/test_incremental.py) stand in for processed media.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest

from preprocessing import shards, writer
from preprocessing.ingest import manifest
from tests.test_incremental import _cache, _cfg, _rows, _tar_digests
from vasa.cli import main
from vasa.errors import InputError


def _sample_clips(n: int, seed: int) -> dict[str, str]:
    clips = [hashlib.sha1(f"{seed}/{i}".encode()).hexdigest()[:16] for i in range(n)]
    return {f"{clip}_00000": clip for clip in clips}


def _new_layer(name: str) -> bool:
    return name.split("-")[1].startswith(shards.NEW_LAYER)


def test_new_keys_go_to_the_new_clip_layer_and_repinning_folds_it_in(params):
    cfg = _cfg(params, digits=1, per_shard=8).shards
    old, new = _sample_clips(2000, seed=1), _sample_clips(20, seed=2)
    pin = frozenset(old.values())
    before, _ = shards.plan_layers(old, cfg, "train", pin)
    assert before == shards.plan_shards(old, cfg, "train")  # pinning what is there moves nothing
    after, lookup = shards.plan_layers(old | new, cfg, "train", pin)
    assert {n: ks for n, ks in after.items() if not _new_layer(n)} == before  # no pinned shard changed
    layer = {n: ks for n, ks in after.items() if _new_layer(n)}
    assert sorted(k for ks in layer.values() for k in ks) == sorted(new)
    assert all(writer.SHARD_NAME.match(f"{n}.tar") for n in after)
    for key in new:  # a failed key is counted in the shard of its own layer's range
        assert lookup(key) in layer and key in layer[lookup(key)]
    assert all(lookup(k) == n for n, ks in before.items() for k in ks)
    # Without the pin the same keys change shards by range: many more than the new-clip layer's.
    unpinned = shards.plan_shards(old | new, cfg, "train")
    assert sum(before.get(n) != ks for n, ks in unpinned.items()) > len(layer)
    # Pinning again gives the one-layer plan of all keys: the layout is a function of (keys, pin).
    assert shards.plan_layers(old | new, cfg, "train", pin | set(new.values()))[0] == unpinned
    assert shards.plan_layers(old | new, cfg, "train", frozenset())[0] == unpinned


def _written(out: Path) -> dict[str, tuple[int, int]]:
    """Each tar's (inode, mtime_ns): a rewrite by rename changes them even for equal bytes."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}


def test_weekly_additions_rewrite_no_pinned_shard(params, tmp_path):
    old, week1, week2 = _rows(600, seed=11), _rows(6, seed=12), _rows(6, seed=13)
    pin_file = tmp_path / "pin.txt"
    cfg = _cfg(params, digits=1, per_shard=8)
    cfg = cfg.replace(shards=cfg.shards.model_dump() | {"pin": str(pin_file)})
    cache_dir, out = tmp_path / "cache", tmp_path / "out"
    records = _cache(old + week1 + week2, cfg, cache_dir)
    assert shards.write_pin(pin_file, [r["key"] for r in old]) == 600
    writer.write_outputs(cfg, old, records, cache_dir, out, "a" * 64)
    pinned_tars, pinned_files = _tar_digests(out), _written(out)
    assert not any(_new_layer(n) for n in pinned_tars)
    for batch, rows in enumerate((old + week1, old + week1 + week2)):
        writer.write_outputs(cfg, rows, records, cache_dir, out, "b" * 64)
        tars, files = _tar_digests(out), _written(out)
        assert {n: files[n] for n in pinned_files} == pinned_files, f"week {batch + 1} rewrote a pinned shard"
        layer = {n for n in tars if _new_layer(n)}
        assert set(tars) == set(pinned_tars) | layer
        assert set().union(*(_clips_of(out / n) for n in layer)) == {r["key"] for r in rows[600:]}
    # Re-pin: the new-clip layer is folded in, its shards removed; only ranges that gained clips change.
    shards.write_pin(pin_file, [r["key"] for r in old + week1 + week2])
    writer.write_outputs(cfg, old + week1 + week2, records, cache_dir, out, "b" * 64)
    folded = _tar_digests(out)
    assert not any(_new_layer(n) for n in folded)
    changed = {n for n in folded.keys() | pinned_tars.keys() if folded.get(n) != pinned_tars.get(n)}
    assert 0 < len(changed) <= 2 * 12 and len(changed) < len(folded) / 4
    assert all(_clips_of(out / n) & {r["key"] for r in week1 + week2} for n in changed if n in folded)
    # The same inputs and pin from scratch: byte-identical to the incremental result.
    cold = tmp_path / "cold"
    writer.write_outputs(cfg, old + week1 + week2, records, cache_dir, cold, "b" * 64)
    assert sorted(p.name for p in cold.iterdir()) == sorted(p.name for p in out.iterdir())
    assert all((cold / p.name).read_bytes() == p.read_bytes() for p in out.iterdir())


def _clips_of(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        return {info.name.split("_")[0] for info in tar}


def test_pin_file_errors_are_clear(tmp_path):
    with pytest.raises(InputError, match=r"pin file not found: .*vasa pin-shards"):
        shards.read_pin(tmp_path / "absent.txt")
    path = tmp_path / "pin.txt"
    path.write_text("# comment\n\n" + "a" * 16 + "\nnot-a-key\n")
    with pytest.raises(InputError, match=r"pin.txt:4: 'not-a-key' is not a clip key"):
        shards.read_pin(path)
    with pytest.raises(InputError, match="not clip keys"):
        shards.write_pin(path, ["A" * 16])
    assert shards.write_pin(path, ["b" * 16, "a" * 16, "b" * 16]) == 2
    assert shards.read_pin(path) == {"a" * 16, "b" * 16}
    assert path.read_text() == shards.PIN_HEADER + "a" * 16 + "\n" + "b" * 16 + "\n"


def test_cli_pins_the_usable_clips_of_the_manifest(tmp_path, capsys):
    rows = _rows(5, seed=21)
    rows[1] = rows[1] | {"status": "taken_down"}
    path = tmp_path / "manifest.parquet"
    manifest.write_manifest(path, rows)
    pin = tmp_path / "layout" / "pin.txt"
    params = Path(__file__).resolve().parent.parent / "params.yaml"
    assert main(["--params", str(params), "pin-shards", "--manifest", str(path), "--out", str(pin)]) == 0
    assert shards.read_pin(pin) == {r["key"] for i, r in enumerate(rows) if i != 1}
    assert "4 clips pinned" in capsys.readouterr().out
