"""`python -m vasa.extract_motion [--params P] ARGS` is `vasa [--params P] extract-motion ARGS`: the stage-1
motion encoder over every shard sample -> motion shards + normalisation statistics (vasa/motion_data.py)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from vasa.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    params = []
    if "--params" in args:
        at = args.index("--params")
        params, args = args[at : at + 2], args[:at] + args[at + 2 :]
    return cli_main([*params, "extract-motion", *args])


if __name__ == "__main__":
    sys.exit(main())
