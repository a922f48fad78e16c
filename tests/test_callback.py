"""SAMCallback through a real Trainer.fit against the plain reference loop."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Classifier, cross_entropy_of, fixed_loader, make_mlp, make_optimizer, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from reference import reference_sam_step

from lightning_sam import SAMCallback, in_second_pass


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


def test_plain_training_differs_so_the_comparison_can_fail():
    net = make_mlp()
    loader = fixed_loader(n=96, batch_size=16)
    expected = reference_weights(net, list(loader), "sam", 0.05, "sgd")
    module = Classifier(copy.deepcopy(net))
    quiet_trainer(max_epochs=1).fit(module, loader)
    assert max((p - q).abs().max().item() for p, q in zip(module.net.parameters(), expected.parameters())) > 1e-4


def test_bf16_mixed_matches_plain_autocast_loop():
    net = make_mlp()
    loader = fixed_loader(n=80, batch_size=16)
    reference = copy.deepcopy(net)
    optimizer = make_optimizer("sgd", reference.parameters())

    def bf16_loss_of(batch):
        plain = cross_entropy_of(batch)

        def loss_of(model):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return plain(model)

        return loss_of

    for batch in loader:
        reference_sam_step(reference, bf16_loss_of(batch), optimizer, "sam", 0.05)
    module = Classifier(copy.deepcopy(net))
    trainer = quiet_trainer(max_epochs=1, precision="bf16-mixed", callbacks=[SAMCallback("sam")])
    trainer.fit(module, loader)
    assert trainer.global_step == 5
    for p, q in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_manual_optimization_module_gets_a_clear_error():
    class Manual(Classifier):
        def __init__(self, net):
            super().__init__(net)
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="SAMMixin"):
        quiet_trainer(max_steps=1, callbacks=[SAMCallback()]).fit(Manual(make_mlp()), fixed_loader())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"variant": "adam"}, ValueError, "Available variants"),
        ({"rho": 0}, ValueError, "rho must be"),
        ({"rho": float("nan")}, ValueError, "rho must be"),
        ({"variant": "sam", "eta": 0.1}, TypeError, "unknown option"),
        ({"variant": "asam", "eta": float("inf")}, ValueError, "eta must be"),
    ],
)
def test_bad_input_raises_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        SAMCallback(**kwargs)


def test_state_key_includes_the_variant():
    assert "asam" in SAMCallback("asam").state_key
    assert SAMCallback("sam").state_key != SAMCallback("asam").state_key


class FailingInSecondPass(Classifier):
    """Raises inside pass 2 of step ``fail_at`` (0-based)."""

    def __init__(self, net, fail_at):
        super().__init__(net)
        self.fail_at = fail_at

    def training_step(self, batch, batch_idx):
        if in_second_pass() and batch_idx == self.fail_at:
            raise RuntimeError("failure in pass 2")
        return super().training_step(batch, batch_idx)


def test_exception_in_second_pass_restores_weights_and_checkpoint_is_clean(tmp_path):
    net = make_mlp()
    loader = fixed_loader(n=96, batch_size=16)
    expected = reference_weights(net, list(loader)[:2], "sam", 0.05, "sgd")  # two full steps before the failure
    module = FailingInSecondPass(copy.deepcopy(net), fail_at=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_on_exception=True, save_top_k=0, save_last=False)
    callback = SAMCallback("sam")
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback, checkpoint], enable_checkpointing=True)
    with pytest.raises(RuntimeError, match="failure in pass 2"):
        trainer.fit(module, loader)
    assert not callback.engine.is_perturbed
    for p, q in zip(module.net.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    saved = list(tmp_path.glob("*.ckpt"))
    assert saved, "save_on_exception wrote no checkpoint"
    state = torch.load(saved[0], weights_only=False)["state_dict"]
    for name, q in expected.named_parameters():
        torch.testing.assert_close(state[f"net.{name}"], q, atol=1e-6, rtol=0)


def test_every_step_checkpoint_and_validation_see_unperturbed_weights(tmp_path):
    net = make_mlp()
    loader = fixed_loader(n=64, batch_size=16)
    batches = list(loader)
    after_step = []
    reference = copy.deepcopy(net)
    optimizer = make_optimizer("sgd", reference.parameters())
    for batch in batches:
        reference_sam_step(reference, cross_entropy_of(batch), optimizer, "sam", 0.05)
        after_step.append({n: p.detach().clone() for n, p in reference.named_parameters()})
    seen_in_validation = []

    class Validating(Classifier):
        def validation_step(self, batch, batch_idx):
            if batch_idx == 0:
                seen_in_validation.append({n: p.detach().clone() for n, p in self.net.named_parameters()})

    module = Validating(copy.deepcopy(net))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = quiet_trainer(
        max_epochs=1,
        callbacks=[SAMCallback("sam"), checkpoint],
        enable_checkpointing=True,
        val_check_interval=1,
        limit_val_batches=1,
    )
    trainer.fit(module, loader, val_dataloaders=fixed_loader(n=16, batch_size=16))
    assert len(seen_in_validation) == 4
    for step, weights in enumerate(seen_in_validation):
        for name, value in weights.items():
            torch.testing.assert_close(value, after_step[step][name], atol=1e-6, rtol=0)
    for step in range(1, 5):
        state = torch.load(tmp_path / f"step={step}.ckpt", weights_only=False)["state_dict"]
        for name, value in after_step[step - 1].items():
            torch.testing.assert_close(state[f"net.{name}"], value, atol=1e-6, rtol=0)


def test_dropout_matches_a_plain_loop_drawing_the_same_masks():
    """Pass 2 draws fresh dropout masks, exactly like a plain two-forward SAM loop does."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.3), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    loader = fixed_loader(n=80, batch_size=16)
    reference = copy.deepcopy(net)
    optimizer = make_optimizer("sgd", reference.parameters())
    torch.manual_seed(42)
    for batch in loader:
        reference_sam_step(reference, cross_entropy_of(batch), optimizer, "sam", 0.05)
    module = Classifier(copy.deepcopy(net))
    trainer = quiet_trainer(max_epochs=1, callbacks=[SAMCallback("sam")])
    torch.manual_seed(42)
    trainer.fit(module, loader)
    for p, q in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------- configurations SAM rejects
def test_lbfgs_is_rejected_before_training():
    class WithLBFGS(Classifier):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=0.1)

    module = WithLBFGS(make_mlp())
    steps = []
    module.training_step = lambda batch, batch_idx: steps.append(batch_idx)  # never reached
    with pytest.raises(ValueError, match=r"does not support torch\.optim\.LBFGS"):
        quiet_trainer(max_steps=2, callbacks=[SAMCallback("sam")]).fit(module, fixed_loader())
    assert steps == []


class TwoEvaluations(torch.optim.SGD):
    """A first-order optimizer whose step evaluates the closure twice (as a line search would)."""

    def step(self, closure=None):
        closure()
        return super().step(closure)


def test_an_optimizer_evaluating_its_closure_twice_gets_a_clear_error():
    class WithTwoEvaluations(Classifier):
        def configure_optimizers(self):
            return TwoEvaluations(self.parameters(), lr=0.1)

    module = WithTwoEvaluations(make_mlp())
    callback = SAMCallback("sam")
    with pytest.raises(RuntimeError, match="evaluated its closure more than once"):
        quiet_trainer(max_steps=2, callbacks=[callback]).fit(module, fixed_loader())
    assert not callback.engine.is_perturbed


def test_two_sam_callbacks_are_rejected_at_setup():
    module = Classifier(make_mlp())
    trainer = quiet_trainer(max_steps=2, callbacks=[SAMCallback("sam"), SAMCallback("asam")])
    with pytest.raises(RuntimeError, match="has 2 SAMCallbacks"):
        trainer.fit(module, fixed_loader())
    assert trainer.global_step == 0


@pytest.mark.parametrize("name", ["sync_ascent", "skip_nonfinite"])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_boolean_options_must_be_booleans(name, value):
    if name == "sync_ascent" and value is None:  # unset: the strategy's own choice (DDP local, FSDP2 global)
        assert SAMCallback("sam", sync_ascent=None).sync_ascent is None
        return
    with pytest.raises(ValueError, match=f"{name} must be True or False"):
        SAMCallback("sam", **{name: value})


# ---------------------------------------------------------------------------------------------- non-finite pass 2
class DivergingAtPerturbedWeights(Classifier):
    """The loss is NaN in pass 2 of the optimizer steps in ``bad`` (the perturbed point diverged)."""

    def __init__(self, net, bad):
        super().__init__(net)
        self.bad = bad

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if in_second_pass() and self.trainer.global_step in self.bad:
            loss = loss * float("nan")
        return loss


def test_non_finite_second_pass_skips_the_update_with_a_warning():
    net = make_mlp()
    batches = list(fixed_loader(n=64, batch_size=16))
    module = DivergingAtPerturbedWeights(copy.deepcopy(net), bad={1, 2})
    callback = SAMCallback("sam")
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback])
    with pytest.warns(UserWarning, match="not finite at step 1: this optimizer step is skipped"):
        trainer.fit(module, fixed_loader(n=64, batch_size=16))
    assert trainer.global_step == 4 and callback.engine.step_count == 4
    reference = copy.deepcopy(net)
    optimizer = make_optimizer("sgd", reference.parameters())
    for index in (0, 3):  # the steps that were not skipped; the momentum buffer is untouched by the others
        reference_sam_step(reference, cross_entropy_of(batches[index]), optimizer, "sam", 0.05)
    for p, q in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    sharpness = trainer.callback_metrics["sam/sharpness_epoch"]
    assert torch.isfinite(sharpness)  # the skipped steps' values stayed out of the epoch mean


def test_skip_nonfinite_false_lets_the_step_through():
    module = DivergingAtPerturbedWeights(make_mlp(), bad={1})
    trainer = quiet_trainer(max_steps=2, callbacks=[SAMCallback("sam", skip_nonfinite=False)])
    trainer.fit(module, fixed_loader())
    assert not all(torch.isfinite(p).all() for p in module.net.parameters())
