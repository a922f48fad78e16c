"""The variant contract, checked over the whole registry (as optax's common tests check every optimizer), and a
variant added from outside the package (tests/toy_variant.py) through the callback, the mixin and LightningCLI."""

from __future__ import annotations

import copy
import inspect
import io
import os
import sys

import pytest
import torch
from conftest import Classifier, cross_entropy_of, fixed_loader, make_mlp, make_optimizer, quiet_trainer
from test_float64 import engine_steps
from torch.nn import functional as F
from toy_variant import INFO, PowerSAM, reference_direction

from lightning_sam import SAMCallback, SAMEngine, SAMMixin, available_variants
from lightning_sam.variants import (
    Variant,
    VariantInfo,
    make_variant,
    register_variant,
    unregister_variant,
    variant_info,
    variant_options,
)

# What a variant needs to bind to make_mlp() (BAR: one two-factor pair); the rest runs on defaults.
BIND_OPTIONS = {
    "bar": {"pairs": [("0.weight", "2.weight")], "total_steps": 10},
    "ssam": {"mask": "dst", "total_steps": 10},
}
# extension point -> the methods that implement it (declared in the registry, never discovered at run time)
EXTENSIONS = {
    "descent": ["descent_"],
    "plain_step": ["plain_step_"],
    "multi_step": ["ascent_steps"],
    "sparse": ["save_", "apply_", "restore_"],
    "samples": ["samples_needed", "add_squared_gradients_"],
    "before_step": ["before_optimizer_step_"],
    "run_length": ["run_defaults"],
}


def overrides(cls: type, method: str) -> bool:
    return any(method in vars(klass) for klass in cls.__mro__[: cls.__mro__.index(Variant)])


@pytest.mark.parametrize("name", available_variants())
def test_the_registry_declares_exactly_the_extension_points_a_variant_implements(name):
    info = variant_info(name)
    for flag, methods in EXTENSIONS.items():
        implemented = {method: overrides(info.cls, method) for method in methods}
        assert all(v == getattr(info, flag) for v in implemented.values()), (name, flag, implemented)
    assert overrides(info.cls, "direction_") == info.second_pass


@pytest.mark.parametrize("name", available_variants())
def test_defaults_rho_and_bad_input(name):
    cls = variant_info(name).cls
    variant = make_variant(name)
    assert variant.rho == cls.default_rho and variant.config == {}
    with pytest.raises(ValueError, match="rho"):
        make_variant(name, rho=-1.0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['not_an_option'\]. Its options \(defaults\)"):
        make_variant(name, not_an_option=1)
    documented = inspect.getdoc(cls) or ""
    for option in variant_options(name):
        assert option in documented, f"{name}: option {option!r} is not documented in the class docstring"


@pytest.mark.parametrize("name", available_variants())
def test_a_variant_object_is_its_configuration(name):
    options = BIND_OPTIONS.get(name, {})
    variant = make_variant(name, **options)
    assert variant.config == options
    fresh = variant.with_options()
    assert type(fresh) is type(variant) and fresh.config == options and fresh is not variant
    engine = SAMEngine(make_mlp().named_parameters(), variant)
    assert engine.variant is variant
    with pytest.raises(ValueError, match="serves another engine"):
        SAMEngine(make_mlp().named_parameters(), variant)
    with pytest.raises(TypeError, match="give its options to it"):
        SAMEngine(make_mlp().named_parameters(), variant.with_options(), rho=0.1)


def run_engine(name, net, batches, engine=None, state=None):
    """Steps of ``SAMEngine.step`` on ``net`` with a fresh SGD; continues ``engine``, or a new one (from ``state``)."""
    optimizer = make_optimizer("sgd", net.parameters())
    if engine is None:
        engine = SAMEngine(net.named_parameters(), name, **BIND_OPTIONS.get(name, {}))
        if state is not None:
            engine.load_state_dict(state)
    engine_steps(engine, net, optimizer, batches)
    return engine


@pytest.mark.parametrize("name", available_variants())
def test_state_round_trips_through_torch_save_and_resumes_exactly(name):
    """A fresh engine loaded from the saved state continues exactly as the engine that saved it."""
    batches = list(fixed_loader(n=128, batch_size=16))
    continued = make_mlp()
    engine = run_engine(name, continued, batches[:3])
    buffer = io.BytesIO()
    torch.save(engine.state_dict(), buffer)
    resumed = copy.deepcopy(continued)
    run_engine(name, continued, batches[3:], engine=engine)  # the same engine goes on (a new optimizer in both)
    buffer.seek(0)
    run_engine(name, resumed, batches[3:], state=torch.load(buffer, weights_only=False))
    for p, q in zip(resumed.parameters(), continued.parameters()):
        assert torch.equal(p, q)


def test_every_registered_variant_has_a_reference_check():
    from test_float64 import CHECKS  # engine against tests/reference.py, per variant

    assert set(CHECKS) == set(available_variants())


# ---------------------------------------------------------------------------------------------- a toy variant
@pytest.fixture
def powersam():
    register_variant(INFO)
    yield
    unregister_variant("powersam")


def reference_powersam(net, batches, rho, power):
    net = copy.deepcopy(net)
    optimizer = make_optimizer("sgd", net.parameters())
    for batch in batches:
        optimizer.zero_grad()
        cross_entropy_of(batch)(net).backward()
        params = list(net.parameters())
        with torch.no_grad():
            originals = [p.clone() for p in params]
            for p, e in zip(params, reference_direction([p.grad.clone() for p in params], rho, power)):
                p.add_(e)
        optimizer.zero_grad()
        cross_entropy_of(batch)(net).backward()
        with torch.no_grad():
            for p, original in zip(params, originals):
                p.copy_(original)
        optimizer.step()
    return net


def test_a_toy_variant_registered_from_outside_runs_through_the_callback(powersam):
    net = make_mlp()
    loader = fixed_loader(n=64, batch_size=16)
    expected = reference_powersam(net, list(loader), 0.1, 0.5)
    for variant in ("powersam", PowerSAM(rho=0.1, power=0.5)):
        module = Classifier(copy.deepcopy(net))
        options = {"rho": 0.1, "power": 0.5} if isinstance(variant, str) else {}
        callback = SAMCallback(variant, **options)
        quiet_trainer(max_epochs=1, callbacks=[callback]).fit(module, loader)
        assert callback.engine.variant.power == 0.5
        for p, q in zip(module.net.parameters(), expected.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_a_toy_variant_runs_through_the_mixin(powersam):
    class Manual(SAMMixin, Classifier):
        def __init__(self, net):
            super().__init__(net)
            self.automatic_optimization = False
            self.configure_sam("powersam", rho=0.1, power=0.5)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.sam_step(lambda: F.cross_entropy(self(x), y))

    net = make_mlp()
    loader = fixed_loader(n=64, batch_size=16)
    module = Manual(copy.deepcopy(net))
    quiet_trainer(max_epochs=1).fit(module, loader)
    for p, q in zip(module.net.parameters(), reference_powersam(net, list(loader), 0.1, 0.5).parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_a_toy_variant_is_configured_by_lightning_cli(powersam, tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "examples"))
    import cli  # examples/cli.py

    config = tmp_path / "toy.yaml"
    config.write_text(
        "trainer:\n  accelerator: cpu\n  max_steps: 3\n  logger: false\n  enable_checkpointing: false\n"
        "  callbacks:\n    - class_path: lightning_sam.SAMCallback\n      init_args:\n        variant:\n"
        "          class_path: toy_variant.PowerSAM\n          init_args:\n            power: 0.5\n"
    )
    run = cli.main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"])
    callback = next(c for c in run.trainer.callbacks if isinstance(c, SAMCallback))
    assert isinstance(callback.engine.variant, PowerSAM) and callback.engine.variant.power == 0.5
    assert callback.engine.step_count == 3


def test_an_unregistered_variant_object_gets_a_clear_error():
    with pytest.raises(ValueError, match="is not a registered variant: register it"):
        SAMCallback(PowerSAM())


def test_a_second_pass_variant_without_an_ascent_rule_cannot_be_registered():
    class NoRule(Variant, name="norule"):
        pass

    with pytest.raises(TypeError, match="has no direction_"):
        VariantInfo(NoRule)
    assert VariantInfo(NoRule, second_pass=False).name == "norule"
    with pytest.raises(RuntimeError, match="registered with second_pass=False"):
        NoRule().direction_(None)
