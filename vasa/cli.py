"""`vasa`: one subcommand per pipeline stage. Thin shells: parse arguments, load params.yaml, call
the library. DVC stages run them as `python -m vasa.cli <stage> ...` with every path explicit.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from vasa.config import ConfigError, Params, load_params

Handler = Callable[[argparse.Namespace, Params], int]


def _sample(args: argparse.Namespace, params: Params) -> int:
    from preprocessing.sample.corpus import write_corpus

    clips = write_corpus(params.sample, args.out)
    seconds = sum(clip["duration_s"] for clip in clips)
    print(f"sample corpus: {len(clips)} clips, {seconds:.1f} s of video in {args.out}")
    return 0


def _add_sample(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "sample",
        help="write the embedded synthetic talking-face corpus",
        description=(
            "Synthesise the embedded sample corpus: public-domain portraits bundled in installed "
            "packages, animated (jaw following espeak-ng speech, blinks, 3D head motion) and written "
            "as 25 fps H.264 + 16 kHz AAC mp4 with a provenance JSON per clip and an index.json. "
            "Reads params section `sample`. Same params give byte-identical files; clips already "
            "present with matching sha256 and params are kept, so an interrupted run resumes."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    parser.set_defaults(handler=_sample)
    return parser


STAGES = (_add_sample,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vasa",
        description=(
            "vasa-pipeline: data and training pipeline for audio-driven talking faces. Each "
            "subcommand is one pipeline stage (see docs/ARCHITECTURE.md); `dvc repro` runs them in order."
        ),
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(title="stages", metavar="STAGE", required=True)
    for add in STAGES:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        params = load_params(args.params)
    except ConfigError as err:
        print(f"vasa: {err}", file=sys.stderr)
        return 2
    handler: Handler = args.handler
    return handler(args, params)


if __name__ == "__main__":
    sys.exit(main())
