"""SAMCallback from YAML through LightningCLI (jsonargparse)."""

from __future__ import annotations

import os
import sys

import pytest
import yaml

from lightning_sam import SAMCallback, available_variants
from lightning_sam.variants import SSAM, variant_info

pytest.importorskip("jsonargparse")
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")
sys.path.insert(0, EXAMPLES)


def run_cli(tmp_path, *overrides, variant=None):
    """examples/cli.py with examples/sam_cli.yaml; ``variant`` (a dict) replaces the callback's ``variant`` entry."""
    import cli  # examples/cli.py

    config = os.path.join(EXAMPLES, "sam_cli.yaml")
    if variant is not None:
        with open(config) as f:
            content = yaml.safe_load(f)
        content["trainer"]["callbacks"][0]["init_args"]["variant"] = variant
        config = str(tmp_path / "config.yaml")
        with open(config, "w") as f:
            yaml.safe_dump(content, f)
    run = cli.main(["fit", "--config", config, f"--trainer.default_root_dir={tmp_path}", *overrides])
    return run, next(c for c in run.trainer.callbacks if isinstance(c, SAMCallback))


def test_lightning_cli_trains_with_the_example_config(tmp_path):
    _, callback = run_cli(tmp_path, "--trainer.max_steps=4")
    assert callback.variant == "ssam"
    assert isinstance(callback.spec, SSAM)
    assert callback.variant_options == {"sparsity": 0.7, "num_samples": 64}
    assert callback.engine.step_count == 4
    assert callback.engine.variant.sparsity == 0.7


def test_lightning_cli_override_a_name_and_an_unknown_option(tmp_path):
    _, callback = run_cli(
        tmp_path, "--trainer.max_steps=2", "--trainer.callbacks.init_args.variant.init_args.sparsity=0.9"
    )
    assert callback.variant_options["sparsity"] == 0.9
    _, callback = run_cli(tmp_path, "--trainer.max_steps=2", "--trainer.callbacks.init_args.variant=asam")
    assert callback.variant == "asam" and callback.engine.variant.rho == 0.5
    with pytest.raises(SystemExit):
        run_cli(tmp_path, "--trainer.callbacks.init_args.variant.init_args.not_an_option=1")


BAR_PAIRS = {"pairs": [["net.0.weight", "net.3.weight"]]}


@pytest.mark.parametrize("name", available_variants())
def test_every_registered_variant_is_configurable_by_class_path(tmp_path, name):
    """No per-variant line in the adapters: each registered class configures from YAML through class_path."""
    cls = variant_info(name).cls
    variant = {"class_path": f"{cls.__module__}.{cls.__name__}", "init_args": BAR_PAIRS if name == "bar" else {}}
    _, callback = run_cli(tmp_path, "--trainer.max_steps=2", variant=variant)
    assert type(callback.engine.variant) is cls
    assert callback.engine.step_count == 2


@pytest.mark.parametrize("variant", ["ssam", "xsam", "bar"])
def test_lightning_cli_with_max_steps_alone(tmp_path, variant):
    """trainer.max_steps without max_epochs (the usual transformer setup): the epoch length comes from the loaded
    train dataloader (512 samples / batch 32 = 16 steps)."""
    spec = {"class_path": "lightning_sam.variants.BAR", "init_args": BAR_PAIRS} if variant == "bar" else variant
    run, callback = run_cli(tmp_path, "--trainer.max_epochs=null", "--trainer.max_steps=3", variant=spec)
    assert run.trainer.global_step == 3 and callback.engine.step_count == 3
    derived = {"ssam": "mask_every", "xsam": "alpha_every", "bar": "total_steps"}[variant]
    assert getattr(callback.engine.variant, derived) == (3 if variant == "bar" else 16)
