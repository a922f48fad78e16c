"""16-mixed (GradScaler) through Lightning's CPU MixedPrecision plugin: real fp16 autocast + GradScaler on CPU.

The oracle is a hand-written GradScaler SAM loop (scale the loss, unscale by hand, skip on inf, halve/grow the
scale), independent of lightning_sam and of GradScaler's internals.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Classifier, fixed_loader, make_mlp, make_optimizer, quiet_trainer
from lightning.pytorch import Callback
from lightning.pytorch.plugins import MixedPrecision
from reference import PERTURBATIONS
from torch.nn import functional as F

from lightning_sam import SAMCallback, SAMMixin, in_second_pass

INIT_SCALE = 256.0
GROWTH_INTERVAL = 3  # small, so that growth happens within the test too


def fp16_plugin() -> MixedPrecision:
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL)
    return MixedPrecision("16-mixed", "cpu", scaler=scaler)


def poisoned_loss(logits, y, step, poison, second):
    loss = F.cross_entropy(logits, y)
    if (step, "pass2" if second else "pass1") in poison:
        loss = loss * float("inf")
    return loss


def reference_fp16_sam(net, batches, optimizer_name="sgd", rho=0.05, poison=(), clip=None):
    """Plain GradScaler arithmetic by hand. Returns the model, the optimizer and the scale history."""
    net = copy.deepcopy(net)
    optimizer = make_optimizer(optimizer_name, net.parameters())
    scale, tracker, scales = INIT_SCALE, 0, []

    def scaled_grads(step, x, y, second):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = poisoned_loss(net(x), y, step, poison, second)
        (loss.float() * scale).backward()
        params = [p for p in net.parameters() if p.grad is not None]
        grads = [p.grad / scale for p in params]  # 1/scale is exact: scale is a power of two
        finite = all(torch.isfinite(g).all() for g in grads)
        return params, grads, finite

    for step, (x, y) in enumerate(batches):
        params, grads, finite = scaled_grads(step, x, y, second=False)
        if finite:
            originals = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, e in zip(params, PERTURBATIONS["sam"](params, grads, rho)):
                    p.add_(e)
            params, grads, finite = scaled_grads(step, x, y, second=True)
            with torch.no_grad():
                for p, original in zip(params, originals):
                    p.copy_(original)
        if finite:
            for p, g in zip(params, grads):
                p.grad = g
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            tracker += 1
            if tracker == GROWTH_INTERVAL:
                scale, tracker = scale * 2.0, 0
        else:
            scale, tracker = scale * 0.5, 0
        scales.append(scale)
    return net, optimizer, scales


class Poisoned(Classifier):
    def __init__(self, net, optimizer="sgd", poison=()):
        super().__init__(net, optimizer=optimizer)
        self.poison = set(poison)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return poisoned_loss(self(x), y, batch_idx, self.poison, in_second_pass())


class ScaleRecorder(Callback):  # a plain lightning Callback
    def __init__(self):
        self.scales = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.scales.append(trainer.precision_plugin.scaler.get_scale())


def assert_same_weights(module_net, reference_net):
    for p, q in zip(module_net.parameters(), reference_net.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "poison",
    [(), ((2, "pass1"),), ((2, "pass2"),), ((2, "pass1"), (2, "pass2")), ((0, "pass2"), (4, "pass1"))],
    ids=["clean", "inf-pass1", "inf-pass2", "inf-both", "inf-first-and-later"],
)
def test_callback_fp16_matches_plain_gradscaler_loop(poison):
    net = make_mlp()
    loader = fixed_loader(n=96, batch_size=16)
    batches = list(loader)
    expected, _, expected_scales = reference_fp16_sam(net, batches, poison=poison)
    module = Poisoned(copy.deepcopy(net), poison=poison)
    recorder = ScaleRecorder()
    trainer = quiet_trainer(max_epochs=1, plugins=[fp16_plugin()], callbacks=[SAMCallback("sam"), recorder])
    trainer.fit(module, loader)
    assert recorder.scales == expected_scales  # halved exactly once per skipped step, grown on schedule
    assert_same_weights(module.net, expected)


def test_skipped_step_leaves_weights_and_optimizer_state_untouched():
    net = make_mlp()
    loader = fixed_loader(n=48, batch_size=16)
    states = []

    class Snapshot(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            optimizer = trainer.optimizers[0]
            states.append(
                (
                    [p.detach().clone() for p in pl_module.parameters()],
                    [optimizer.state[p]["momentum_buffer"].clone() for p in pl_module.parameters()],
                )
            )

    module = Poisoned(copy.deepcopy(net), poison=((2, "pass2"),))
    trainer = quiet_trainer(max_epochs=1, plugins=[fp16_plugin()], callbacks=[SAMCallback("sam"), Snapshot()])
    trainer.fit(module, loader)
    weights_1, momentum_1 = states[1]
    weights_2, momentum_2 = states[2]
    assert all(torch.equal(a, b) for a, b in zip(weights_1, weights_2))
    assert all(torch.equal(a, b) for a, b in zip(momentum_1, momentum_2))


@pytest.mark.parametrize("optimizer", ["sgd", "adam_fused"])
def test_a_skipped_step_stays_out_of_the_sam_metrics(optimizer):
    """GradScaler skips the step with an inf in pass 2: its sharpness (inf) is not logged, so the epoch mean of
    ``sam/sharpness`` stays the mean over the steps that were taken."""
    logged = []

    class Recorder(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(trainer.callback_metrics.get("sam/sharpness_step"))

    module = Poisoned(make_mlp(), optimizer=optimizer, poison=((1, "pass2"),))
    callbacks = [SAMCallback("sam"), Recorder()]
    trainer = quiet_trainer(max_epochs=1, plugins=[fp16_plugin()], callbacks=callbacks, log_every_n_steps=1)
    trainer.fit(module, fixed_loader(n=64, batch_size=16))
    assert torch.isfinite(trainer.callback_metrics["sam/sharpness_epoch"])
    assert all(value is not None and torch.isfinite(value) for value in logged)
    taken = [logged[0], logged[2], logged[3]]  # step 1 logged nothing new (its step value is step 0's)
    torch.testing.assert_close(trainer.callback_metrics["sam/sharpness_epoch"], torch.stack(taken).mean())


def test_fused_adam_fp16_matches_reference():
    pytest.importorskip("torch")
    net = make_mlp()
    loader = fixed_loader(n=96, batch_size=16)
    batches = list(loader)
    try:
        make_optimizer("adam_fused", torch.nn.Linear(2, 2).parameters())
    except RuntimeError as error:  # pragma: no cover - depends on the torch build
        pytest.skip(f"fused Adam unavailable on CPU: {error}")
    poison = ((3, "pass2"),)
    expected, _, expected_scales = reference_fp16_sam(net, batches, optimizer_name="adam_fused", poison=poison)
    module = Poisoned(copy.deepcopy(net), optimizer="adam_fused", poison=poison)
    recorder = ScaleRecorder()
    trainer = quiet_trainer(max_epochs=1, plugins=[fp16_plugin()], callbacks=[SAMCallback("sam"), recorder])
    trainer.fit(module, loader)
    assert recorder.scales == expected_scales
    assert_same_weights(module.net, expected)


class ManualPoisoned(SAMMixin, Classifier):
    def __init__(self, net, poison=(), clip=None):
        super().__init__(net)
        self.automatic_optimization = False
        self.poison = set(poison)
        self.configure_sam("sam", gradient_clip_val=clip)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.sam_step(lambda: poisoned_loss(self(x), y, batch_idx, self.poison, in_second_pass()))


@pytest.mark.parametrize("poison", [(), ((2, "pass1"),), ((2, "pass2"),), ((2, "pass1"), (2, "pass2"))])
def test_mixin_fp16_matches_plain_gradscaler_loop(poison):
    net = make_mlp()
    loader = fixed_loader(n=96, batch_size=16)
    batches = list(loader)
    expected, _, expected_scales = reference_fp16_sam(net, batches, poison=poison, clip=0.5)
    module = ManualPoisoned(copy.deepcopy(net), poison=poison, clip=0.5)
    recorder = ScaleRecorder()
    trainer = quiet_trainer(max_epochs=1, plugins=[fp16_plugin()], callbacks=[recorder])
    trainer.fit(module, loader)
    assert recorder.scales == expected_scales
    assert_same_weights(module.net, expected)
