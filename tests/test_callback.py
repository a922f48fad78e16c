"""SAMCallback through a real Trainer.fit against the plain reference loop."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Classifier, cross_entropy_of, fixed_loader, make_mlp, make_optimizer, quiet_trainer
from reference import reference_sam_step

from lightning_sam import SAMCallback


def reference_weights(net, batches, variant, rho, optimizer_name, **options):
    net = copy.deepcopy(net)
    optimizer = make_optimizer(optimizer_name, net.parameters())
    for batch in batches:
        reference_sam_step(net, cross_entropy_of(batch), optimizer, variant, rho, **options)
    return net


@pytest.mark.parametrize("variant, rho", [("sam", 0.05), ("asam", 0.5)])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("return_dict", [False, True])
def test_callback_matches_reference(variant, rho, optimizer_name, return_dict):
    net = make_mlp()
    loader = fixed_loader(n=96, batch_size=16)  # 6 steps
    expected = reference_weights(net, list(loader), variant, rho, optimizer_name)
    module = Classifier(copy.deepcopy(net), optimizer=optimizer_name, return_dict=return_dict)
    trainer = quiet_trainer(max_epochs=1, callbacks=[SAMCallback(variant)])
    trainer.fit(module, loader)
    assert trainer.global_step == 6
    for (name, p), q in zip(module.net.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_callback_with_batchnorm_matches_reference():
    net = make_mlp(batchnorm=True)
    loader = fixed_loader(n=80, batch_size=16)
    expected = reference_weights(net, list(loader), "sam", 0.05, "sgd")
    module = Classifier(copy.deepcopy(net))
    quiet_trainer(max_epochs=1, callbacks=[SAMCallback("sam", rho=0.05)]).fit(module, loader)
    for p, q in zip(module.net.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
