"""The layers the folder tree shows (docs/layout.md): a module imports only from its own layer and those below.

    base       support/*.py (argument parsing; imports nothing of ours)
    model      k_model.py, support/model/
    data       dataset.py, support/data/
    loading    support/loading/
    inference  support/inference/ (generation, the evaluation the trainer runs too)
    training   trainer.py, plot_runs.py, support/training/
    entry      every other top-level script
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("base", "model", "data", "loading", "inference", "training", "entry")
TOP_LEVEL = {"k_model": "model", "dataset": "data", "trainer": "training", "plot_runs": "training"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "support":
        return TOP_LEVEL.get(parts[0], "entry")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "base"


def project_modules() -> dict[str, Path]:
    files = [*ROOT.glob("*.py"), *ROOT.glob("support/**/*.py")]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports (`from support.model import rope` counts as support.model.rope)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in known}


def test_every_support_module_sits_in_a_layer_folder():
    """support/ itself holds only what every layer may use (base) and nothing of ours is imported there."""
    modules = project_modules()
    for module, path in modules.items():
        if module.startswith("support") and layer_of(module) == "base":
            assert not imports_of(path, set(modules)), f"{module} is in support/ itself, the base layer: it may " \
                                                       f"import nothing of ours; move it into its layer's folder"


def test_no_module_imports_from_a_layer_above_its_own():
    modules = project_modules()
    upward = []
    for module, path in modules.items():
        rank = LAYERS.index(layer_of(module))
        for target in sorted(imports_of(path, set(modules))):
            if LAYERS.index(layer_of(target)) > rank:
                upward.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The rule is not vacuous: a lower-layer file importing an entry script is caught."""
    probe = tmp_path / "probe.py"
    probe.write_text("from model_sample import main\nimport support.model\n")
    assert imports_of(probe, set(project_modules())) == {"model_sample", "support.model"}
    assert LAYERS.index(layer_of("model_sample")) > LAYERS.index(layer_of("support.model.rope"))
