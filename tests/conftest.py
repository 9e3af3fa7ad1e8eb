"""Fixtures shared by the tests: a tiny model built once per session, offline."""

import os
import shutil
import sys

import pytest
import torch

# tests never touch the network, and import the project's top-level modules
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # repeatable float sums, and CI has 2 cores
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the scripts the tests start, too: two processes, two cores

from nanor1 import models  # noqa: E402


def data_script(folder, name):
    """data/<folder>/<name>.py imported as a module of its own (every folder has a prepare.py)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", os.path.join(root, "data", folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end check of several seconds; still runs in CI")


def pytest_collection_modifyitems(items):
    """The slow end-to-end tests first, the longest of all (the miniature pipeline) at the head:
    on two processes one of them starts on it while the other works through the rest."""
    first = {"test_quick_pipeline_end_to_end": 0}
    items.sort(key=lambda item: first.get(item.originalname, 1 if item.get_closest_marker("slow") else 2))


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """The whole suite (`python -m pytest -q tests`) on two processes when pytest-xdist is
    installed: each test runs on one thread (above), so one process leaves the second core
    idle. -n N chooses another number, -p no:xdist runs it in this process."""
    tests = os.path.dirname(os.path.abspath(__file__))
    whole = [os.path.abspath(a) for a in config.args] == [tests]
    worker = hasattr(config, "workerinput") or "PYTEST_XDIST_WORKER" in os.environ  # one of the two
    if whole and not worker and config.pluginmanager.hasplugin("xdist") and config.option.numprocesses is None:
        config.option.numprocesses = 2
        if config.option.dist == "no":  # a process that runs out of tests takes some of the other's
            config.option.dist = "worksteal"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A freshly initialised 2-layer Qwen2 model and its locally trained tokenizer, on disk."""
    return models.build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), seed=0)


@pytest.fixture(scope="session")
def tiny_chat_dir(tiny_dir, tmp_path_factory):
    """The tiny model with a chat template of its own, for the scripts run with --template chat."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-chat") / "model"
    shutil.copytree(tiny_dir, path)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    model, tok = models.load_model(tiny_dir)
    return model.eval(), tok


@pytest.fixture(scope="session")
def sharp(tiny):
    """The tiny model with its weights scaled by 3. A fresh random model's greedy tokens hardly
    depend on the context (the last token's embedding dominates), so a test of the context
    handling (padding, cache, positions) would pass even when that handling is broken."""
    import copy

    model, tok = tiny
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        for p in sharp.parameters():
            p.mul_(3.0)
    return sharp, tok


def digits(completion, example):
    """A toy reward a random tiny model can learn in a few steps: the share of digit characters."""
    return sum(ch.isdigit() for ch in completion) / max(1, len(completion))


@pytest.fixture
def toy(monkeypatch):
    """Registers the toy reward as "digits" for one test."""
    import rewards

    monkeypatch.setitem(rewards.REWARDS, "digits", digits)
