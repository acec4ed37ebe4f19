"""What the per-clip cache saves: stage `preprocess` from an empty cache vs re-runs on a warm one.

    python benchmarks/preprocess_cache.py --manifest data/ingest/manifest.parquet --work /tmp/bench_cache

Three runs in one process, same params (runner from params.yaml unless --runner), timed wall-clock:
1. cold: empty cache, empty output folder;
2. warm: the same manifest again (every clip from the cache, every shard unchanged);
3. warm after a provenance change: every clip's licence edited in a copy of the manifest (nothing
   re-processed; every shard rewritten because each sample's JSON changes).
Prints one JSON line per run (seconds, clips processed / cached) and the warm/cold ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from flows.preprocess import run
from preprocessing.ingest import manifest
from vasa.core.config import load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (emptied first)")
    parser.add_argument("--runner", choices=("threads", "processes", "dask"), help="override runner.kind")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # as the CLI: no telemetry offline
    cfg = load_params(args.params).preprocess
    if args.runner:
        cfg = cfg.replace(runner=cfg.runner.model_dump() | {"kind": args.runner})
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    edited = args.work / "manifest_licence.parquet"
    rows = manifest.read_manifest(args.manifest)
    manifest.write_manifest(edited, [row | {"licence": f"{row['licence']} (edited)"} for row in rows])
    times = {}
    for name, manifest_path in (("cold", args.manifest), ("warm", args.manifest), ("warm_provenance", edited)):
        start = time.perf_counter()
        summary = run(cfg, manifest_path, args.work / "out", args.work / "cache")
        times[name] = time.perf_counter() - start
        samples = sum(split["samples"] for split in summary["splits"].values())
        line = {"run": name, "seconds": round(times[name], 2), "processed": summary["processed"]}
        print(json.dumps(line | {"cached": summary["cached"], "samples": samples, "runner": cfg.runner.kind}))
    ratios = {f"{name}/cold": round(times[name] / times["cold"], 3) for name in ("warm", "warm_provenance")}
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
