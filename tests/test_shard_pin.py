"""A pinned shard layout : clips added after a pin rewrite no pinned shard.

Synthetic cached clips (as in tests/test_incremental.py) stand in for processed media.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from preprocessing import cache, shards, writer
from preprocessing.ingest import manifest
from tests.test_incremental import _cache, _cfg, _rows, _tar_digests, _write
from vasa.cli import main
from vasa.core.errors import InputError


def _sample_clips(n: int, seed: int) -> dict[str, str]:
    clips = [hashlib.sha1(f"{seed}/{i}".encode()).hexdigest()[:16] for i in range(n)]
    return {f"{clip}_00000": clip for clip in clips}


def _generation(name: str) -> int:
    return shards.generation_of(name.removesuffix(".tar"))


def test_each_pin_generation_is_its_own_trie(params):
    cfg = _cfg(params, digits=1, per_shard=8).shards
    old, week1, week2 = _sample_clips(2000, seed=1), _sample_clips(20, seed=2), _sample_clips(20, seed=3)
    pin = shards.grow_pin({}, old.values())
    before, _ = shards.plan_layers(old, cfg, "train", pin)
    assert before == shards.plan_shards(old, cfg, "train")  # pinning what is there moves nothing
    after, lookup = shards.plan_layers(old | week1, cfg, "train", pin)
    assert {n: ks for n, ks in after.items() if _generation(n) == 0} == before  # no pinned shard changed
    layer = {n: ks for n, ks in after.items() if _generation(n) == 1}
    assert sorted(k for ks in layer.values() for k in ks) == sorted(week1) and len(layer) + len(before) == len(after)
    assert all(writer.SHARD_NAME.match(f"{n}.tar") for n in after)
    assert all(n.startswith("train-g1_") for n in layer)
    for key in week1:  # a failed key is counted in the shard of its own generation's range
        assert lookup(key) in layer and key in layer[lookup(key)]
    assert all(lookup(k) == n for n, ks in before.items() for k in ks)
    # Pinning week 1 moves nothing; week 2 then only adds generation 2.
    pin = shards.grow_pin(pin, (old | week1).values())
    assert set(pin.values()) == {0, 1} and shards.plan_layers(old | week1, cfg, "train", pin)[0] == after
    later, _ = shards.plan_layers(old | week1 | week2, cfg, "train", pin)
    assert {n: ks for n, ks in later.items() if _generation(n) < 2} == after
    assert sorted(k for n, ks in later.items() if _generation(n) == 2 for k in ks) == sorted(week2)
    # Without a pin the same two weeks change shards by range: many more than the new generations hold.
    unpinned = shards.plan_shards(old | week1 | week2, cfg, "train")
    assert sum(before.get(n) != ks for n, ks in unpinned.items()) > len(later) - len(before)
    # Compacting gives the one-trie plan of all keys: the layout is a function of (keys, pin).
    compact = shards.grow_pin(pin, (old | week1 | week2).values(), compact=True)
    assert shards.plan_layers(old | week1 | week2, cfg, "train", compact)[0] == unpinned
    assert shards.plan_layers(old | week1 | week2, cfg, "train", {})[0] == unpinned


def _written(out: Path) -> dict[str, tuple[int, int]]:
    """Each tar's (inode, mtime_ns): a rewrite by rename changes them even for equal bytes."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}


def test_weekly_additions_rewrite_no_shard_of_an_earlier_generation(params, tmp_path):
    old, week1, week2, week3 = _rows(600, seed=11), _rows(6, seed=12), _rows(6, seed=13), _rows(6, seed=14)
    pin_file = tmp_path / "pin.txt"
    cfg = _cfg(params, digits=1, per_shard=8)
    cfg = cfg.replace(shards=cfg.shards.model_dump() | {"pin": str(pin_file)})
    cache_dir, out = tmp_path / "cache", tmp_path / "out"
    records = _cache(old + week1 + week2 + week3, cfg, cache_dir)
    everything = old + week1 + week2 + week3

    def pin(rows: list[dict], compact: bool = False, max_generations: int = 0) -> list[int]:
        current = shards.read_pin(pin_file) if pin_file.exists() else {}
        grown, folded = shards.fold_pin(shards.grow_pin(current, [r["key"] for r in rows], compact), max_generations)
        shards.write_pin(pin_file, grown)
        return folded

    pin(old)
    _write(cfg, old, records, cache_dir, out, "a" * 64)
    first_tars, kept = _tar_digests(out), _written(out)
    assert not any(_generation(n) for n in first_tars)
    for week, rows in enumerate((old + week1, old + week1 + week2), 1):
        _write(cfg, rows, records, cache_dir, out, "b" * 64)
        files = _written(out)
        assert {n: files[n] for n in kept} == kept, f"week {week} rewrote a shard of an earlier generation"
        layer = {n for n in files if _generation(n) == week}
        assert set(files) == set(kept) | layer
        assert set().union(*(_clips_of(out / n) for n in layer)) == {r["key"] for r in rows[600 + 6 * (week - 1) :]}
        pin(rows)  # the week's clips pinned as the generation they already have: nothing is written
        assert writer.plan_outputs(cfg, manifest.to_table(rows), cache.records_table(records.values()), out).jobs == []
        kept = files
    # Week 3 with at most 2 generations: the three small ones fold into generation 1, size-tiered;
    # generation 0 (600 clips) is not touched.
    assert pin(everything, max_generations=2) == [3, 2, 1]
    _write(cfg, everything, records, cache_dir, out, "b" * 64)
    files = _written(out)
    assert {n: files[n] for n in first_tars} == {n: kept[n] for n in first_tars}
    assert {_generation(n) for n in files} == {0, 1}
    tiered = {n for n in files if _generation(n) == 1}
    assert set().union(*(_clips_of(out / n) for n in tiered)) == {r["key"] for r in week1 + week2 + week3}
    # Compact: the generations fold into one trie; only ranges that gained clips change.
    pin(everything, compact=True)
    _write(cfg, everything, records, cache_dir, out, "b" * 64)
    folded = _tar_digests(out)
    assert not any(_generation(n) for n in folded)
    changed = {n for n in folded.keys() | first_tars.keys() if folded.get(n) != first_tars.get(n)}
    assert 0 < len(changed) <= 2 * 18 and len(changed) < len(folded) / 4
    assert all(_clips_of(out / n) & {r["key"] for r in week1 + week2 + week3} for n in changed if n in folded)
    # The same inputs and pin from scratch: byte-identical to the incremental result.
    cold = tmp_path / "cold"
    _write(cfg, everything, records, cache_dir, cold, "b" * 64)
    assert sorted(p.name for p in cold.iterdir()) == sorted(p.name for p in out.iterdir())
    assert all((cold / p.name).read_bytes() == p.read_bytes() for p in out.iterdir())


def _clips_of(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        return {info.name.split("_")[0] for info in tar}


def test_pin_file_errors_are_clear(tmp_path):
    with pytest.raises(InputError, match=r"pin file not found: .*vasa pin-shards"):
        shards.read_pin(tmp_path / "absent.txt")
    path = tmp_path / "pin.txt"
    path.write_text("# comment\n\n" + "a" * 16 + " 0\n" + "a" * 16 + "\n")
    with pytest.raises(InputError, match=r"pin.txt:4: 'a+' is not `<clip key> <generation>`"):
        shards.read_pin(path)
    path.write_text("a" * 16 + " 0\n" + "a" * 16 + " 1\n")
    with pytest.raises(InputError, match=r"pin.txt:2: clip key a+ is listed twice"):
        shards.read_pin(path)
    with pytest.raises(InputError, match="not clip keys"):
        shards.write_pin(path, {"A" * 16: 0})
    assert shards.write_pin(path, {"b" * 16: 1, "a" * 16: 0}) == 2
    assert shards.read_pin(path) == {"a" * 16: 0, "b" * 16: 1}
    assert path.read_text() == shards.PIN_HEADER + "a" * 16 + " 0\n" + "b" * 16 + " 1\n"


def test_cli_pins_the_usable_clips_of_the_manifest(tmp_path, capsys):
    rows = _rows(6, seed=21)
    rows[1] = rows[1] | {"status": "taken_down"}
    path = tmp_path / "manifest.parquet"
    pin = tmp_path / "layout" / "pin.txt"
    params = Path(__file__).resolve().parent.parent / "params.yaml"
    command = ["--params", str(params), "pin-shards", "--manifest", str(path), "--out", str(pin)]
    manifest.write_manifest(path, rows[:4])
    assert main(command) == 0
    assert shards.read_pin(pin) == {r["key"]: 0 for i, r in enumerate(rows[:4]) if i != 1}
    assert "3 clips in 1 generation(s)" in capsys.readouterr().out
    manifest.write_manifest(path, rows[2:])  # two clips gone, two new: the new ones are generation 1
    assert main(command) == 0
    assert shards.read_pin(pin) == {rows[2]["key"]: 0, rows[3]["key"]: 0, rows[4]["key"]: 1, rows[5]["key"]: 1}
    assert "2 newly pinned, 1 no longer in the manifest" in capsys.readouterr().out
    assert main([*command, "--compact"]) == 0
    assert set(shards.read_pin(pin).values()) == {0}


def test_fold_pin_is_size_tiered():
    def sizes(pin: dict[str, int]) -> dict[int, int]:
        return dict(sorted(Counter(pin.values()).items()))

    def pin_of(counts: dict[int, int], batch: int = 0) -> dict[str, int]:
        return {f"{batch:x}{g:02x}{i:013x}": g for g, n in counts.items() for i in range(n)}

    weekly = pin_of({0: 100, **dict.fromkeys(range(1, 9), 1)})  # the first build, then 8 weeks of 1 %
    assert shards.fold_pin(weekly, 0) == (weekly, [])  # no limit
    assert shards.fold_pin(weekly, 9) == (weekly, [])  # within the limit
    folded, taken = shards.fold_pin(weekly, 8)
    assert taken == [8, 7, 6, 5, 4, 3, 2, 1] and sizes(folded) == {0: 100, 1: 8}  # generation 0 untouched
    # Eight more weeks: they fold with the older generation of their own size (a binary counter: the
    # folded generations double), still not with generation 0.
    grown = folded | pin_of(dict.fromkeys(range(2, 10), 1), batch=1)
    folded, taken = shards.fold_pin(grown, 8)
    assert taken == [9, 8, 7, 6, 5, 4, 3, 2, 1] and sizes(folded) == {0: 100, 1: 16}
    # A larger older generation stops the fold: the sizes stay decreasing.
    grown = folded | pin_of(dict.fromkeys(range(2, 10), 1), batch=2)
    folded, taken = shards.fold_pin(grown, 8)
    assert taken == [9, 8, 7, 6, 5, 4, 3, 2] and sizes(folded) == {0: 100, 1: 16, 2: 8}
    # Generation 0 folds only once what came after outnumbers it; --max 1 is a full compaction.
    folded, taken = shards.fold_pin(pin_of({0: 12, 1: 6, 2: 5}), 2)
    assert taken == [2, 1] and sizes(folded) == {0: 12, 1: 11}
    folded, taken = shards.fold_pin(pin_of({0: 10, 1: 6, 2: 5}), 2)
    assert taken == [2, 1, 0] and sizes(folded) == {0: 21}
    assert shards.fold_pin(pin_of({0: 12, 1: 6, 2: 5}), 1)[1] == [2, 1, 0]
    assert sizes(shards.fold_pin(pin_of({0: 10, 1: 6, 2: 2, 3: 1}), 3)[0]) == {0: 10, 1: 6, 2: 3}


def test_cli_max_generations_folds_the_newest(tmp_path, capsys):
    rows = _rows(13, seed=23)
    path = tmp_path / "manifest.parquet"
    pin = tmp_path / "pin.txt"
    params = Path(__file__).resolve().parent.parent / "params.yaml"
    command = ["--params", str(params), "pin-shards", "--manifest", str(path), "--out", str(pin)]
    command += ["--max-generations", "3"]
    for week, upto in enumerate((7, 9, 11)):  # generations 0, 1, 2: at the limit, nothing folded
        manifest.write_manifest(path, rows[:upto])
        assert main(command) == 0
        assert len(set(shards.read_pin(pin).values())) == week + 1
        assert "folded" not in capsys.readouterr().out
    manifest.write_manifest(path, rows)  # a fourth generation: 1, 2 and 3 fold into 1, generation 0 stays
    assert main(command) == 0
    assert shards.read_pin(pin) == {r["key"]: 0 if i < 7 else 1 for i, r in enumerate(rows)}
    out = capsys.readouterr().out
    assert "generations 1, 2, 3 folded into generation 1" in out and "13 clips in 2 generation(s)" in out
    new, before, folded = writer.pin_manifest(pin, path, max_generations=3)  # nothing new: nothing moves
    assert (new, folded) == (before, [])
    assert main([*command[:-1], "-1"]) == 2
    assert "--max-generations must be 0 (no limit) or more, not -1" in capsys.readouterr().err
