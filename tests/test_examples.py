"""Smoke test of the demo a new user runs first: examples/digits_label_noise.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("rich")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
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


@pytest.mark.timeout(120)
def test_digits_label_noise_quick(tmp_path):
    demo = load_example("digits_label_noise")
    out = tmp_path / "plots" / "digits.png"  # the folder does not exist yet: the demo creates it
    summary = demo.main(["--quick", "--out", str(out)])

    assert summary["plot"] == out
    assert out.is_file() and out.stat().st_size > 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = summary["results"]
    assert set(results) == {"sgd", "sam", "asam"}
    for method, result in results.items():
        assert len(result.test_acc) == 2, method  # --quick: 2 epochs, one test evaluation each
        assert len(result.train_acc) == 2, method
        for value in [*result.test_acc, *result.train_acc, result.final, result.best, result.train_acc_noisy]:
            assert 0.0 <= value <= 1.0, (method, value)
        assert result.best >= result.final
