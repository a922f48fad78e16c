"""LookSAM, interval SAM and the params filter (SAM-ON)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Classifier, fixed_loader, make_mlp, make_optimizer, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from reference import reference_looksam_run, reference_sam_step
from torch.nn import functional as F

from lightning_sam import SAMCallback, SAMEngine


def assert_close_nets(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_looksam_engine_and_callback_match_reference_over_two_cycles(optimizer_name):
    loader = fixed_loader(n=160, batch_size=16)  # 10 steps = 2 k
    net = make_mlp()
    expected = copy.deepcopy(net)
    reference_looksam_run(expected, list(loader), make_optimizer(optimizer_name, expected.parameters()))

    engine_net = copy.deepcopy(net)
    optimizer = make_optimizer(optimizer_name, engine_net.parameters())
    engine = SAMEngine(engine_net.named_parameters(), "looksam")
    for x, y in loader:

        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = F.cross_entropy(engine_net(x), y)
            loss.backward()
            return loss

        engine.step(closure, optimizer)
    assert_close_nets(engine_net, expected)

    module = Classifier(copy.deepcopy(net), optimizer=optimizer_name)
    passes = []
    module.on_before_backward = lambda loss: passes.append(1)
    quiet_trainer(max_epochs=1, callbacks=[SAMCallback("looksam")]).fit(module, loader)
    assert_close_nets(module.net, expected)
    assert len(passes) == 10 + 2  # one backward per step, plus pass 2 on steps 0 and 5


def test_looksam_state_resumes_exactly(tmp_path):
    loader = fixed_loader(n=48, batch_size=16)
    straight = Classifier(make_mlp())
    quiet_trainer(max_epochs=3, callbacks=[SAMCallback("looksam", k=2)]).fit(straight, loader)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_epochs=2, callbacks=[SAMCallback("looksam", k=2), checkpoint], enable_checkpointing=True).fit(
        Classifier(make_mlp()), loader
    )
    resumed = Classifier(make_mlp(seed=3))
    quiet_trainer(max_epochs=3, callbacks=[SAMCallback("looksam", k=2)]).fit(
        resumed, loader, ckpt_path=tmp_path / "last.ckpt"
    )
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_interval_runs_pass_two_every_kth_step_only():
    loader = fixed_loader(n=96, batch_size=16)
    net = make_mlp()
    expected = copy.deepcopy(net)
    optimizer = make_optimizer("sgd", expected.parameters())
    for step, (x, y) in enumerate(loader):
        if step % 3 == 0:
            reference_sam_step(expected, lambda m, x=x, y=y: F.cross_entropy(m(x), y), optimizer, "sam", 0.05)
        else:
            optimizer.zero_grad()
            F.cross_entropy(expected(x), y).backward()
            optimizer.step()
    module = Classifier(copy.deepcopy(net))
    passes = []
    module.on_before_backward = lambda loss: passes.append(1)
    quiet_trainer(max_epochs=1, callbacks=[SAMCallback("sam", interval=3)]).fit(module, loader)
    assert len(passes) == 6 + 2
    assert_close_nets(module.net, expected)


def test_params_norm_perturbs_only_normalization_layers():
    net = make_mlp(batchnorm=True)
    x, y = next(iter(fixed_loader(n=32, batch_size=32)))
    optimizer = make_optimizer("sgd", net.parameters())
    engine = SAMEngine.from_optimizer(optimizer, net, "sam", select="norm")
    F.cross_entropy(net(x), y).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    engine.ascend()
    norm = torch.sqrt(sum((grads[n] ** 2).sum() for n in ("1.weight", "1.bias")))  # the norm over the chosen set
    for name, p in net.named_parameters():
        if name.startswith("1."):
            torch.testing.assert_close(p - before[name], 0.05 * grads[name] / norm, atol=1e-7, rtol=0)
        else:
            assert torch.equal(p, before[name])
    engine.restore()


def test_params_callable_through_the_callback():
    module = Classifier(make_mlp())
    callback = SAMCallback("sam", params=lambda name, p: name.endswith("weight"))
    quiet_trainer(max_steps=2, callbacks=[callback]).fit(module, fixed_loader())
    assert callback.engine.names == ["net.0.weight", "net.2.weight"]


def test_params_filter_selecting_nothing_raises_before_training():
    module = Classifier(make_mlp())  # no normalization layer
    with pytest.raises(ValueError, match="selects none"):
        quiet_trainer(max_steps=1, callbacks=[SAMCallback("sam", params="norm")]).fit(module, fixed_loader())
    assert all(torch.equal(p, q) for p, q in zip(module.net.parameters(), make_mlp().parameters()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "looksam", "k": 0}, "k must be"),
        ({"variant": "looksam", "alpha": -0.1}, "alpha must be"),
        ({"interval": 0}, "interval must be"),
        ({"params": "conv"}, "params must be"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAMCallback(**kwargs)


def test_interval_with_accumulation_matches_windowed_reference():
    loader = fixed_loader(n=128, batch_size=16)  # 8 micro-batches, windows of 2: 4 optimizer steps
    batches = list(loader)
    net = make_mlp()
    # steps 0 and 2 are SAM steps on their window, steps 1 and 3 plain steps on the accumulated gradient
    expected = copy.deepcopy(net)
    optimizer = make_optimizer("sgd", expected.parameters())
    for step in range(4):
        window = batches[2 * step : 2 * step + 2]
        optimizer.zero_grad()
        for x, y in window:
            (F.cross_entropy(expected(x), y) / 2).backward()
        if step % 2 == 0:
            params = list(expected.parameters())
            g = [p.grad.clone() for p in params]
            norm = torch.sqrt(sum((t**2).sum() for t in g))
            originals = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, t in zip(params, g):
                    p.add_(0.05 * t / (norm + 1e-12))
            optimizer.zero_grad()
            for x, y in window:
                (F.cross_entropy(expected(x), y) / 2).backward()
            with torch.no_grad():
                for p, o in zip(params, originals):
                    p.copy_(o)
        optimizer.step()
    module = Classifier(copy.deepcopy(net))
    trainer = quiet_trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[SAMCallback("sam", interval=2)])
    trainer.fit(module, loader)
    assert_close_nets(module.net, expected)


def test_interval_under_16_mixed_skips_an_overflowing_plain_step():
    from lightning.pytorch.plugins import MixedPrecision

    class Poisoned(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 1 else loss  # step 1 is a plain step

    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    module = Poisoned(make_mlp())
    trainer = quiet_trainer(
        max_epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], callbacks=[SAMCallback(interval=2)]
    )
    trainer.fit(module, fixed_loader(n=64, batch_size=16))
    assert scaler.get_scale() == 128.0
    assert all(torch.isfinite(p).all() for p in module.parameters())
