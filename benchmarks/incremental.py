"""Incremental preprocess at scale: from-scratch, no-op and +1 % runs of the real flow on synthetic
corpora, and the shard planner alone up to 1e6 keys, with fitted growth and a 1.13 M-clip projection.

    python benchmarks/incremental.py [--sizes 1000 3000 10000] [--planner-sizes 10000 100000 1000000]
                                     [--work /tmp/bench_incremental] [--out result.json] [--policy-weeks 26]

Each corpus size runs in its own process (clean peak RSS), with its own Prefect home (database size
measured). Clips' outcomes are synthesised straight into the cache (tiny members under distinct keys,
as `process_clip` would store them), so FaceMesh is not what is measured: the flow's driver, its
records table, the planner, shard assembly and Prefect's overhead are. Per run: wall seconds, bytes
the process read (`rchar` of /proc/self/io: every read() call, page-cache hits included), shards
written of all shards, driver RSS after the run, Prefect database bytes. The flow runs on threads
(`preprocess.runner.kind=threads`, 2 workers), `max_clips_per_shard` 64, `bucket_hex_digits` 1.

The planner part compares the key-range trie (preprocessing/shards.py) with the positional layout it
replaced (bucket by key prefix, then cut every `max` keys): shards whose content changes when 1 % random
new keys arrive, against the floor 1 - exp(-K/S) that any key-range layout with S shards has, and five
weeks of +1 % with the layout pinned after each week (`vasa pin-shards`) against the same weeks unpinned,
and half a year of weeks under each compaction policy (`retrain.compact_generations`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _io_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def _rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _keys(n: int, seed: int) -> list[str]:
    return [hashlib.sha1(f"{seed}/{i}".encode()).hexdigest()[:16] + "_00000" for i in range(n)]


# --- one corpus size: the real flow ----------------------------------------------------------------


@dataclass
class FakeOutcome:
    samples: list
    failures: list = field(default_factory=list)
    frame_rejections: dict = field(default_factory=dict)
    transient: bool = False


def _rows(n: int, seed: int) -> list[dict]:
    from preprocessing.ingest import manifest

    return [
        manifest.new_row(
            f"local:{seed}/{i}.mp4",
            "local",
            sha256=hashlib.sha256(f"{seed}/{i}".encode()).hexdigest(),
            speaker_id=f"spk{i % 997}",
            licence="CC0",
            media_path=f"/media/{seed}/{i}.mp4",
        )
        for i in range(n)
    ]


def _seed(rows: list[dict], cfg, cache_dir: Path) -> None:
    """Store each clip's outcome as a worker would (one ~2 KB sample per clip)."""
    from preprocessing import cache, schema
    from preprocessing.shards import Sample

    code = cache.code_digest()
    for row in rows:
        key = f"{row['key']}_00000"
        members = {
            schema.JSON: json.dumps({"key": key, "n_frames": 25}).encode(),
            schema.POSE: hashlib.sha512(key.encode()).digest() * 24,  # 1.5 KB of "pose"
        }
        outcome = FakeOutcome([Sample(key, members, 25, 1.0)])
        cache.store(cache_dir, row["key"], cache.input_digest(row, cfg, code), outcome)


def _db_bytes(home: Path) -> int:
    return sum(p.stat().st_size for p in home.glob("*.db*"))


def _warm_up() -> None:
    from prefect import flow

    flow(name="warm-up")(lambda: None)()


def _config():
    from vasa.core.config import load_params

    cfg = load_params(REPO / "params.yaml").preprocess
    return cfg.replace(
        runner=cfg.runner.model_dump() | {"kind": "threads", "workers": 2},
        shards={"bucket_hex_digits": 1, "max_clips_per_shard": 64},
    )


def _prepare(n: int, work: Path, grown: bool) -> None:
    """Write the manifests and seed the cache (the first corpus, or the +1 % clips when `grown`). Runs in
    a child process, so the measured driver never holds the corpus as rows nor keeps their arenas."""
    from preprocessing.ingest import manifest

    rows, new = _rows(n, seed=1), _rows(max(1, n // 100), seed=2)
    if grown:
        _seed(new, _config(), work / "cache")
        return
    manifest.write_manifest(work / "first.parquet", rows)
    manifest.write_manifest(work / "grown.parquet", rows + new)
    _seed(rows, _config(), work / "cache")


def _in_child(target, *args) -> None:
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=target, args=args)
    child.start()
    child.join()
    if child.exitcode:
        raise RuntimeError(f"{target.__name__}{args} failed with exit code {child.exitcode}")


def one_size(n: int, work: Path) -> dict:
    os.environ["PREFECT_HOME"] = str(work / "prefect")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    started = time.perf_counter()
    _in_child(_prepare, n, work, False)
    result = {"clips": n, "seed_s": round(time.perf_counter() - started, 2), "runs": {}}
    from flows.preprocess import run

    cfg = _config()
    cache_dir, out = work / "cache", work / "out"
    first, grown = work / "first.parquet", work / "grown.parquet"
    home = Path(os.environ["PREFECT_HOME"])
    _warm_up()  # the ephemeral Prefect server starts here, not inside the first timed run
    result["prefect_db_bytes_empty"] = _db_bytes(home)
    result["rss_mb_before"] = round(_rss_mb(), 1)  # imports, Prefect's server: what the runs add is on top
    for name, path in (("scratch", first), ("noop", first), ("plus1pct", grown)):
        if name == "plus1pct":
            _in_child(_prepare, n, work, True)  # the new clips' "processing"
        read0, t0 = _io_read(), time.perf_counter()
        summary = run(cfg, path, out, cache_dir)
        seconds = time.perf_counter() - t0
        shards = sum(len(s["shards"]) for s in summary["splits"].values())
        result["runs"][name] = {
            "seconds": round(seconds, 3),
            "read_bytes": _io_read() - read0,
            "shards": shards,
            "shards_written": summary["assembled"],
            "rss_mb": round(_rss_mb(), 1),
            "prefect_db_bytes": _db_bytes(home),
        }
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return result


# --- the planner alone ----------------------------------------------------------------------------


def positional_plan(keys: list[str], digits: int, limit: int) -> dict[str, list[str]]:
    """The layout before the trie: bucket by key prefix, then cut every `limit` keys (positional)."""
    buckets: dict[str, list[str]] = {}
    for key in sorted(keys):
        buckets.setdefault(key[:digits], []).append(key)
    return {
        f"{b}-{p:04d}": ks[s : s + limit]
        for b, ks in sorted(buckets.items())
        for p, s in enumerate(range(0, len(ks), limit))
    }


def _changed(before: dict, after: dict) -> int:
    return sum(1 for name, keys in after.items() if before.get(name) != keys)


def planner(n: int, digits: int, limit: int) -> dict:
    from preprocessing import shards
    from vasa.core.config import ShardConfig

    cfg = ShardConfig(bucket_hex_digits=digits, max_clips_per_shard=limit)
    old, new = _keys(n, 1), _keys(max(1, n // 100), 2)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    plan = shards.plan_shards(old, cfg, "train")
    plan_s = time.perf_counter() - t0
    grown = shards.plan_shards(old + new, cfg, "train")
    lookup = shards.ShardLookup(grown)
    probes = random.Random(0).sample(old, min(10_000, n))
    t0 = time.perf_counter()
    for key in probes:
        lookup(key)
    lookup_us = (time.perf_counter() - t0) / len(probes) * 1e6
    s, k = len(plan), len(new)
    pos_before, pos_after = positional_plan(old, digits, limit), positional_plan(old + new, digits, limit)
    return {
        "keys": n,
        "bucket_hex_digits": digits,
        "max_clips_per_shard": limit,
        "plan_s": round(plan_s, 3),
        "lookup_us": round(lookup_us, 2),
        "shards": s,
        "mean_clips_per_shard": round(n / s, 1),
        "trie_changed_pct": round(100 * _changed(plan, grown) / len(grown), 2),
        "floor_pct": round(100 * (1 - math.exp(-k / s)), 2),
        "positional_changed_pct": round(100 * _changed(pos_before, pos_after) / len(pos_after), 2),
        "planner_rss_mb": round(_rss_mb() - rss0, 1),
    }


def pinned_weeks(n: int, limit: int, weeks: int = 5) -> dict:
    """Weekly +1 % random clips for `weeks` weeks, the layout pinned after each week (`vasa pin-shards`:
    one generation per week), against the same weeks unpinned; then compacting (`--compact`). Per week:
    shards of the previous plan whose content changed or that went ("rewritten") and shards that did
    not exist ("new"), as % of the grown plan's shards, and the share of clips in new shards."""
    from preprocessing import shards
    from vasa.core.config import ShardConfig

    cfg = ShardConfig(bucket_hex_digits=1, max_clips_per_shard=limit)
    clips = {key: key[:16] for key in _keys(n, 1)}
    pin = shards.grow_pin({}, clips.values())
    prev_pinned = prev_free = shards.plan_layers(clips, cfg, "train", pin)[0]
    shards_start = len(prev_pinned)
    rows = []
    for week in range(1, weeks + 1):
        clips |= {key: key[:16] for key in _keys(max(1, n // 100), 100 + week)}
        t0 = time.perf_counter()
        pinned = shards.plan_layers(clips, cfg, "train", pin)[0]
        plan_s = time.perf_counter() - t0
        free = shards.plan_shards(clips, cfg, "train")
        row = {"week": week, "plan_s": round(plan_s, 2)}
        for label, before, after in (("pinned", prev_pinned, pinned), ("unpinned", prev_free, free)):
            rewritten = sum(1 for name, keys in before.items() if after.get(name) != keys)
            created = [name for name in after if name not in before]
            row[f"{label}_rewritten_pct"] = round(100 * rewritten / len(after), 2)
            row[f"{label}_new_pct"] = round(100 * len(created) / len(after), 2)
            row[f"{label}_clips_written_pct"] = round(
                100 * sum(len(after[name]) for name in after if before.get(name) != after[name]) / len(clips), 2
            )
        pin = shards.grow_pin(pin, clips.values())
        assert shards.plan_layers(clips, cfg, "train", pin)[0] == pinned, "pinning moved a shard"
        row["generations"] = len(set(pin.values()))
        rows.append(row)
        prev_pinned, prev_free = pinned, free
    folded = shards.plan_layers(clips, cfg, "train", shards.grow_pin(pin, clips.values(), compact=True))[0]

    def gone_pct(before: dict) -> float:
        return round(100 * sum(1 for name, keys in before.items() if folded.get(name) != keys) / len(folded), 2)

    return {
        "keys": n,
        "max_clips_per_shard": limit,
        "weeks": rows,
        "shards_start": shards_start,
        "shards_pinned_end": len(prev_pinned),
        "shards_unpinned_end": len(prev_free),
        "compact_rewritten_pct": gone_pct(prev_pinned),
    }


def compaction_policy(n: int, limit: int, weeks: int, max_generations: int, fold: bool = True) -> dict:
    """`weeks` weeks of +1 % random clips under scheduled retraining's pin policy: each week pinned as a
    new generation, then at most `max_generations` kept, by folding the newest (`fold`, shards.fold_pin,
    what `vasa retrain` does) or by compacting everything into one trie (`vasa pin-shards --compact`);
    `max_generations` 0: never pinned, one trie every week. Per week: the previous plan's shards
    rewritten or gone (% of them) and the clips written (% of the corpus: what the week's shard assembly
    reads and writes), as mean, median and worst week; the shard count at the end and at most."""
    from preprocessing import shards
    from vasa.core.config import ShardConfig

    cfg = ShardConfig(bucket_hex_digits=1, max_clips_per_shard=limit)
    clips = {key: key[:16] for key in _keys(n, 1)}
    pin = shards.grow_pin({}, clips.values())
    before = shards.plan_layers(clips, cfg, "train", pin)[0]
    start, most, folds = len(before), len(before), 0
    rewritten, written = [], []
    for week in range(1, weeks + 1):
        clips |= {key: key[:16] for key in _keys(max(1, n // 100), 100 + week)}
        grown = shards.grow_pin(pin, clips.values(), compact=max_generations == 0)
        if fold:
            grown, folded = shards.fold_pin(grown, max_generations)
            folds += bool(folded)
        elif len(set(grown.values())) > max_generations:
            grown, folds = shards.grow_pin(pin, clips.values(), compact=True), folds + 1
        after = shards.plan_layers(clips, cfg, "train", grown)[0]
        rewritten.append(100 * sum(1 for name, keys in before.items() if after.get(name) != keys) / len(before))
        written.append(100 * sum(len(keys) for name, keys in after.items() if before.get(name) != keys) / len(clips))
        pin, before, most = grown, after, max(most, len(after))

    def summary(values: list[float]) -> dict:
        ordered = sorted(values)
        middle, worst = ordered[weeks // 2], ordered[-1]
        return {"mean": round(sum(values) / weeks, 2), "median": round(middle, 2), "worst": round(worst, 2)}

    return {
        "keys": n,
        "weeks": weeks,
        "max_generations": max_generations,
        "policy": "unpinned" if max_generations == 0 else "fold" if fold else "compact",
        "folds": folds,
        "shards_rewritten_pct": summary(rewritten),
        "clips_written_pct": summary(written),
        "shards_start": start,
        "shards_end": len(before),
        "shards_most": most,
        "clips_written_pct_by_week": [round(value, 2) for value in written],
    }


def _exponent(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(y) on log(x): y ~ x^slope."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx, 3) if sxx else None


def fit(results: list[dict], target: int) -> dict:
    fits = {}
    for run in ("scratch", "noop", "plus1pct"):
        for metric in ("seconds", "read_bytes", "prefect_db_bytes"):
            points = [(r["clips"], r["runs"][run][metric]) for r in results]
            slope = _exponent(points)
            if slope is None:
                continue
            x, y = points[-1]
            fits[f"{run}.{metric}"] = {"exponent": slope, "projected_at_target": round(y * (target / x) ** slope, 1)}
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 3000, 10000])
    parser.add_argument("--planner-sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_incremental"))
    parser.add_argument("--target", type=int, default=1_130_000, help="clips to project to (VoxCeleb2: 1.13 M)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--policy-weeks", type=int, default=26, help="weeks of the compaction sweep (retrain.compact_generations)"
    )
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one corpus size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one, args.work)))
        return
    results = []
    for n in args.sizes:
        work = args.work / f"n{n}"
        subprocess.run(["rm", "-rf", str(work)], check=True)
        work.mkdir(parents=True)
        command = [sys.executable, __file__, "--one", str(n), "--work", str(work)]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"size {n} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    plans = []
    for n in args.planner_sizes:
        for digits, limit in ((1, 64), (3, 64)):
            plans.append(planner(n, digits, limit))
            print(json.dumps(plans[-1]), flush=True)
        plans.append(planner(n, 1, 8))  # small shards: the floor of an order-independent layout falls with them
        print(json.dumps(plans[-1]), flush=True)
    weekly = []
    for n in args.planner_sizes:
        if n >= 100_000:
            weekly.append(pinned_weeks(n, 64))
            print(json.dumps(weekly[-1]), flush=True)
    policies = []
    for n in args.planner_sizes:
        if n >= 100_000 and args.policy_weeks:
            for max_generations, fold in ((0, True), (5, False), (3, True), (5, True), (8, True), (13, True)):
                policies.append(compaction_policy(n, 64, args.policy_weeks, max_generations, fold))
                print(json.dumps(policies[-1]), flush=True)
    fits = fit(results, args.target) if len(results) > 1 else {}
    if len(results) > 1:  # Prefect database growth of a from-scratch run, per 1000 clips
        grow = [r["runs"]["scratch"]["prefect_db_bytes"] - r["prefect_db_bytes_empty"] for r in results]
        fits["prefect_db_bytes_per_1000_clips"] = round(
            1000 * (grow[-1] - grow[0]) / (results[-1]["clips"] - results[0]["clips"])
        )
    print(json.dumps({"fits": fits, "target_clips": args.target}))
    if args.out:
        payload = {"flow": results, "planner": plans, "pinned_weeks": weekly, "policies": policies, "fits": fits}
        args.out.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
