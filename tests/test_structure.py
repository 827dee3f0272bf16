"""The shape of the library: its import graph has no circle and runs only downward, floor by floor."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src/blurflow"

# Each module imports only from floors below its own (docs/design.md, "Modules").
FLOORS = [
    ["__init__", "files", "logs", "schema", "devices"],  # nothing of blurflow (schema: the config's keys and defaults)
    ["camera", "optics"],
    ["sources", "model", "psfmodel"],
    ["synthesis", "modelfile", "imagefile"],  # synthesis holds Setup: what every stage that makes images shares
    ["data", "testsets"],
    ["particles.fit"],  # the particles package, job by job
    ["particles.detection"],
    ["particles.frames"],
    ["particles.scoring", "particles.calibrate"],
    ["evaluate", "particles", "figures", "tracks", "field"],  # particles: the package's __init__, which gathers its modules
    ["train", "measurability", "study"],
    ["cli", "pipeline", "napari_plugin.readers"],  # pipeline: the Snakemake glue, which the library never imports
    ["napari_plugin", "napari_plugin.widgets"],  # the viewer plugin: widgets run the command line
]


def name(path: Path) -> str:
    """A module's name below blurflow: ``optics``, ``particles`` (a package's __init__), ``particles.fit``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if len(parts) > 1 and parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The blurflow modules a source file imports anywhere in it (top level, functions, type-checking blocks)."""
    modules = {name(p) for p in PACKAGE.rglob("*.py")}
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.removeprefix("blurflow.") for a in node.names if a.name.startswith("blurflow.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "blurflow":
            if node.module == "blurflow":  # from blurflow import logs, __version__
                out |= {a.name if a.name in modules else "__init__" for a in node.names}
            else:
                out.add(node.module.removeprefix("blurflow."))
    return out


def graph() -> dict[str, set[str]]:
    return {name(p): imports(p) - {name(p)} for p in PACKAGE.rglob("*.py")}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every circle found by a depth-first search (each as the path that closes it)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_the_import_graph_has_no_circle_and_every_import_runs_down_a_floor():
    edges = graph()
    floor = {m: i for i, names in enumerate(FLOORS) for m in names}
    assert set(edges) == set(floor), f"modules without a floor or floors without a module: {set(edges) ^ set(floor)}"
    assert cycles(edges) == []
    upward = sorted(f"{m} -> {n}" for m, targets in edges.items() for n in targets if floor[n] >= floor[m])
    assert upward == []
    assert not [m for m, targets in edges.items() if "pipeline" in targets]  # the glue is the workflow's, not the library's
    assert edges["schema"] == set()


def test_the_checks_find_a_circle_and_an_upward_import():
    """The test above would fail on a circle (the one of config.py before it was split)."""
    edges = {"optics": {"config"}, "config": {"synthesis", "train"}, "synthesis": {"optics"}, "train": set()}
    assert cycles(edges) == [["config", "synthesis", "optics", "config"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_guides_layout_names_every_module_preset_and_tool():
    """The guide's layout block lists what the tree holds: each library module, user-facing preset and tool."""
    root = PACKAGE.parents[1]
    guide = (root / "docs/guide.md").read_text()
    layout = guide[guide.index("## Layout") :]
    missing = [name(p) for p in PACKAGE.rglob("*.py") if p.stem != "__init__" and name(p).split(".")[-1] not in layout]
    missing += [p.name for p in (root / "workflow/presets").glob("*.yaml") if p.name not in layout]
    missing += [f"tools/{p.name}" for p in (root / "tools").iterdir() if f"tools/{p.name}" not in layout]
    assert missing == []
