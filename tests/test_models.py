"""Where models come from: the tiny offline model and tokenizer, short names, local paths and run
folders, the hub (never really reached: the network is faked), GGUF files."""

import os
import socket
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanor1 import common, models

# ------------------------------------------------------------------------- tiny model and tokenizer

def test_tiny_tokenizer_round_trips_after_reload(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)  # the way any real model is loaded
    texts = ["<think>\n 12 + 345 = 357\n\n  carry 1</think>\n<answer>\\boxed{357}</answer>",
             "Schön, 3 × 4 = 12 — ok?\ttab", "x^2 + 2xy + y^2 = (x + y)^2"]
    for t in texts:
        assert tok.decode(tok(t)["input_ids"]) == t
    for tag in models.TAGS:  # each tag is one token, and survives skip_special_tokens
        ids = tok(tag, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.decode(ids, skip_special_tokens=True) == tag
    assert tok.convert_ids_to_tokens(tok("2024")["input_ids"]) == ["2", "0", "2", "4"]  # digits split
    assert tok.eos_token == models.EOS and tok.pad_token == models.PAD and tok.eos_token_id != tok.pad_token_id


def test_tiny_model_loads_like_a_real_one(tiny_dir, tiny):
    model, tok = tiny
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == len(tok)
    assert models.eos_ids(model, tok) == [tok.eos_token_id]
    again = AutoModelForCausalLM.from_pretrained(tiny_dir)
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n


# ------------------------------------------------------------------------- names and loading

@pytest.mark.parametrize("name, want", [
    ("Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),
    ("Qwen2.5-Math-1.5B-Instruct", "Qwen/Qwen2.5-Math-1.5B-Instruct"),
    ("DeepSeek-R1-Distill-Qwen-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"),
    ("Llama-3.2-1B", "meta-llama/Llama-3.2-1B"),
    ("SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"),
    ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B"),
])
def test_short_names_map_to_hub_ids(name, want):
    assert models.model_source(name) == ("hub id", want)


def test_unknown_model_is_one_clear_error(tmp_path):
    with pytest.raises(common.UserError) as e:
        models.load_model("Qwen2.5-does-not-exist")
    msg = str(e.value)
    assert "Qwen2.5-does-not-exist" in msg and "Qwen/Qwen2.5-does-not-exist" in msg and "tried" in msg
    assert "HF_HUB_OFFLINE=1: only the local cache was searched" in msg  # the tests run offline
    assert msg.endswith(".)") or msg.endswith(" ...)")  # the hub client's reason cut at a sentence or a word
    with pytest.raises(common.UserError, match="does not exist"):
        models.load_model(str(tmp_path / "missing-folder"))


def test_a_long_reason_is_cut_at_a_sentence_or_a_word():
    assert models.first_line(ValueError("short.\nsecond line")) == "short."
    assert models.first_line(ValueError()) == "ValueError"
    first = "The first sentence, which is long enough to stand alone. "
    assert models.first_line(ValueError(first + "x" * 300)) == first.strip()
    short = "Error no. 5 " + "y" * 300  # "Error no." is too short a sentence, the space too early: cut hard
    assert models.first_line(ValueError(short), limit=50) == short[:46] + " ..."
    words = " ".join(["word"] * 60)  # 299 characters, no sentence end
    cut = models.first_line(ValueError(words), limit=50)
    assert cut == " ".join(["word"] * 9) + " ..." and len(cut) <= 50
    path = "/" + "p" * 300  # one long word: cut hard, still under the limit
    assert models.first_line(ValueError(f"no file {path}"), limit=50) == f"no file {path}"[:46] + " ..."


def test_local_folder_and_bare_ids(tiny_dir):
    assert models.model_source(tiny_dir) == ("local folder", tiny_dir)
    assert models.model_source("gpt2") == ("hub id", "gpt2")


def test_a_tokenizer_larger_than_the_model_is_refused(tiny_dir, tmp_path):
    # a token the model has no row for could be fed to it (an index error deep in the forward
    # pass) or never sampled; padded rows past the tokenizer (Qwen's 151,936 for 151,665) are fine
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    rows = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows + 8)  # more rows than tokens: loads
    model.save_pretrained(tmp_path / "padded")
    tok.save_pretrained(tmp_path / "padded")
    assert models.load_model(str(tmp_path / "padded"))[0].get_output_embeddings().weight.shape[0] == rows + 8
    tok.add_tokens([f"<extra_{i}>" for i in range(3)])  # more tokens than rows: refused, naming both
    tok.save_pretrained(tmp_path / "short")
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(tmp_path / "short")
    with pytest.raises(common.UserError, match=f"predicts {rows} tokens but its tokenizer has {rows + 3}"):
        models.load_model(str(tmp_path / "short"))


# ------------------------------------------------------------------------- local paths and run folders

@pytest.mark.parametrize("name, kind", [
    ("out", "local folder"),                # exists
    ("out/nonexistent", "local folder"),    # its first part is a folder here
    ("./x", "local folder"), ("../x", "local folder"), ("/no/such/x", "local folder"), ("~/x", "local folder"),
    ("a/b/c", "local folder"),              # hub ids have one "/"
    ("Qwen/Qwen2.5-0.5B", "hub id"), ("nodir/x", "hub id"), ("Qwen2.5-0.5B", "hub id"), ("gpt2", "hub id"),
    ("out/x.gguf", "GGUF file"),
])
def test_which_names_are_local_paths(tmp_path, monkeypatch, name, kind):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert models.model_source(name)[0] == kind


def no_network(monkeypatch):
    """As if online (HF_HUB_OFFLINE unset) on a machine whose name look-ups fail, as they do
    offline -> the list of hosts looked up. Nothing can reach the network."""
    import huggingface_hub

    for var in ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read when it was imported
    looked_up = []

    def getaddrinfo(host, *args, **kwargs):
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


def test_a_mistyped_local_path_fails_at_once_naming_it(tmp_path, monkeypatch):
    looked_up = no_network(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "tiny").mkdir(parents=True)
    for name, load in [("out/nonexistent", models.load_model), ("out/tiyn", models.load_tokenizer)]:
        start = time.time()
        with pytest.raises(common.UserError) as e:
            load(name)
        assert time.time() - start < 2  # no look-up on the hub, which takes over a minute offline
        msg = str(e.value)
        assert f"{name} does not exist" in msg and "./out is a folder here" in msg and "\n" not in msg
    assert "did you mean out/tiny?" in msg
    assert looked_up == []


def test_a_run_folder_loads_its_newest_checkpoint(tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    for step, seed in [(1, 1), (2, 2)]:
        models.build_tiny_model(str(run / f"step-{step:06d}"), seed=seed, tokenizer_dir=tiny_dir)
    (run / "step-000003").mkdir()  # cut short before its model was written: skipped, and said so
    (run / ".tmp-step-000004").mkdir()  # a checkpoint being written: not a step
    (run / "metrics.jsonl").write_text("")
    model, tok = models.load_model(str(run))
    out = capsys.readouterr().out
    assert f"a run folder; loading its newest checkpoint {run / 'step-000002'} (step-000003 skipped" in out
    newest = AutoModelForCausalLM.from_pretrained(run / "step-000002")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), newest.parameters()))
    assert len(models.load_tokenizer(str(run))) == len(tok)
    (tmp_path / "empty" / "step-000001").mkdir(parents=True)
    with pytest.raises(common.UserError, match="holds no config.json or adapter_config.json and its step folders no"):
        models.load_model(str(tmp_path / "empty"))
    (tmp_path / "other").mkdir()
    with pytest.raises(common.UserError, match="holds no config.json .*, no .gguf file and no step-NNNNNN folders"):
        models.load_model(str(tmp_path / "other"))


# ------------------------------------------------------------------------- the hub


def test_an_unreachable_hub_is_one_quick_line(monkeypatch, capsys, caplog):
    looked_up = no_network(monkeypatch)
    start = time.time()
    with pytest.raises(common.UserError) as e:
        models.load_model("Qwen2.5-does-not-exist")
    assert time.time() - start < 5  # the hub client alone would retry for over a minute
    msg = str(e.value)
    assert "'Qwen2.5-does-not-exist'" in msg and "'Qwen/Qwen2.5-does-not-exist' is not in the local cache" in msg
    assert "could not be reached" in msg and "HF_HUB_OFFLINE=1" in msg and "\n" not in msg
    assert len(looked_up) == 1  # one attempt, no retries
    seen = capsys.readouterr()
    assert "Retry" not in seen.out + seen.err + caplog.text


def test_a_hub_model_in_the_local_cache_loads_without_the_network(tiny_dir, tmp_path, monkeypatch):
    """The cache's folder is loaded as a plain folder: no name is looked up, not even the peft
    adapter's, which transformers looks for on the hub even when told local_files_only."""
    import shutil

    import huggingface_hub

    looked_up = no_network(monkeypatch)
    repo = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B"  # the cache's layout: refs/main -> snapshots/<commit>
    shutil.copytree(tiny_dir, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model, tok = models.load_model("Qwen2.5-0.5B")
    assert looked_up == [] and len(tok) == len(models.load_tokenizer(tiny_dir))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), models.load_model(tiny_dir)[0].parameters()))


def test_the_hub_is_reachable_when_it_answers_or_behind_a_proxy(monkeypatch):
    import huggingface_hub

    calls = []

    def connect(address, timeout):  # the hub's endpoint answers (no data is sent)
        calls.append((address, timeout))
        return socket.socket()

    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.example.org")
    assert models.hub_unreachable() is None and calls == [(("hub.example.org", 443), models.HUB_TIMEOUT)]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # the proxy knows the way: no direct connection
    assert models.hub_unreachable() is None and len(calls) == 1
    with pytest.raises(common.UserError, match="'my model' is not a valid hub id"):
        models.load_model("my model")


# ------------------------------------------------------------------------- GGUF files


def test_gguf_names_are_files_never_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert models.model_source("missing.gguf") == ("GGUF file", "missing.gguf")
    (tmp_path / "here.gguf").write_bytes(b"GGUF")
    assert models.model_source("here.gguf") == ("GGUF file", "here.gguf")
    assert models.model_source(str(tmp_path / "sub" / "x.Q4_1.gguf"))[0] == "GGUF file"
    with pytest.raises(common.UserError, match="--model missing.gguf: no such GGUF file"):
        models.load_model("missing.gguf")
    monkeypatch.setenv("HOME", str(tmp_path))  # ~ is expanded before the file is looked for
    assert models.model_source("~/here.gguf") == ("GGUF file", str(tmp_path / "here.gguf"))
    (tmp_path / "folder.gguf").mkdir()  # a folder whose name ends in .gguf is a folder
    assert models.model_source("folder.gguf") == ("local folder", "folder.gguf")
    (tmp_path / "config.json").write_text("{}")  # a file that is not a GGUF file: said so
    with pytest.raises(common.UserError, match="a file, not a folder"):
        models.load_model("config.json")


def test_a_file_an_installed_package_ships_is_found_by_its_name():
    found = models.packaged_file("__init__.py")  # every installed package with a folder ships one
    assert found and os.path.isfile(found) and os.path.basename(found) == "__init__.py"
    assert models.packaged_file(os.path.join("pytest", "__init__.py")) is None  # bare names only
    assert models.packaged_file("no-package-ships-this.gguf") is None


def test_gguf_folders_and_the_missing_gguf_package(tmp_path, monkeypatch):
    one = tmp_path / "one"
    one.mkdir()
    (one / "m.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed: its import fails
    with pytest.raises(common.UserError, match=r"needs the gguf package \(pip install gguf\)"):
        models.load_model(str(one))  # a folder holding one GGUF file and no config.json: that file
    (one / "n.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(common.UserError, match="holds 2 GGUF files"):
        models.load_model(str(one))
