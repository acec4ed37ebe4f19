"""The architecture as a test: every import points down a layer, no import cycles, and every DVC stage's
code deps are exactly what its command imports (scripts/stage_deps.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from vasa.core.digests import PACKAGES, imported_modules

REPO = Path(__file__).resolve().parents[1]

# Bottom to top. A module may import its own layer and the layers below, never above. Within a layer
# the module graph must still be acyclic.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("vasa.core",),  # config, errors, logs, digests, atomic I/O, weights files
    ("preprocessing",),  # the data half: ingest -> decode -> face -> pose -> audio -> filter -> shard
    ("vasa.models", "vasa.diffusion", "vasa.losses", "vasa.labelling"),
    ("vasa.loaders",),  # frame pairs, motion windows, judge clips
    ("vasa.training",),  # the engine and one task per trained network
    ("vasa.inference",),  # bundle, stage-1 encoder, portrait, speech, generate, stream, ONNX
    ("vasa.evaluation",),  # the judges and VASA-1's metrics
    ("vasa.provenance", "vasa.plan"),  # audit, Croissant, DVC history, promotion; the GPU budget (`vasa plan`)
    ("flows",),  # Prefect flows wiring preprocessing
    ("vasa.stages",),  # one module per DVC stage
    ("vasa.cli",),  # the only reader of argv, the environment and params.yaml
)


def layer_of(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    if module in PACKAGES:  # the package roots (their __init__ is empty)
        return -1
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def project_modules(root: Path = REPO) -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    modules = project_modules(root)
    graph = {}
    for name, path in modules.items():
        imported = {m if m in modules else m.rpartition(".")[0] for m in imported_modules(path, name)}
        graph[name] = {m for m in imported if m in modules and m != name and m not in PACKAGES}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(module)
    )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child) :] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return None


def test_every_import_points_down_a_layer():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_the_checks_catch_an_upward_import_and_a_cycle():
    graph = import_graph()
    graph["vasa.core.config"] = graph["vasa.core.config"] | {"vasa.cli"}  # the ground floor reaching the top
    assert upward_imports(graph) == ["vasa.core.config (layer 0) imports vasa.cli (layer 10)"]
    graph["vasa.cli"] = graph["vasa.cli"] | {"vasa.core.config"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and {"vasa.cli", "vasa.core.config"} <= set(cycle)


def _stage_deps():
    spec = importlib.util.spec_from_file_location("stage_deps", REPO / "scripts" / "stage_deps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dvc_stage_code_deps_are_what_each_command_imports():
    stage_deps = _stage_deps()
    assert stage_deps.differences((REPO / "dvc.yaml").read_text()) == {}


def test_a_stage_missing_a_module_it_imports_is_caught():
    stage_deps = _stage_deps()
    text = (REPO / "dvc.yaml").read_text()
    removed = text.replace("      - vasa/diffusion.py\n", "", 1)  # e.g. the demo's sampler
    assert removed != text
    diff = stage_deps.differences(removed)
    assert diff and all(kinds["missing"] == ["vasa/diffusion.py"] for kinds in diff.values())
    assert stage_deps.differences(stage_deps.rewrite(removed)) == {}  # --write repairs it


def test_dvc_stage_params_cover_the_sections_their_code_reads():
    stage_deps = _stage_deps()
    text = (REPO / "dvc.yaml").read_text()
    assert stage_deps.missing_params(text) == {}
    dropped = text.replace(
        "      - preprocess.face\n    outs:\n      - data/demo/videos", "    outs:\n      - data/demo/videos"
    )
    assert dropped != text and "preprocess.face" in stage_deps.missing_params(dropped)["demo"]


@pytest.mark.parametrize("stage", ["demo", "evaluate"])
def test_the_sampler_is_a_dependency_of_the_stages_that_generate(stage):
    stage_deps = _stage_deps()
    commands = stage_deps.stage_commands((REPO / "dvc.yaml").read_text())
    code = stage_deps.stage_code(commands[stage])
    assert {"vasa/diffusion.py", "vasa/inference/generate.py", "vasa/models/decoder.py"} <= set(code)
