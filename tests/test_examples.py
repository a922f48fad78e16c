"""Tests of the demo a new user runs first: examples/digits_label_noise.py (its --quick mode and its rho choice)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("rich")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ROW_KEYS = {"method", "rho", "final_test_acc", "seconds", "sweep_seconds", "seeds", "test_acc_per_seed", "grid"}
ROW_KEYS |= {"val_acc_per_rho", "early_stop_test_acc", "early_stop_epochs"}


def load_example(name: str) -> ModuleType:
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"examples_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return module


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    return load_example("digits_label_noise")


def first_argmax(scores: dict[float, float]) -> float:
    """The smallest rho among those with the highest score (written out here, not the demo's choose_rho)."""
    best = max(scores.values())
    return min(rho for rho, score in scores.items() if score == best)


def check_rows(demo: ModuleType, rows: list[dict], seeds: list[int]) -> None:
    assert [row["method"] for row in rows] == list(demo.DEFAULT_METHODS)
    ends = [min(demo.DEFAULT_GRID), max(demo.DEFAULT_GRID)]  # --quick: the grid's two ends
    for row in rows:
        method = row["method"]
        assert set(row) >= ROW_KEYS, method
        assert row["seeds"] == seeds, method
        assert len(row["test_acc_per_seed"]) == len(seeds), method
        assert all(0.0 <= a <= 1.0 for a in row["test_acc_per_seed"]), method
        assert 0.0 <= row["final_test_acc"] <= 1.0
        assert math.isclose(row["final_test_acc"], sum(row["test_acc_per_seed"]) / len(seeds)), method
        assert row["seconds"] > 0 and row["sweep_seconds"] >= 0, method
        if method == "sgd":
            assert row["rho"] is None and row["grid"] == [] and row["sweep_seconds"] == 0
            continue
        scale = 10.0 if method == "asam" else 1.0
        assert row["grid"] == pytest.approx([r * scale for r in ends]), method
        assert row["rho"] in row["grid"], method
        scores = {entry["rho"]: entry["val_acc"] for entry in row["val_acc_per_rho"]}
        assert sorted(scores) == row["grid"], method
        assert row["rho"] == first_argmax(scores), (method, scores)


@pytest.mark.timeout(120)
def test_digits_label_noise_quick(demo, tmp_path):
    out = tmp_path / "plots" / "digits.png"  # the folder does not exist yet: the demo creates it
    summary = demo.main(["--quick", "--no-progress", "--out", str(out)])

    assert summary["plot"] == out
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["json"] == out.with_suffix(".json")
    rows = json.loads(summary["json"].read_text())
    assert rows == json.loads(json.dumps(summary["rows"]))
    check_rows(demo, rows, seeds=[0, 1])

    for method, runs in summary["runs"].items():
        for run in runs.finals:  # --quick: 2 epochs, one evaluation per epoch
            assert len(run.test_acc) == len(run.train_acc) == len(run.val_acc) == 2, method
            for value in [*run.test_acc, *run.val_acc, *run.train_acc, run.train_acc_noisy]:
                assert 0.0 <= value <= 1.0, (method, value)
            stop = run.val_acc.index(max(run.val_acc))  # early stopping: the epoch is chosen on validation
            assert (run.early_stop_epoch, run.early_stop) == (stop + 1, run.test_acc[stop]), method
        if method == "sgd":
            continue
        # The scores behind the choice are the sweep runs' final-epoch accuracies on the validation split (seed 0),
        # and the first seed's final run is the sweep's run at the chosen rho.
        scores = {rho: run.val_acc[-1] for rho, run in runs.sweep.items()}
        assert all(run.seed == 0 for run in runs.sweep.values())
        assert runs.rho == first_argmax(scores) == summary["chosen"][method]
        assert runs.finals[0] is runs.sweep[runs.rho]
        assert [run.seed for run in runs.finals] == [0, 1]
        assert all(run.rho == runs.rho for run in runs.finals)


@pytest.mark.timeout(120)
def test_rho_is_chosen_without_the_test_labels(demo, tmp_path, monkeypatch):
    """Make every test label wrong: the test accuracies change, the validation scores and the choices do not."""
    make_digits = demo.make_digits
    runs = {}
    for corrupt in (False, True):

        def digits(*args, corrupt=corrupt, **kwargs):
            data = make_digits(*args, **kwargs)
            if corrupt:
                data.y_test = (data.y_test + 1) % demo.NUM_CLASSES
            return data

        monkeypatch.setattr(demo, "make_digits", digits)
        demo.cached_digits.cache_clear()
        argv = ["--quick", "--no-progress", "--methods", "sgd", "sam", "asam", "--seeds", "0", "--jobs", "1"]
        runs[corrupt] = demo.main([*argv, "--out", str(tmp_path / f"{corrupt}.png")])["runs"]
    demo.cached_digits.cache_clear()

    for method in ("sam", "asam"):
        clean, corrupted = runs[False][method], runs[True][method]
        assert {r: run.val_acc for r, run in clean.sweep.items()} == {
            r: run.val_acc for r, run in corrupted.sweep.items()
        }
        assert clean.rho == corrupted.rho
        for rho, run in clean.sweep.items():  # a prediction right on a clean test label is wrong on its corruption
            assert corrupted.sweep[rho].final <= 1.0 - run.final + 1e-6


def test_choose_rho_and_the_validation_split(demo):
    assert demo.choose_rho({0.5: 0.40, 0.1: 0.61, 0.2: 0.61, 0.05: 0.30}) == 0.1  # a tie: the smaller radius
    with pytest.raises(ValueError):
        demo.choose_rho({})

    data = demo.make_digits(0.35, seed=1, val_fraction=0.2, split_seed=0)
    other = demo.make_digits(0.35, seed=2, val_fraction=0.2, split_seed=0)
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (1005, 252, 540)
    assert data.x_test.equal(other.x_test) and data.y_test.equal(other.y_test)  # one fixed test set for all seeds
    assert not data.x_val.equal(other.x_val)  # the validation split depends on the seed
    test_rows = {tuple(row) for row in data.x_test.tolist()}
    val_rows = {tuple(row) for row in data.x_val.tolist()}
    assert not val_rows & test_rows
    assert not val_rows & {tuple(row) for row in data.x_train.tolist()}
    # The validation labels are noisy like the training labels (35% flipped overall).
    val_noise = float((data.y_val != data.y_val_clean).float().mean())
    assert 0.25 < val_noise < 0.45 and 0.25 < data.noise_rate < 0.45
