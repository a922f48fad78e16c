"""SAMMixin: the whole SAM step in one call under manual optimization."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Classifier, cross_entropy_of, fixed_loader, make_mlp, make_optimizer, quiet_trainer
from reference import reference_sam_step
from torch.nn import functional as F

from lightning_sam import SAMMixin


class ManualSAM(SAMMixin, Classifier):
    def __init__(self, net, variant="sam", rho=None, optimizer="sgd", **sam_options):
        super().__init__(net, optimizer=optimizer)
        self.automatic_optimization = False
        self.configure_sam(variant, rho=rho, **sam_options)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.sam_step(lambda: F.cross_entropy(self(x), y))
        self.log("train_loss", loss, prog_bar=True)
        return loss


@pytest.mark.parametrize("variant, rho", [("sam", 0.05), ("asam", 0.5)])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_mixin_matches_reference(variant, rho, optimizer_name):
    # BatchNorm makes the first bias's gradient pure round-off noise, which Adam amplifies: BN with SGD only
    net = make_mlp(batchnorm=optimizer_name == "sgd")
    loader = fixed_loader(n=96, batch_size=16)
    reference = copy.deepcopy(net)
    optimizer = make_optimizer(optimizer_name, reference.parameters())
    for batch in loader:
        reference_sam_step(reference, cross_entropy_of(batch), optimizer, variant, rho)
    module = ManualSAM(copy.deepcopy(net), variant, rho, optimizer=optimizer_name)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(module, loader)
    assert trainer.global_step == 6
    assert module.sam_engine.step_count == 6
    for p, q in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    for b, c in zip(module.net.buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, atol=1e-6, rtol=0)
    assert trainer.callback_metrics["sam/perturbation_norm"].item() > 0


def test_mixin_requires_manual_optimization():
    class Automatic(SAMMixin, Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.sam_step(lambda: F.cross_entropy(self(x), y))

    with pytest.raises(RuntimeError, match="automatic_optimization = False"):
        quiet_trainer(max_steps=1).fit(Automatic(make_mlp()), fixed_loader())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "nope"}, "Available variants"),
        ({"rho": -1.0}, "rho must be"),
        ({"gradient_clip_val": -1.0}, "gradient_clip_val"),
        ({"gradient_clip_algorithm": "max"}, "gradient_clip_algorithm"),
    ],
)
def test_mixin_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ManualSAM(make_mlp(), **kwargs)
