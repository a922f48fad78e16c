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
    trainer = quiet_trainer(max_epochs=1, log_every_n_steps=1)
    trainer.fit(module, loader)
    assert trainer.global_step == 6
    assert module.sam_engine.step_count == 6
    for p, q in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    for b, c in zip(module.net.buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, atol=1e-6, rtol=0)
    assert trainer.callback_metrics["sam/perturbation_norm_step"].item() > 0


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


def test_mixin_variant_state_is_checkpointed_and_resumed(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    loader = fixed_loader(n=64, batch_size=16)
    straight = ManualSAM(make_mlp(), "asam")
    quiet_trainer(max_epochs=3).fit(straight, loader)
    first = ManualSAM(make_mlp(), "asam")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_epochs=2, callbacks=[checkpoint], enable_checkpointing=True).fit(first, loader)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved[ManualSAM._SAM_CHECKPOINT_KEY][0]["engine"]["step"] == 8
    resumed = ManualSAM(make_mlp(seed=5), "asam")
    quiet_trainer(max_epochs=3).fit(resumed, loader, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.sam_engine.step_count == straight.sam_engine.step_count == 12
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    # loading the weights outside a Trainer (no trainer attached) keeps the SAM state for a later fit
    loaded = ManualSAM.load_from_checkpoint(tmp_path / "last.ckpt", net=make_mlp(seed=5), variant="asam")
    assert loaded._sam_pending_state[0]["engine"]["step"] == 8


def test_mixin_keeps_one_engine_per_optimizer():
    class TwoOptimizers(SAMMixin, Classifier):
        def __init__(self, net):
            super().__init__(net)
            self.automatic_optimization = False
            self.configure_sam("sam")

        def configure_optimizers(self):
            first = torch.optim.SGD(self.net[0].parameters(), lr=0.1)
            second = torch.optim.SGD(self.net[2].parameters(), lr=0.1)
            return [first, second]

        def training_step(self, batch, batch_idx):
            x, y = batch
            first, second = self.optimizers()
            self.sam_step(lambda: F.cross_entropy(self(x), y), optimizer=first)
            self.sam_step(lambda: F.cross_entropy(self(x), y), optimizer=second)

    module = TwoOptimizers(make_mlp())
    quiet_trainer(max_steps=4).fit(module, fixed_loader())
    engines = module.sam_engines
    assert sorted(engines) == [0, 1]
    assert engines[0].names == ["net.0.weight", "net.0.bias"]
    assert engines[1].names == ["net.2.weight", "net.2.bias"]
    assert engines[0].step_count == engines[1].step_count == 2


def test_mixin_rejects_lbfgs_before_training():
    class WithLBFGS(ManualSAM):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=0.1)

    module = WithLBFGS(make_mlp())
    with pytest.raises(ValueError, match=r"SAMMixin does not support torch\.optim\.LBFGS"):
        quiet_trainer(max_steps=2).fit(module, fixed_loader())
    assert module.sam_engine is None


class ManualDiverging(ManualSAM):
    """The loss is NaN at the perturbed weights on step 1 (the second call of the loss function that step)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        calls = []

        def loss_fn():
            calls.append(1)
            loss = F.cross_entropy(self(x), y)
            return loss * float("nan") if batch_idx == 1 and len(calls) == 2 else loss

        return self.sam_step(loss_fn)


def test_mixin_skips_a_step_whose_second_pass_is_not_finite():
    net = make_mlp()
    batches = list(fixed_loader(n=48, batch_size=16))
    module = ManualDiverging(copy.deepcopy(net))
    trainer = quiet_trainer(max_epochs=1)
    with pytest.warns(UserWarning, match="not finite at step 1"):
        trainer.fit(module, fixed_loader(n=48, batch_size=16))
    reference = copy.deepcopy(net)
    optimizer = make_optimizer("sgd", reference.parameters())
    for index in (0, 2):
        reference_sam_step(reference, cross_entropy_of(batches[index]), optimizer, "sam", 0.05)
    for p, q in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert module.sam_engine.step_count == trainer.global_step == 3  # the skipped step counts, as GradScaler's do


def test_mixin_sync_ascent_must_be_a_boolean():
    with pytest.raises(ValueError, match="sync_ascent must be True or False"):
        ManualSAM(make_mlp(), sync_ascent="yes")
