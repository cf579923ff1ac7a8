"""The README's performance table is the one benchmarks/results.json gives.

``benchmarks/run_all.py`` writes both; this keeps a hand edit of the table (or a
results.json committed without its table) from going unnoticed. The demo's own
table, written by hand, is checked against the same file.
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


def readme_demo_row(measure: str) -> list[str]:
    """The cells after the first of the row of README's demo table whose first cell
    starts with ``measure``."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Results of the demo"):]
    section = section[:section.index("\n## ", 1)]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0].startswith(measure):
            return cells[1:]
    raise AssertionError(f"README's demo table has no row '{measure}'")


def test_readme_demo_figures_match_results_json():
    """The demo's table is written by hand from a fresh demo's metrics.json; the
    demo run_all.py timed wrote the same seed's figures into results.json, so the
    test-split figures must agree (the demo is bit-reproducible)."""
    results = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    for measure, key in (("image-to-text recall@1", "demo_i2t_recall@1"),
                         ("text-to-image recall@1", "demo_t2i_recall@1"),
                         ("ITM accuracy on hard negatives", "demo_itm_hard_negative_accuracy"),
                         ("caption attribute accuracy", "demo_caption_attribute_accuracy")):
        assert readme_demo_row(measure)[0] == f"{results[key]:.3f}", measure
    position = readme_demo_row("per attribute")[0].split("/")[-1].strip()
    assert position == f"{results['demo_caption_position_accuracy']:.2f}"
    words = " ".join((ROOT / "README.md").read_text().split())  # the text, unwrapped
    minutes, seconds = divmod(round(results["demo_seconds"]), 60)
    assert f"took {minutes} min {seconds} s of wall time" in words
    assert f"peaked at {results['demo_peak_memory_mb']:.0f} MB" in words
