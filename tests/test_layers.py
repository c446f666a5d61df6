"""The library's import structure: dependencies flow one way, through these layers.

Each unit (a top-level module, or a subpackage taken whole) may import only units of
lower layers; inside a subpackage its modules import each other freely, but no module
import may close a cycle. The app (`app/`, installed as `lora_diffusion.app`) and the
command line sit on top; `__main__` modules (`python -m lora_diffusion.app`) are entry
points above them all.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ("errors", "paths", "bounds"),                      # leaves: the one exception type, where files are, limits
    ("zero",),                                          # DeepSpeed ZeRO-2 as the loop sees it
    ("files", "distributed"),                           # atomic JSON / text / safetensors; which process this is
    ("backbone", "metrics", "base_cache"),              # a base model; scores of plain data; its kept states
    ("diffusion", "data"),                              # forward process, loss, sampler; tasks and batches
    ("methods", "suite", "plots"),                      # the PEFT methods; the suite generator; figures
    ("adapters", "evaluate", "training"),               # adapter folders; held-out metrics; the loop
    ("runs", "router", "profiling", "prepare_base",     # a fine-tuning run; composition; cost; the base;
     "jobs", "uploads"),                                # the app's job queue; adapter uploads
    ("compare", "workspace", "mixed"),                  # many runs; the app's folders of runs; mixed batches
    ("analysis", "lessons"),                            # reports; the notebooks' adapters, trained once
    ("app",),                                           # the Gradio workbench
    ("cli",),                                           # the command line (starts the app)
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def modules() -> dict[str, Path]:
    """Module name -> file, for the package and the app (installed as lora_diffusion.app)."""
    found = {}
    for folder, prefix in ((ROOT / "lora_diffusion", "lora_diffusion"), (ROOT / "app", "lora_diffusion.app")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix] + parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def unit(module: str) -> str:
    parts = module.split(".")
    if parts[-1] == "__main__":  # `python -m ...` entry points: imported by nothing, above every layer
        return "__main__"
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.fixture(scope="module")
def graph():
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_every_module_has_a_layer(graph):
    missing = sorted({unit(m) for m in graph} - set(LAYER) - {"__init__", "__main__"})
    assert not missing, f"add these to LAYERS: {missing}"


def test_imports_only_go_down_the_layers(graph):
    wrong = [f"{m} imports {t}" for m, targets in graph.items() for t in targets
             if unit(m) in LAYER and unit(t) in LAYER and unit(m) != unit(t) and LAYER[unit(t)] >= LAYER[unit(m)]]
    assert not wrong, "\n".join(wrong)


def test_there_is_no_import_cycle(graph):
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if target == "lora_diffusion":  # the package's own __init__ holds only the version
                continue
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_checker_sees_a_planted_cycle_and_an_upward_import(tmp_path):
    """The two checks above are only as good as the import reader: it must see these."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from .b import x\n")
    b.write_text("def f():\n    from . import a\n")
    known = {"lora_diffusion.a", "lora_diffusion.b"}
    assert imports("lora_diffusion.a", a, known) == {"lora_diffusion.b"}
    assert imports("lora_diffusion.b", b, known) == {"lora_diffusion.a"}
    cli = imports("lora_diffusion.cli", ROOT / "lora_diffusion" / "cli.py", set(modules()))
    assert "lora_diffusion.app.main" in cli and "lora_diffusion.runs" in cli
