"""XSAM: engine and callback against the plain reference, alpha search, multi-step, edge cases, state."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Classifier, cross_entropy_of, fixed_loader, make_mlp, make_optimizer, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from reference import ReferenceXSAM, reference_xsam_step
from torch.nn import functional as F

from lightning_sam import SAMCallback, SAMEngine, SAMMixin
from lightning_sam.variants.xsam import XSAM


def reference_run(net, batches, optimizer_name="sgd", **options):
    net = copy.deepcopy(net)
    optimizer = make_optimizer(optimizer_name, net.parameters())
    xsam = ReferenceXSAM(**options)
    alphas = []
    for step, batch in enumerate(batches):
        reference_xsam_step(net, cross_entropy_of(batch), optimizer, xsam, step)
        alphas.append(xsam.alpha)
    return net, alphas


def assert_close_nets(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("with_probe", [True, False])
def test_engine_matches_reference_with_alpha_refreshes(steps, optimizer_name, with_probe):
    batches = list(fixed_loader(n=96, batch_size=16))  # 6 steps, searches at 0 and 3
    net = make_mlp()
    expected, alphas = reference_run(net, batches, optimizer_name, steps=steps, alpha_every=3)
    optimizer = make_optimizer(optimizer_name, net.parameters())
    engine = SAMEngine(net.named_parameters(), "xsam", steps=steps, alpha_every=3)
    seen = []
    for x, y in batches:

        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        probe = (lambda x=x, y=y: F.cross_entropy(net(x), y)) if with_probe else None
        engine.step(closure, optimizer, probe=probe)
        seen.append(engine.variant.alpha)
    assert seen == alphas
    assert engine.variant.searches == 2
    assert_close_nets(net, expected)


def test_callback_matches_reference_and_searches_on_the_first_batch_of_each_epoch():
    net = make_mlp(batchnorm=True)
    loader = fixed_loader(n=48, batch_size=16)  # 3 steps per epoch
    expected, alphas = reference_run(net, list(loader) * 2, alpha_every=3)
    module = Classifier(copy.deepcopy(net))
    callback = SAMCallback("xsam")
    quiet_trainer(max_epochs=2, callbacks=[callback]).fit(module, loader)
    assert callback.engine.variant.alpha_every == 3 and callback.engine.variant.searches == 2
    assert callback.engine.variant.alpha == alphas[-1]
    assert_close_nets(module.net, expected)
    for b, c in zip(module.net.buffers(), expected.buffers()):  # probes left BatchNorm statistics alone
        torch.testing.assert_close(b, c, atol=1e-6, rtol=0)


def test_mixin_matches_reference_with_two_ascent_steps():
    class ManualXSAM(SAMMixin, Classifier):
        def __init__(self, net):
            super().__init__(net)
            self.automatic_optimization = False
            self.configure_sam("xsam", steps=2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.sam_step(lambda: F.cross_entropy(self(x), y))

    net = make_mlp()
    loader = fixed_loader(n=48, batch_size=16)
    expected, _ = reference_run(net, list(loader) * 2, steps=2, alpha_every=3)
    module = ManualXSAM(copy.deepcopy(net))
    quiet_trainer(max_epochs=2).fit(module, loader)
    assert_close_nets(module.net, expected)


def test_alpha_fixed_at_one_with_one_step_is_sam_exactly():
    batches = list(fixed_loader(n=96, batch_size=16))
    net, sam_net = make_mlp(), make_mlp()
    for model, variant, options in ((net, "xsam", {"alpha_every": 0, "rho": 0.05}), (sam_net, "sam", {})):
        optimizer = make_optimizer("sgd", model.parameters())
        engine = SAMEngine(model.named_parameters(), variant, **options)
        for x, y in batches:

            def closure(x=x, y=y, model=model, optimizer=optimizer):
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            engine.step(closure, optimizer)
    for p, q in zip(net.parameters(), sam_net.parameters()):
        assert torch.equal(p, q)


def test_theta_near_zero_and_the_arccos_clamp_do_not_nan():
    c0, c1 = XSAM._weights(0.7, torch.tensor(0.0))
    assert c0.item() == 0.5 and c1.item() == 0.5
    # a linear loss has the same gradient everywhere: v0 == v1 (cosine rounds to 1 or just above)
    weight = torch.nn.Parameter(torch.randn(64))
    direction = torch.randn(64)
    optimizer = torch.optim.SGD([weight], lr=0.1)
    engine = SAMEngine([("w", weight)], "xsam", alpha_every=1, alpha=0.3)

    def closure():
        optimizer.zero_grad()
        loss = (weight * direction).sum()
        loss.backward()
        return loss

    for _ in range(3):
        engine.step(closure, optimizer)
        assert torch.isfinite(weight).all()
    torch.testing.assert_close(weight.grad, direction, atol=1e-5, rtol=0)


def test_resume_restores_alpha_exactly(tmp_path):
    loader = fixed_loader(n=48, batch_size=16)
    straight = Classifier(make_mlp())
    straight_callback = SAMCallback("xsam")
    quiet_trainer(max_epochs=3, callbacks=[straight_callback]).fit(straight, loader)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_epochs=2, callbacks=[SAMCallback("xsam"), checkpoint], enable_checkpointing=True).fit(
        Classifier(make_mlp()), loader
    )
    resumed = Classifier(make_mlp(seed=2))
    resumed_callback = SAMCallback("xsam")
    quiet_trainer(max_epochs=3, callbacks=[resumed_callback]).fit(resumed, loader, ckpt_path=tmp_path / "last.ckpt")
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert resumed_callback.state_dict() == straight_callback.state_dict()


def test_16_mixed_trains():
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    module = Classifier(make_mlp())
    trainer = quiet_trainer(
        max_epochs=2, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], callbacks=[SAMCallback("xsam")]
    )
    trainer.fit(module, fixed_loader(n=48, batch_size=16))
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize(
    "options, match",
    [
        ({"steps": 0}, "steps"),
        ({"alpha_step": 0.0}, "alpha_step"),
        ({"alpha_step": -0.1}, "alpha_step"),
        ({"rho_max": 0.0}, "rho_max"),
        ({"rho_max": -1.0}, "rho_max"),
        ({"alpha_max": 0}, "alpha_max"),
        ({"alpha_every": -1}, "alpha_every"),
        ({"alpha": float("nan")}, "alpha"),
    ],
)
def test_bad_input_raises_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        SAMCallback("xsam", **options)


def test_non_finite_probes_keep_alpha_and_a_late_search_runs_at_the_next_pass_two():
    net = make_mlp()
    batches = list(fixed_loader(n=128, batch_size=16))
    optimizer = make_optimizer("sgd", net.parameters())
    engine = SAMEngine(net.named_parameters(), "xsam", alpha_every=3, interval=2, alpha=0.4)
    searched_at = []
    for step, (x, y) in enumerate(batches):

        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        before = engine.variant.searches
        poison = step == 0  # every probe of the first search is non-finite
        engine.step(
            closure,
            optimizer,
            probe=lambda x=x, y=y, poison=poison: F.cross_entropy(net(x), y) * (float("nan") if poison else 1.0),
        )
        if engine.variant.searches > before:
            searched_at.append(step)
        if step == 0:
            assert engine.variant.alpha == 0.4  # kept
    # due at 0, 3, 6; pass 2 only on even steps: the searches due at 3 and 6 run at 4 and 6
    assert searched_at == [0, 4, 6]
    assert all(torch.isfinite(p).all() for p in net.parameters())
