"""SAMCallback from YAML through LightningCLI (jsonargparse)."""

from __future__ import annotations

import inspect
import os
import sys

import pytest

from lightning_sam import SAMCallback, available_variants
from lightning_sam.variants import variant_options

pytest.importorskip("jsonargparse")
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")
sys.path.insert(0, EXAMPLES)


def test_every_variant_option_is_an_explicit_keyword():
    keywords = set(inspect.signature(SAMCallback.__init__).parameters)
    for name in available_variants():
        missing = set(variant_options(name)) - keywords
        assert not missing, f"SAMCallback lacks explicit keywords for {name}: {sorted(missing)}"


def test_lightning_cli_trains_with_the_example_config(tmp_path):
    import cli  # examples/cli.py

    config = os.path.join(EXAMPLES, "sam_cli.yaml")
    run = cli.main(["fit", "--config", config, "--trainer.max_steps=4", f"--trainer.default_root_dir={tmp_path}"])
    callback = next(c for c in run.trainer.callbacks if isinstance(c, SAMCallback))
    assert callback.variant == "ssam"
    assert callback.variant_options == {"sparsity": 0.7, "num_samples": 64}
    assert callback.engine.step_count == 4
    assert callback.engine.variant.sparsity == 0.7


def test_lightning_cli_override_and_unknown_option(tmp_path):
    import cli

    config = os.path.join(EXAMPLES, "sam_cli.yaml")
    run = cli.main(
        [
            "fit",
            "--config",
            config,
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks.init_args.sparsity=0.9",
        ]
    )
    callback = next(c for c in run.trainer.callbacks if isinstance(c, SAMCallback))
    assert callback.variant_options["sparsity"] == 0.9
    with pytest.raises(SystemExit):
        cli.main(["fit", "--config", config, "--trainer.callbacks.init_args.not_an_option=1"])
