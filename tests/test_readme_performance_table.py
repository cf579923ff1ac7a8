"""The README's performance table is the one benchmarks/results.json gives.

``benchmarks/run_all.py`` writes both; this keeps a hand edit of the table (or a
results.json committed without its table) from going unnoticed.
"""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(name):
    """A script of benchmarks/ as a module (the scripts import their neighbours)."""
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def load_readme_table():
    return load_benchmark("readme_table")


def test_readme_table_matches_results_json():
    rt = load_readme_table()
    assert rt.update_readme(ROOT / "benchmarks" / "results.json", ROOT / "README.md",
                            check=True), "run python benchmarks/readme_table.py"


def test_table_says_what_is_missing_and_what_misses_its_target():
    rt = load_readme_table()
    table = rt.render({"train_step_ratio_vs_torch": 1.7, "by_threads": {
        "train_step_ratio_vs_torch": {"1": 1.1, "2": 1.7}}, "demo_seconds": None})
    row = next(line for line in table.splitlines() if line.startswith("| BLIP training"))
    assert "1.10" in row and "1.70" in row and row.endswith("| **no** |")
    demo = next(line for line in table.splitlines() if "wall time" in line and "demo" in line)
    assert "not measured" in demo


def test_markers_are_required(tmp_path):
    rt = load_readme_table()
    (tmp_path / "r.json").write_text(json.dumps({}))
    (tmp_path / "README.md").write_text("# no markers here\n")
    with pytest.raises(ValueError, match="performance table"):
        rt.update_readme(tmp_path / "r.json", tmp_path / "README.md")



def test_readme_full_size_section_matches_hf_load_results():
    bench = load_benchmark("bench_hf_load")
    assert bench.update_readme(ROOT / "benchmarks" / "hf_load_results.json",
                               ROOT / "README.md", check=True), \
        "run python benchmarks/bench_hf_load.py --readme-only"


def test_full_size_section_says_what_is_not_measured():
    bench = load_benchmark("bench_hf_load")
    text = bench.render({})
    assert text.count("Not measured yet") == 3
    assert "--model blip2-opt-2.7b` (alone on the machine" in text
