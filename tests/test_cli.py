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


@pytest.mark.parametrize("variant", ["ssam", "xsam", "bar"])
def test_lightning_cli_with_max_steps_alone(tmp_path, variant):
    """trainer.max_steps without max_epochs (the usual transformer setup): the epoch length comes from the loaded
    train dataloader (512 samples / batch 32 = 16 steps)."""
    import cli

    config = os.path.join(EXAMPLES, "sam_cli.yaml")
    args = ["fit", "--config", config, "--trainer.max_epochs=null", "--trainer.max_steps=3"]
    args += [f"--trainer.default_root_dir={tmp_path}", f"--trainer.callbacks.init_args.variant={variant}"]
    if variant != "ssam":  # the example config sets SSAM's options
        args += ["--trainer.callbacks.init_args.sparsity=null", "--trainer.callbacks.init_args.num_samples=null"]
    if variant == "bar":
        pairs = "[[net.0.weight, net.3.weight]]"
        args += ["--trainer.callbacks.init_args.rho=null", f"--trainer.callbacks.init_args.pairs={pairs}"]
    run = cli.main(args)
    callback = next(c for c in run.trainer.callbacks if isinstance(c, SAMCallback))
    assert run.trainer.global_step == 3 and callback.engine.step_count == 3
    derived = {"ssam": "mask_every", "xsam": "alpha_every", "bar": "total_steps"}[variant]
    assert getattr(callback.engine.variant, derived) == (3 if variant == "bar" else 16)
