"""The precision paths on CUDA (marked ``gpu``; skipped without CUDA). The same checks run on CPU elsewhere."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Classifier, cross_entropy_of, fixed_loader, make_mlp, make_optimizer, quiet_trainer
from reference import PERTURBATIONS, reference_sam_step

from lightning_sam import SAMCallback

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_bf16_mixed_on_cuda_matches_plain_autocast_loop():
    net = make_mlp()
    loader = fixed_loader(n=80, batch_size=16)
    reference = copy.deepcopy(net).cuda()
    optimizer = make_optimizer("sgd", reference.parameters())
    for x, y in loader:
        batch = (x.cuda(), y.cuda())

        def loss_of(model, batch=batch):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return cross_entropy_of(batch)(model)

        reference_sam_step(reference, loss_of, optimizer, "sam", 0.05)
    module = Classifier(copy.deepcopy(net))
    quiet_trainer(accelerator="cuda", max_epochs=1, precision="bf16-mixed", callbacks=[SAMCallback("sam")]).fit(
        module, loader
    )
    for p, q in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)


def test_16_mixed_on_cuda_matches_plain_gradscaler_loop():
    net = make_mlp()
    loader = fixed_loader(n=80, batch_size=16)
    reference = copy.deepcopy(net).cuda()
    optimizer = make_optimizer("sgd", reference.parameters())
    scaler = torch.amp.GradScaler("cuda")
    for x, y in loader:
        x, y = x.cuda(), y.cuda()
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = cross_entropy_of((x, y))(reference)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        params = [p for p in reference.parameters() if p.grad is not None]
        grads = [p.grad.clone() for p in params]
        originals = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, PERTURBATIONS["sam"](params, grads, 0.05)):
                p.add_(e)
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss2 = cross_entropy_of((x, y))(reference)
        (loss2.float() * scaler.get_scale()).backward()
        with torch.no_grad():
            for p, original in zip(params, originals):
                p.copy_(original)
                p.grad.div_(scaler.get_scale())
        scaler.step(optimizer)
        scaler.update()
    module = Classifier(copy.deepcopy(net))
    trainer = quiet_trainer(accelerator="cuda", max_epochs=1, precision="16-mixed", callbacks=[SAMCallback("sam")])
    trainer.fit(module, loader)
    assert trainer.precision_plugin.scaler.get_scale() == scaler.get_scale()
    for p, q in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)
