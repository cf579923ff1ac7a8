"""The command line with Hugging Face models: ``caption``, ``ask`` and ``retrieve``
``--from-pretrained`` with a folder or a model name in a (fake) local hub cache,
the decoding options, and what the printed text holds. Expected texts are
transformers' (tests/fixtures/hf/reference, see reference/make_hf_fixtures.py)."""
import json
import re
import shutil
import sys
import types
from pathlib import Path

import pytest

from minblip import hf, hf_hub
from minblip.__main__ import BLIP2_PROMPT, main

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
PHOTO = str(Path(__file__).parent.parent / "data_samples" / "photos" / "grace_hopper.jpg")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def meta(name):
    return json.loads((FIXTURES / "reference" / f"{name}.json").read_text(encoding="utf-8"))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def printed(out):
    """The text after "IMAGE: " on each printed line."""
    return [line.split(": ", 1)[1] if ": " in line else "" for line in out.splitlines()]


def greedy(m, prompt_len):
    """The fixture's greedy generation without a minimum length, for this prompt length."""
    return next(g for g in m["generations"] if g["method"] == "greedy" and g["min_length"] == 0
                and len(g["prompt"]) == prompt_len)


# ---------------------------------------------------------------------------------------
# BLIP-2 and BLIP VQA folders
# ---------------------------------------------------------------------------------------

def test_caption_with_blip2_prints_what_transformers_decodes(capsys):
    m = meta("blip2_opt_q8")
    g = greedy(m, 1)
    code, out, _ = run(capsys, "caption", PHOTO, "--from-pretrained",
                       str(FIXTURES / "blip2_opt_q8"), "--method", "greedy",
                       "--max-length", str(g["max_length"]), "--min-length", "0")
    assert code == 0 and printed(out) == [g["text"]]


def test_a_blip2_caption_starts_with_its_prompt(capsys):
    m = meta("blip2_opt_q8")
    P = len(m["generations"][-1]["prompt"])  # the question's tokens, BOS included
    g = greedy(m, P)
    code, out, _ = run(capsys, "caption", PHOTO, "--from-pretrained",
                       str(FIXTURES / "blip2_opt_q8"), "--prompt", m["question"],
                       "--method", "greedy", "--max-length", str(g["max_length"]),
                       "--min-length", "0")
    assert code == 0 and printed(out) == [g["text"]]
    assert g["text"].startswith(m["question"])


def test_ask_blip2_prompts_question_answer_and_prints_the_answer(capsys):
    m = meta("blip2_opt_q8")
    assert m["question"] == BLIP2_PROMPT.format("what is in the picture?")
    P = len(m["generations"][-1]["prompt"])
    g = greedy(m, P)
    code, out, _ = run(capsys, "ask", PHOTO, "what is in the picture?", "--from-pretrained",
                       str(FIXTURES / "blip2_opt_q8"), "--method", "greedy",
                       "--max-length", str(g["max_length"]), "--min-length", "0")
    assert code == 0
    assert printed(out) == [g["text"][len(m["question"]):].strip()]


def test_ask_blip_vqa_prints_transformers_answers(capsys):
    m = meta("blip_vqa")
    for a in m["answers"]:
        code, out, _ = run(capsys, "ask", PHOTO, m["question"], "--from-pretrained",
                           str(FIXTURES / "blip_vqa"), "--method", a["method"],
                           "--beams", str(a["num_beams"]), "--max-length", str(a["max_length"]),
                           "--min-length", str(a["min_length"]))
        assert code == 0 and printed(out) == [a["text"]], a


def test_ask_answers_each_image(capsys):
    code, out, _ = run(capsys, "ask", PHOTO, PHOTO, "what?", "--from-pretrained",
                       str(FIXTURES / "blip_vqa"), "--method", "greedy")
    assert code == 0 and len(out.splitlines()) == 2
    assert len(set(printed(out))) == 1  # the same image twice: the same answer


@pytest.mark.parametrize("argv, message", [
    (["caption", PHOTO, "--from-pretrained", str(FIXTURES / "blip_vqa")],
     "caption needs a BlipForConditionalGeneration or a BLIP-2 folder"),
    (["ask", PHOTO, "why?", "--from-pretrained", str(FIXTURES / "opt_project")],
     "cannot tell the model kind"),
    (["retrieve", PHOTO, "--text", "a", "--from-pretrained", str(FIXTURES / "blip2_opt_q1")],
     "retrieve needs a BlipForImageTextRetrieval folder"),
    (["caption", PHOTO, "--from-pretrained", str(FIXTURES / "blip2_opt_q8"),
      "--max-length", "3", "--prompt", "a photo of"],
     "max_length \\(3\\) counts them"),
    (["caption", PHOTO, "--checkpoint", "x.npz", "--download"], "--download fetches"),
])
def test_wrong_models_and_options_are_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_decoding_options_are_checked_by_the_parser(capsys):
    for bad in (["--beams", "0"], ["--max-length", "-1"], ["--min-length", "x"]):
        with pytest.raises(SystemExit):
            main(["caption", PHOTO, "--from-pretrained", "somewhere", *bad])
        assert "expected" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# BLIP folders: captions with the prompt, the options, retrieval
# ---------------------------------------------------------------------------------------

def tiny_blip(tmp_path, kind):
    from test_hf_interop import tiny_model
    model, tok = tiny_model()
    hf.save_blip(model, tmp_path, kind, tokenizer=tok)
    return tmp_path


def test_blip_caption_includes_the_prompt_and_follows_the_options(tmp_path, capsys):
    folder = str(tiny_blip(tmp_path, "captioning"))
    code, out, _ = run(capsys, "caption", PHOTO, "--from-pretrained", folder, "--method",
                       "greedy", "--prompt", "a picture of", "--max-length", "9",
                       "--min-length", "9")
    words = printed(out)[0].split()
    assert code == 0 and words[:3] == ["a", "picture", "of"]
    assert len(words) == 9 - 1  # [DEC] counts and is not printed; no early [SEP] below 9
    code, out, _ = run(capsys, "caption", PHOTO, "--from-pretrained", folder, "--beams", "2",
                       "--max-length", "4", "--min-length", "4")
    assert code == 0 and len(printed(out)[0].split()) == 3


def test_retrieve_with_a_hf_retrieval_folder(tmp_path, capsys):
    folder = tiny_blip(tmp_path, "retrieval")
    code, out, _ = run(capsys, "retrieve", PHOTO, PHOTO, "--text", "a red circle",
                       "--from-pretrained", str(folder))
    assert code == 0 and out.startswith("images ranked for: 'a red circle'")
    lines = out.splitlines()[1:]
    assert len(lines) == 2 and lines[0].split("score")[1] == lines[1].split("score")[1]


# ---------------------------------------------------------------------------------------
# Model names: the local hub cache, --download
# ---------------------------------------------------------------------------------------

def fake_cache(root: Path, name="minblip/tiny-blip2", fixture="blip2_opt_q8") -> Path:
    """The hub cache layout huggingface_hub writes: refs/main names the snapshot."""
    repo = root / ("models--" + name.replace("/", "--"))
    shutil.copytree(FIXTURES / fixture, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_a_model_name_is_found_in_the_local_cache(tmp_path, monkeypatch, capsys, variable):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    cache = tmp_path / "hub" if variable == "HF_HOME" else tmp_path
    snapshot = fake_cache(cache)
    monkeypatch.setenv(variable, str(tmp_path))
    assert hf_hub.hub_cache() == cache
    assert hf_hub.resolve_pretrained("minblip/tiny-blip2") == snapshot
    assert hf_hub.cached_snapshot("minblip/tiny-blip2", COMMIT) == snapshot  # a commit hash
    by_name = run(capsys, "caption", PHOTO, "--from-pretrained", "minblip/tiny-blip2",
                  "--method", "greedy", "--max-length", "6")
    by_folder = run(capsys, "caption", PHOTO, "--from-pretrained",
                    str(FIXTURES / "blip2_opt_q8"), "--method", "greedy", "--max-length", "6")
    assert by_name[0] == 0 and printed(by_name[1]) == printed(by_folder[1])


def test_a_name_missing_from_the_cache_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    code, _, err = run(capsys, "caption", PHOTO, "--from-pretrained", "Salesforce/blip-x")
    assert code == 2 and "add --download to fetch it" in err and str(tmp_path) in err
    code, _, err = run(capsys, "caption", PHOTO, "--from-pretrained", "Salesforce/blip-x",
                       "--download")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pip install huggingface_hub" in err
    code, _, err = run(capsys, "caption", PHOTO, "--from-pretrained", "not a name")
    assert code == 2 and "no such folder, and not a Hugging Face model name" in err


def test_download_asks_huggingface_hub_for_the_files_minblip_reads(tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    calls = []

    def snapshot_download(repo_id, revision, allow_patterns):
        calls.append((repo_id, revision, allow_patterns))
        return str(fake_cache(tmp_path / "fetched"))

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(snapshot_download=snapshot_download))
    code, out, _ = run(capsys, "caption", PHOTO, "--from-pretrained", "minblip/tiny-blip2",
                       "--download", "--method", "greedy", "--max-length", "5")
    assert code == 0 and len(printed(out)) == 1
    assert calls == [("minblip/tiny-blip2", "main", hf_hub.DOWNLOAD_PATTERNS)]
    assert "*.safetensors" in hf_hub.DOWNLOAD_PATTERNS
    assert not any("bin" in p for p in hf_hub.DOWNLOAD_PATTERNS)  # never a pickle


@pytest.mark.parametrize("text, ok", [("Salesforce/blip2-opt-2.7b", True), ("a/b", True),
                                      ("a", False), ("a/b/c", False), ("../x/y", False),
                                      ("a/..", False), ("-a/b", False)])
def test_what_counts_as_a_model_name(text, ok):
    assert hf_hub.is_model_name(text) == ok


def test_a_broken_cache_entry_is_not_a_snapshot(tmp_path):
    snapshot = fake_cache(tmp_path)
    (snapshot / "config.json").unlink()
    assert hf_hub.cached_snapshot("minblip/tiny-blip2", cache=tmp_path) is None
    assert hf_hub.cached_snapshot("minblip/other", cache=tmp_path) is None


def test_a_minblip_checkpoint_caption_includes_the_prompt_too(tmp_path, capsys):
    from test_train import TINY

    from minblip.train import TrainConfig, blip_trainer
    trainer = blip_trainer(TrainConfig(**{**TINY, "steps": 1, "warmup_steps": 0}))
    trainer.save(tmp_path / "checkpoint.npz")
    code, out, _ = run(capsys, "caption", PHOTO, "--checkpoint", str(tmp_path / "checkpoint.npz"),
                       "--prompt", "a", "--method", "greedy", "--max-length", "6",
                       "--min-length", "6")
    words = printed(out)[0].split()
    # [DEC] a + 4 tokens, of which an untrained model may write special ones (not printed)
    assert code == 0 and words[0] == "a" and 1 < len(words) <= 1 + (6 - 2)
