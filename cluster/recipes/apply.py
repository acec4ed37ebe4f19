"""Apply a params overlay (a recipe in this folder) where `vasa --overlay` cannot be passed: to DVC, which reads
params.yaml itself, or to a launcher that takes one params file (the Slurm scripts).

    # a DVC experiment with the recipe's values (dvc exp run -S key=value for every key the recipe sets)
    python cluster/recipes/apply.py cluster/recipes/voxceleb2_512_8gpu.yaml --dvc-sets | xargs -d '\\n' dvc exp run
    # one merged params file, e.g. for sbatch cluster/slurm/train_latent.sbatch run/params.yaml data/shards ...
    python cluster/recipes/apply.py cluster/recipes/voxceleb2_512_8gpu.yaml --out run/params.yaml

Both first merge the recipe over --params and validate the result (vasa.core.config.load_params): a recipe
with an unknown key or a value of the wrong type prints the key and exits 2 before DVC or Slurm sees it.
`--dvc-sets` prints one `--set-param=KEY=VALUE` per line, VALUE written as JSON (which DVC's Hydra override
grammar reads: quoted strings, lists in brackets, null, true/false).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's package, not an installed copy

from vasa.core.config import ConfigError, load_params  # noqa: E402


def assignments(overlay: dict, prefix: str = "") -> list[str]:
    """`dotted.key=<JSON value>` for every leaf of the overlay (a mapping is descended, anything else is a leaf)."""
    out = []
    for key, value in overlay.items():
        if isinstance(value, dict):
            out += assignments(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value, separators=(',', ':'))}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path, help="the overlay, e.g. cluster/recipes/voxceleb2_512_8gpu.yaml")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="params file (default: the repo's)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--dvc-sets", action="store_true", help="print `--set-param=KEY=VALUE` lines for dvc exp run")
    what.add_argument("--out", type=Path, help="write the merged, validated params here")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, [args.recipe])
    except ConfigError as err:
        print(f"apply.py: {err}", file=sys.stderr)
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    else:
        print("\n".join(f"--set-param={line}" for line in assignments(yaml.safe_load(args.recipe.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
