"""What the speed work promises, checked by counting rather than timing (speed itself is
bench.py's to measure): no forward pass whose result is unused, every completion of
--ignore-eos at full length, and bench.py running grpo.py's own loop."""

import json
import sys

import pytest
import torch

import bench
import grpo


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    with open(d / "train.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n")
    return d


@pytest.mark.parametrize("beta, iterations, ref_passes, policy_passes", [
    (0.0, 1, 0, 2),   # no reference model, and old log-probs are the first pass's own
    (0.04, 1, 2, 2),  # one reference pass a micro-batch, under inference mode
    (0.04, 2, 2, 4),  # two updates: the policy passes twice, the reference still once
])
def test_the_update_runs_only_the_passes_it_uses(tiny_dir, data, tmp_path, monkeypatch, beta, iterations,
                                                 ref_passes, policy_passes):
    real, passes = grpo.completion_logprobs, []

    def counting(model, *a, **k):
        passes.append("ref" if torch.is_inference_mode_enabled() else "policy")
        return real(model, *a, **k)

    monkeypatch.setattr(grpo, "completion_logprobs", counting)
    history = grpo.main(["--model", tiny_dir, "--data", str(data / "train.jsonl"), "--out", str(tmp_path / "run"),
                         "--device", "cpu", "--prompts-per-step", "2", "--group", "4", "--max-new-tokens", "6",
                         "--micro-batch-size", "4", "--num-steps", "1", "--beta", str(beta), "--rewards", "format",
                         "--num-iterations", str(iterations), "--ignore-eos"])
    assert passes.count("ref") == ref_passes and passes.count("policy") == policy_passes  # 8 completions, 2 micro-batches
    assert history[0]["len"] == 6 and history[0]["trunc"] == 1  # --ignore-eos: every completion at full length
    for k in ["sample_s", "score_s", "ref_s", "update_s"]:
        assert 0 <= history[0][k] <= history[0]["s"]


def test_bench_runs_grpo_and_reports_each_phase(tmp_path, capsys):
    result = bench.main(["--model", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "0", "--group", "4",
                         "--prompts-per-step", "2", "--max-new-tokens", "8", "--work-dir", str(tmp_path)])
    phases = sum(result[k] for k in bench.PHASES)
    assert 0 < phases <= result["step_s"] * 1.05 and result["peak_mib"] > 0
    assert result["tok/s"] == pytest.approx(2 * 4 * 8 / result["sample_s"])
    assert "step " in capsys.readouterr().out
    trained = [json.loads(line) for line in open(next(tmp_path.glob("nanor1-*")) / "metrics.jsonl")][1:]
    assert [r["step"] for r in trained] == [1, 2] and all(r["len"] == 8 for r in trained)  # grpo.py's own records


def test_bench_says_when_trl_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # as if not installed
    with pytest.raises(SystemExit) as e:
        bench.main(["--peer", "trl", "--device", "cpu", "--steps", "1", "--work-dir", str(tmp_path)])
    assert str(e.value.code).startswith("error: --peer trl: ") and "is not installed" in str(e.value.code)
