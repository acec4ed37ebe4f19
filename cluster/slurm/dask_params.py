"""Write a copy of params.yaml whose preprocess runner is the Dask cluster at ADDRESS.

Run by cluster/slurm/preprocess_dask.sbatch once the scheduler is up: `vasa preprocess` reads its
runner from params (`preprocess.runner.kind: dask`, `dask_address`), so the job gives it a params file
of its own instead of editing the checkout's. With `--wait-workers N` it first waits until N Dask
workers have joined (so the first tasks are not all scheduled on the first worker up).

    python cluster/slurm/dask_params.py params.yaml tcp://node1:8786 --out run/params.yaml --workers 64
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml


def with_dask_runner(params: dict, address: str, workers: int) -> dict:
    """`params` with preprocess.runner set to the Dask scheduler at `address` (`workers`: processes in all)."""
    runner = dict(params["preprocess"]["runner"], kind="dask", dask_address=address, workers=workers)
    return params | {"preprocess": params["preprocess"] | {"runner": runner}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("params", type=Path, help="the project's params.yaml")
    parser.add_argument("address", help="Dask scheduler address, tcp://HOST:PORT")
    parser.add_argument("--out", type=Path, required=True, help="params file to write")
    parser.add_argument("--workers", type=int, default=1, help="Dask worker processes in the cluster")
    parser.add_argument("--wait-workers", type=int, default=0, help="wait until this many workers joined")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the workers")
    args = parser.parse_args(argv)
    params = with_dask_runner(yaml.safe_load(args.params.read_text()), args.address, args.workers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(yaml.safe_dump(params, sort_keys=False))
    if args.wait_workers:
        from distributed import Client

        with Client(args.address, timeout=args.timeout) as client:
            client.wait_for_workers(args.wait_workers, timeout=args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
