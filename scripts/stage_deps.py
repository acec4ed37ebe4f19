"""The code `deps` of every DVC stage, derived from what its command imports.

Each stage runs `python -m vasa.cli [--params P] <command> ...`. The files that command executes are the
CLI's shell (vasa/cli.py and what it imports at module level) plus the import closure of the modules its
handler `_<command>` imports (vasa.core.digests.import_closure: lazy imports count). That list, and only
that list, is what dvc.yaml names as the stage's code deps; data deps and assets are kept as written.

    python scripts/stage_deps.py            # print each stage's derived code deps
    python scripts/stage_deps.py --check    # exit 1, listing the differences, when dvc.yaml disagrees
                                            # (also: a params section the code reads but `params` lacks)
    python scripts/stage_deps.py --write    # rewrite the code deps in dvc.yaml (comments elsewhere kept)

tests/test_layers.py runs the check, so a stage can never miss a module its command imports.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vasa.core.digests import PACKAGES, import_closure  # noqa: E402

CLI = "vasa.cli"
SECTIONS = frozenset(
    {"sample", "ingest", "preprocess", "train_latent", "extract_motion", "train_motion", "export", "generate"}
    | {"evaluate", "judges", "retrain"}
)
CODE_SUFFIXES = (".py",)


def handler_modules(command: str, cli: Path = ROOT / "vasa" / "cli.py") -> set[str]:
    """Project modules that the CLI handler of `command` (function `_<command>`) imports."""
    name = "_" + command.replace("-", "_")
    tree = ast.parse(cli.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            module = ast.Module(body=[node], type_ignores=[])
            return _imports_of(module)
    raise KeyError(f"vasa/cli.py has no handler {name}() for command {command!r}")


def _imports_of(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
            found.add(node.module)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def stage_code(command: str) -> list[str]:
    """Relative paths of every source file that `vasa <command>` executes, sorted."""
    modules = {CLI, *handler_modules(command)}
    files = import_closure(modules, shallow={CLI})
    return [path.relative_to(ROOT).as_posix() for path in files]


def stage_commands(dvc_yaml: str) -> dict[str, str]:
    """Stage name -> the `vasa` subcommand its cmd runs."""
    import yaml

    stages = yaml.safe_load(dvc_yaml)["stages"]
    commands = {}
    for stage, spec in stages.items():
        match = re.search(r"python -m vasa\.cli(?: --params \S+)? ([a-z-]+)", spec["cmd"])
        if not match:
            raise ValueError(f"dvc.yaml: stage {stage}: cmd is not `python -m vasa.cli [--params P] <command>`")
        commands[stage] = match.group(1)
    return commands


def is_code(dep: str) -> bool:
    return dep.endswith(CODE_SUFFIXES) or (ROOT / dep).is_dir() and dep.split("/")[0] in PACKAGES


def differences(dvc_yaml: str) -> dict[str, dict[str, list[str]]]:
    """Per stage: code files its command runs that its deps miss, and code deps it does not run."""
    import yaml

    stages = yaml.safe_load(dvc_yaml)["stages"]
    out = {}
    for stage, command in stage_commands(dvc_yaml).items():
        listed = {dep for dep in stages[stage].get("deps", []) if is_code(dep)}
        derived = set(stage_code(command))
        missing, extra = sorted(derived - listed), sorted(listed - derived)
        if missing or extra:
            out[stage] = {"missing": missing, "extra": extra}
    return out


def rewrite(dvc_yaml: str) -> str:
    """dvc.yaml with each stage's code deps replaced by the derived list (data deps, assets, comments on
    them and everything outside `deps` untouched)."""
    commands = stage_commands(dvc_yaml)
    lines = dvc_yaml.splitlines(keepends=True)
    out: list[str] = []
    stage = None
    i = 0
    while i < len(lines):
        line = lines[i]
        top = re.match(r"^  ([a-z_]+):\s*$", line)
        if top:
            stage = top.group(1)
        if stage in commands and re.match(r"^    deps:\s*$", line):
            out.append(line)
            i += 1
            kept = []
            while i < len(lines) and re.match(r"^      - ", lines[i]):
                dep = lines[i].split("- ", 1)[1].split("#", 1)[0].strip()
                if not is_code(dep):
                    kept.append(lines[i])
                i += 1
            out += kept
            out += [f"      - {path}\n" for path in stage_code(commands[stage])]
            continue
        out.append(line)
        i += 1
    return "".join(out)


def params_read(command: str) -> set[str]:
    """Params sections and keys (`section` or `section.key`) that the code `vasa <command>` runs reads as
    `params.<section>[.<key>]` (the CLI: only the command's handler). A lower bound: a config object passed
    on and read under another name is not followed, so this catches a forgotten section, not every key."""
    chains: set[str] = set()
    for path in stage_code(command):
        source = (ROOT / path).read_text()
        if path == "vasa/cli.py":
            tree = ast.parse(source)
            name = "_" + command.replace("-", "_")
            source = "".join(ast.unparse(n) for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
        chains.update(re.findall(r"\bparams\.([a-z_]+(?:\.[a-z_]+)?)", source))
    return {chain for chain in chains if chain.split(".")[0] in SECTIONS}


def missing_params(dvc_yaml: str) -> dict[str, list[str]]:
    """Per stage: params its code reads that its `params` list covers neither whole nor in part."""
    import yaml

    stages = yaml.safe_load(dvc_yaml)["stages"]
    out = {}
    for stage, command in stage_commands(dvc_yaml).items():
        listed = [str(key) for key in stages[stage].get("params", [])]
        missing = sorted(
            chain
            for chain in params_read(command)
            if not any(chain == key or chain.startswith(key + ".") or key.startswith(chain + ".") for key in listed)
        )
        if missing:
            out[stage] = missing
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml's code deps differ")
    mode.add_argument("--write", action="store_true", help="rewrite the code deps in dvc.yaml")
    parser.add_argument("--dvc-yaml", type=Path, default=ROOT / "dvc.yaml")
    args = parser.parse_args(argv)
    text = args.dvc_yaml.read_text()
    if args.write:
        args.dvc_yaml.write_text(rewrite(text))
        return 0
    if args.check:
        diff, params = differences(text), missing_params(text)
        for stage, kinds in diff.items():
            for kind, paths in kinds.items():
                for path in paths:
                    print(f"{args.dvc_yaml}: stage {stage}: {kind} {path}")
        for stage, keys in params.items():
            print(f"{args.dvc_yaml}: stage {stage}: params miss {', '.join(keys)}")
        return 1 if diff or params else 0
    for stage, command in stage_commands(text).items():
        print(f"{stage} (vasa {command}):")
        print("".join(f"  {path}\n" for path in stage_code(command)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
