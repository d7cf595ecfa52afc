"""tools/pareto.py: the shared-reference pass scores each model as evaluate() does, and resumes exactly."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from sagekit.backend import get_backend
from sagekit.eval.perplexity import evaluate
from sagekit.eval.speed import densify
from sagekit.io.synthetic import write_random_checkpoint
from sagekit.model.load import load_model
from sagekit.model.tokenizer import load_tokenizer
from sagekit.quant.calibration import CalibOptions

from conftest import tiny_config
from test_baselines import calibration_text

# the scoring jobs are spawned processes, which import the tool by its module name
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import pareto  # noqa: E402

SWEEP = [("rtn", "-", {}), ("sage-paper", "default", {}),
         ("sage-grid", "bits 3, calibrated", {"calib": True, "knobs": {"bits": 3}})]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("pareto")
    src = write_random_checkpoint(root / "m", tiny_config(), seed=5, std=0.05)
    text = calibration_text(root / "t.txt", words=400, seed=2)
    ids = np.asarray(load_tokenizer(src).encode(text.read_text()).ids, dtype=np.int64)
    calib = CalibOptions(text, 2, 16)
    pareto.compress_all(src, root / "work", SWEEP, calib, "cpu", 1)
    return src, ids, root


def test_shared_pass_equals_separate_evaluations(sweep):
    src, ids, root = sweep
    names = [pareto.slug(m, label) for m, label, _ in SWEEP]
    tallies, n, _ = pareto.evaluate_all(src, root / "work", names, ids, 32, 3, "cpu")
    backend = get_backend("cpu")
    ref = load_model(src, backend, 32)
    self_score = tallies["fp16"].result(n, 32, 0.0, True)
    assert n == 3 and self_score.ppl == pytest.approx(evaluate(ref, ids, 32, 3).ppl, rel=1e-6)
    assert abs(self_score.kl) < 1e-9 and self_score.top1 == 1.0
    for name in names:
        twin = densify(load_model(root / "work" / name, backend, 32, kernels=False), 32)
        alone = evaluate(twin, ids, 32, 3, reference=ref)
        shared = tallies[name].result(n, 32, 0.0, True)
        assert shared.ppl == pytest.approx(alone.ppl, rel=1e-6)
        assert shared.kl == pytest.approx(alone.kl, rel=1e-6) and shared.kl > 0
        assert shared.top1 == alone.top1


def test_a_row_can_ask_for_calibration_and_knobs(sweep):
    _, _, root = sweep
    report = json.loads((root / "work" / pareto.slug("sage-grid", "bits 3, calibrated") / "report.json").read_text())
    assert report["method"] == "sage-grid" and report["knobs"]["bits"] == 3 and report["calibration"]


def unscored_copy(root: Path, name: str) -> Path:
    """The sweep's work folder with its compressed models but no scored windows."""
    copy = root / name
    shutil.copytree(root / "work", copy)
    for path in copy.glob("eval.*.json"):
        path.unlink()
    return copy


def test_an_interrupted_pass_resumes_to_the_same_sums(sweep):
    src, ids, root = sweep
    names = [pareto.slug(m, label) for m, label, _ in SWEEP]
    full, _, _ = pareto.evaluate_all(src, root / "work", names, ids, 32, 3, "cpu")
    resumed = unscored_copy(root, "resumed")
    pareto.evaluate_all(src, resumed, names, ids, 32, 1, "cpu")  # stopped after the first window
    assert list(json.loads((resumed / "eval.0.json").read_text())["windows"]) == ["0"]
    again, n, _ = pareto.evaluate_all(src, resumed, names, ids, 32, 3, "cpu")
    assert n == 3 and {k: vars(t) for k, t in again.items()} == {k: vars(t) for k, t in full.items()}


def test_two_jobs_give_the_sums_of_one(sweep):
    src, ids, root = sweep
    names = [pareto.slug(m, label) for m, label, _ in SWEEP]
    one, _, _ = pareto.evaluate_all(src, root / "work", names, ids, 32, 3, "cpu")
    split = unscored_copy(root, "split")
    pareto.evaluate_all(src, split, names, ids, 32, 1, "cpu")  # window 0 by one job, windows 1 and 2 by two
    two, n, _ = pareto.evaluate_all(src, split, names, ids, 32, 3, "cpu", jobs=2)
    assert sorted(p.name for p in split.glob("eval.*.json")) == ["eval.0.json", "eval.1.json"]
    assert n == 3 and two.keys() == one.keys()
    for name, t in two.items():  # one thread per job instead of two: BLAS rounds a little differently
        assert (t.agree, t.scored) == (one[name].agree, one[name].scored)
        assert t.nll == pytest.approx(one[name].nll, rel=1e-6) and t.kl == pytest.approx(one[name].kl, rel=1e-6)


def test_another_protocol_is_refused_in_the_same_work_folder(tmp_path):
    pareto.check_setup(tmp_path, {"seqlen": 2048, "rows": ["rtn -"]})
    pareto.check_setup(tmp_path, {"seqlen": 2048, "rows": ["rtn -"]})
    with pytest.raises(SystemExit, match="seqlen"):
        pareto.check_setup(tmp_path, {"seqlen": 512, "rows": ["rtn -"]})


def test_pareto_front_and_results_markers(tmp_path):
    rows = [{"linear_true_bpw": b, "ppl": p} for b, p in [(16, 20), (1.2, 1e6), (2.5, 4e4), (3.0, 400), (2.8, 5e4)]]
    assert pareto.pareto_front(rows) == {0, 1, 2, 3}
    results = tmp_path / "RESULTS.md"
    begin, end = pareto.markers("baselines")
    results.write_text(f"# Results\n\nprose before\n\n{begin}\nold table\n{end}\n\nprose after\n")
    pareto.write_results(results, "new table\n", "baselines")
    text = results.read_text()
    assert "old table" not in text and "new table" in text and "prose before" in text and "prose after" in text
    pareto.write_results(results, "final table\n", "issue13")  # another sweep's table goes beside it
    text = results.read_text()
    assert "new table" in text and "final table" in text and text.count("pareto:issue13:begin") == 1
