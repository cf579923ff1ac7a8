"""The floors of the package: each file imports only from its own floor or below.

    core -> layers -> models and objectives -> data -> training and evaluation
         -> experiments -> command line

A model never imports data, training, evaluation or reporting code, so a reader
can tell a model from its experiment by where it lives. Every import counts,
including those inside functions. DEVELOPERS.md states the same table.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minblip"

FLOORS = {
    "core": ("__init__", "core", "gradcheck", "files"),
    "layers": ("layers", "softmax", "attention", "transformer"),
    "models": ("vit", "text", "qformer", "lm", "t5", "blip", "blip2_stage1", "blip2_stage2",
               "objectives", "generation"),
    "data": ("tokenizer", "wordpiece", "bpe", "image", "world", "questions", "safetensors",
             "hf", "hf_blip2", "hf_hub"),
    "training": ("optim", "checkpoint", "blip2_checkpoint", "train", "train_blip2", "evaluate",
                 "evaluate_blip2", "report", "capfilt", "diagrams"),
    "experiments": ("demo", "blip2_pipeline", "blip2_experiment", "capfilt_experiment", "tour"),
    "cli": ("__main__", "exercises"),
}
ORDER = list(FLOORS)
FLOOR_OF = {name: floor for floor, names in FLOORS.items() for name in names}
# the lowest floor that may use each third-party package (the standard library is free
# everywhere): the math is NumPy's; images, plots and progress bars start at the data floor
THIRD_PARTY = {"numpy": "core", "PIL": "data", "matplotlib": "data", "tqdm": "data"}


def unit_of(path: Path) -> str:
    """minblip/world/splits.py -> "world"; minblip/train.py -> "train"."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0]


def imported_units(source: str, path: Path):
    """(line, unit) for every minblip unit and every third-party package the source
    imports, at any depth (module level, functions, classes)."""
    package = ("minblip",) + path.relative_to(PACKAGE).parts[:-1]  # the file's package
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else ()
            module = ".".join(base + tuple(filter(None, [node.module])))
            if node.module is None or module == "minblip":  # from . import world
                names = [f"{module}.{alias.name}" for alias in node.names]
            else:
                names = [module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "minblip" and len(parts) > 1:
                yield node.lineno, parts[1]
            elif parts[0] in THIRD_PARTY:
                yield node.lineno, parts[0]


def violations(source: str, path: Path) -> list[str]:
    unit = unit_of(path)
    floor = FLOOR_OF[unit]
    out = []
    for line, target in imported_units(source, path):
        if target in THIRD_PARTY:
            allowed = THIRD_PARTY[target]
        elif target in FLOOR_OF:
            allowed = FLOOR_OF[target]
        else:
            out.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports minblip.{target}, "
                       f"which has no floor in tests/test_layering.py")
            continue
        if ORDER.index(allowed) > ORDER.index(floor):
            out.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {unit} ({floor}) imports "
                       f"{target} ({allowed}), a higher floor")
    return out


def package_files():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_file_has_a_floor():
    missing = sorted({unit_of(p) for p in package_files()} - set(FLOOR_OF))
    assert not missing, f"give these files a floor in FLOORS: {missing}"


def test_no_import_runs_from_a_lower_floor_to_a_higher_one():
    found = [v for p in package_files() for v in violations(p.read_text(), p)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source, bad", [
    ("from .train import Trainer", True),                  # a model importing training
    ("def f():\n    from . import world\n", True),         # inside a function
    ("import minblip.evaluate as e", True),
    ("from minblip import report", True),
    ("import matplotlib.pyplot as plt", True),             # plotting is not a model's
    ("from .objectives import itc_forward", False),        # models import each other
    ("from .core import Module\nimport numpy as np", False),
])
def test_the_checker_sees_an_import_from_a_higher_floor(source, bad):
    assert bool(violations(source, PACKAGE / "blip.py")) == bad


def test_the_checker_resolves_imports_inside_a_subpackage():
    world_file = PACKAGE / "world" / "splits.py"
    assert violations("from ..train import Trainer", world_file)  # data importing training
    assert not violations("from ..core import check_float\nfrom . import scenes", world_file)
