"""Atomic writes (minblip.files) and every writer of the package that uses them:
the permissions a written file gets, what a failed write leaves behind, and the
clean-up of temporary files an interrupted write left."""
import json
import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minblip import hf, report, world
from minblip.checkpoint import save_checkpoint
from minblip.files import (remove_stale_temps, write_atomic, write_bytes_atomic,
                           write_json_atomic, write_jsonl_atomic, write_text_atomic)
from minblip.layers import Linear
from minblip.tokenizer import Tokenizer
from minblip.wordpiece import WordPieceTokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=lambda m: f"umask {m:03o}")
def umask(request):
    """Run the test under a known umask, then restore the one before."""
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_usual_mode(folder: Path, umask: int) -> None:
    """Every file in ``folder`` has the mode of any file the process creates."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert files
    modes = {p.name: oct(mode(p)) for p in files}
    assert modes == {p.name: oct(0o666 & ~umask) for p in files}


# ---------------------------------------------------------------------------------------
# Every writer of the package, each writing into a fresh folder
# ---------------------------------------------------------------------------------------

def write_checkpoint(folder: Path) -> None:
    save_checkpoint(folder / "checkpoint.npz", Linear(3, 2, np.random.default_rng(0)),
                    {"d": 3}, step=1)


def write_safetensors(folder: Path) -> None:
    hf.write_safetensors(folder / "model.safetensors", {"w": np.ones((2, 3), np.float32)},
                         metadata={"format": "pt"})


def write_report_json(folder: Path) -> None:
    write_json_atomic(folder / "metrics.json", {"recall@1": 0.5, "steps": 3})


def write_figure(folder: Path) -> None:
    report.plot_similarity(np.eye(4), folder / "similarity_matrix.png", n=4)


def write_tokenizer(folder: Path) -> None:
    Tokenizer(["a", "red", "circle"]).save(folder / "tokenizer.json")


def write_vocab(folder: Path) -> None:
    WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "##b"]).save(folder / "vocab.txt")


def write_world_split(folder: Path) -> None:
    dataset = world.make_dataset(3, 0, 0, seed=0)
    world.save_split(world.make_noisy(dataset.train, 0.5, seed=0), folder / "split")


WRITERS = {"checkpoint": write_checkpoint, "safetensors": write_safetensors,
           "report json": write_report_json, "figure": write_figure,
           "tokenizer": write_tokenizer, "wordpiece vocab": write_vocab,
           "world split": write_world_split}


@pytest.mark.parametrize("write", WRITERS.values(), ids=WRITERS.keys())
def test_every_writer_gives_the_usual_permissions_and_leaves_no_temporary_file(
        tmp_path, umask, write):
    write(tmp_path)
    assert_usual_mode(tmp_path, umask)
    assert not [p.name for p in tmp_path.rglob("*.tmp")]


def test_overwriting_takes_the_usual_permissions_not_the_old_files(tmp_path, umask):
    path = tmp_path / "tokenizer.json"
    path.write_text("old")
    os.chmod(path, 0o600)
    write_tokenizer(tmp_path)
    assert mode(path) == 0o666 & ~umask


# ---------------------------------------------------------------------------------------
# The helpers
# ---------------------------------------------------------------------------------------

def test_helpers_write_exactly_the_given_content(tmp_path):
    write_bytes_atomic(tmp_path / "b", b"\x00\xffbytes")
    write_text_atomic(tmp_path / "t", "ligne\nçà\n")
    write_text_atomic(tmp_path / "latin", "çà", encoding="latin-1")
    write_atomic(tmp_path / "text", lambda file: file.write("ü\n"), binary=False)
    write_jsonl_atomic(tmp_path / "l.jsonl", [{"b": 1, "a": "é"}, [2]])
    assert (tmp_path / "b").read_bytes() == b"\x00\xffbytes"
    assert (tmp_path / "t").read_bytes() == "ligne\nçà\n".encode("utf-8")
    assert (tmp_path / "latin").read_bytes() == "çà".encode("latin-1")
    assert (tmp_path / "text").read_bytes() == "ü\n".encode("utf-8")
    assert (tmp_path / "l.jsonl").read_text() == '{"b": 1, "a": "\\u00e9"}\n[2]\n'


def test_every_helper_gives_the_usual_permissions(tmp_path, umask):
    write_atomic(tmp_path / "a", lambda file: file.write("a"), binary=False)
    write_bytes_atomic(tmp_path / "b", b"b")
    write_text_atomic(tmp_path / "t", "t")
    write_json_atomic(tmp_path / "j", {})
    write_jsonl_atomic(tmp_path / "l", [{}])
    assert_usual_mode(tmp_path, umask)


def test_json_is_sorted_indented_ascii_with_a_final_newline(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"b": [1, 2.5], "a": {"é": float("nan")}})
    assert (tmp_path / "m.json").read_text() == (
        '{\n  "a": {\n    "\\u00e9": NaN\n  },\n  "b": [\n    1,\n    2.5\n  ]\n}\n')


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()],
                         ids=["OSError", "KeyboardInterrupt"])
def test_a_failing_write_leaves_the_target_and_no_temporary_file(tmp_path, error):
    path = tmp_path / "metrics.json"
    path.write_bytes(b"the old file")

    def write(file):
        file.write(b"half of the new file")
        raise error

    with pytest.raises(type(error)):
        write_atomic(path, write)
    assert path.read_bytes() == b"the old file"
    assert os.listdir(tmp_path) == ["metrics.json"]
    with pytest.raises(type(error)):
        write_atomic(tmp_path / "new.json", write)
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_a_failing_rename_leaves_the_target_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"the old file")

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        write_safetensors(tmp_path)
    monkeypatch.undo()
    assert path.read_bytes() == b"the old file"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_write_must_be_callable(tmp_path):
    with pytest.raises(TypeError, match="write must be a callable taking an open file, got bytes"):
        write_atomic(tmp_path / "x", b"data")
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        write_text_atomic(tmp_path / "x", b"data")
    assert os.listdir(tmp_path) == []


def test_remove_stale_temps_removes_exactly_those_of_the_path(tmp_path):
    path = tmp_path / "metrics.json"
    # a writer killed in the middle of its write leaves its temporary file behind
    killed = subprocess.run(
        [sys.executable, "-c",
         "import os, sys\n"
         "from minblip.files import write_atomic\n"
         "def write(file):\n"
         "    file.write(b'half')\n"
         "    file.flush()\n"
         "    os._exit(3)\n"
         "write_atomic(sys.argv[1], write)\n", str(path)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])})
    assert killed.returncode == 3
    (left,) = os.listdir(tmp_path)
    stale = [tmp_path / left, tmp_path / f".metrics.json.{secrets.token_hex(8)}.tmp"]
    stale[1].write_bytes(b"another one")
    kept = ["metrics.json", f".metrics.json.bak.{secrets.token_hex(8)}.tmp",
            f".other.json.{secrets.token_hex(8)}.tmp", ".metrics.json.notahexname.tmp",
            f".metrics.json.{secrets.token_hex(8)}.tmp.keep", "metrics.json.tmp"]
    for name in kept:
        (tmp_path / name).write_bytes(b"keep")
    removed = remove_stale_temps(path)
    assert removed == sorted(str(p) for p in stale)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    assert remove_stale_temps(path) == []
    assert remove_stale_temps(tmp_path / "no such folder" / "x.json") == []

