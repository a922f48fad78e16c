"""Pass 2 is invisible to the user's module: logs, torchmetrics, BatchNorm statistics, in_second_pass()."""

from __future__ import annotations

import copy

import pytest
import torch
import torchmetrics
from conftest import Classifier, cross_entropy_of, fixed_loader, make_mlp, make_optimizer, quiet_trainer
from lightning.pytorch import Callback
from reference import reference_sam_step
from torch.nn import functional as F

import lightning_sam
from lightning_sam import SAMCallback


def reference_run(net, batches):
    net = copy.deepcopy(net)
    optimizer = make_optimizer("sgd", net.parameters())
    losses, logits = [], []
    for batch in batches:
        x, _ = batch
        buffers = [b.clone() for b in net.buffers()]
        with torch.no_grad():
            logits.append(net(x))  # what pass 1 sees (before the step), for the metric oracle
            for b, saved in zip(net.buffers(), buffers):
                b.copy_(saved)
        loss1, _ = reference_sam_step(net, cross_entropy_of(batch), optimizer, "sam", 0.05)
        losses.append(loss1.item())
    return net, losses, logits


def test_logs_and_progress_bar_show_pass_one():
    net = make_mlp()
    loader = fixed_loader(n=80, batch_size=16)
    _, losses, _ = reference_run(net, list(loader))
    module = Classifier(copy.deepcopy(net))
    trainer = quiet_trainer(max_epochs=1, callbacks=[SAMCallback("sam")], log_every_n_steps=1)
    trainer.fit(module, loader)
    assert trainer.progress_bar_metrics["train_loss_step"] == pytest.approx(losses[-1], abs=1e-6)
    assert trainer.callback_metrics["train_loss_epoch"].item() == pytest.approx(sum(losses) / len(losses), abs=1e-6)
    # sharpness and perturbation norm are logged like any metric, on Lightning's cadence (log_every_n_steps)
    assert trainer.callback_metrics["sam/perturbation_norm_epoch"].item() == pytest.approx(0.05, abs=1e-6)
    assert "sam/sharpness_step" in trainer.callback_metrics


class MetricProbe(Callback):
    """Snapshots the metric states after each full training step (after pass 2)."""

    def __init__(self):
        self.states = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        acc = pl_module.train_acc
        group = pl_module.metrics
        self.states.append(
            {
                "acc": {k: getattr(acc, k).clone() for k in acc._defaults},
                "prec": {k: getattr(group["prec"], k).clone() for k in group["prec"]._defaults},
                "rec": {k: getattr(group["rec"], k).clone() for k in group["rec"]._defaults},
                "acc_count": acc._update_count,
            }
        )


def test_torchmetrics_keep_pass_one_state_including_compute_groups():
    net = make_mlp()
    loader = fixed_loader(n=80, batch_size=16)
    batches = list(loader)
    _, _, logits = reference_run(net, batches)
    probe = MetricProbe()
    module = Classifier(copy.deepcopy(net), with_metrics=True)
    quiet_trainer(max_epochs=1, callbacks=[SAMCallback("sam"), probe]).fit(module, loader)
    expected_group = torchmetrics.MetricCollection(
        {
            "prec": torchmetrics.Precision(task="multiclass", num_classes=3),
            "rec": torchmetrics.Recall(task="multiclass", num_classes=3),
        },
        compute_groups=True,
    )
    expected_acc = torchmetrics.Accuracy(task="multiclass", num_classes=3)
    assert len(probe.states) == len(batches)
    for step, (batch, state) in enumerate(zip(batches, probe.states)):
        expected_group.update(logits[step], batch[1])
        expected_acc.update(logits[step], batch[1])
        for key in state["prec"]:
            assert torch.equal(state["prec"][key], getattr(expected_group["prec"], key)), (step, key)
            assert torch.equal(state["rec"][key], getattr(expected_group["rec"], key)), (step, key)
        assert state["acc_count"] == step + 1
        for key in state["acc"]:
            assert torch.equal(state["acc"][key], getattr(expected_acc, key)), (step, key)


def test_metric_accumulated_over_epoch_equals_pass_one_only():
    net = make_mlp()
    loader = fixed_loader(n=80, batch_size=16)
    batches = list(loader)
    _, _, logits = reference_run(net, batches)

    class Counting(Classifier):
        def __init__(self, net):
            super().__init__(net)
            self.seen = torchmetrics.SumMetric()
            self.acc_epoch = torchmetrics.Accuracy(task="multiclass", num_classes=3)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.seen.update(torch.tensor(float(len(y))))
            self.acc_epoch.update(logits, y)
            return F.cross_entropy(logits, y)

    module = Counting(copy.deepcopy(net))
    quiet_trainer(max_epochs=1, callbacks=[SAMCallback("sam")]).fit(module, loader)
    assert module.seen.compute().item() == 80.0
    expected = torchmetrics.Accuracy(task="multiclass", num_classes=3)
    for step, batch in enumerate(batches):
        expected.update(logits[step], batch[1])
    assert module.acc_epoch.compute().item() == pytest.approx(expected.compute().item(), abs=0)


def test_batchnorm_statistics_stay_as_pass_one_left_them():
    net = make_mlp(batchnorm=True)
    loader = fixed_loader(n=80, batch_size=16)
    expected, _, _ = reference_run(net, list(loader))
    module = Classifier(copy.deepcopy(net))
    quiet_trainer(max_epochs=1, callbacks=[SAMCallback("sam")]).fit(module, loader)
    bn, ref_bn = module.net[1], expected[1]
    assert bn.num_batches_tracked.item() == 5
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, atol=1e-6, rtol=0)
    for p, q in zip(module.net.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_in_second_pass_flag():
    seen = []

    class Recording(Classifier):
        def training_step(self, batch, batch_idx):
            seen.append(lightning_sam.in_second_pass())
            return super().training_step(batch, batch_idx)

    callback = SAMCallback("sam")
    quiet_trainer(max_steps=3, callbacks=[callback]).fit(Recording(make_mlp()), fixed_loader())
    assert seen == [False, True] * 3
    assert not callback.in_second_pass and not lightning_sam.in_second_pass()


def test_training_step_returning_none_skips_sam():
    net = make_mlp()
    loader = fixed_loader(n=96, batch_size=16)
    batches = list(loader)

    class Skipping(Classifier):
        def training_step(self, batch, batch_idx):
            if batch_idx % 2 == 1:
                return None
            return super().training_step(batch, batch_idx)

    module = Skipping(copy.deepcopy(net))
    callback = SAMCallback("sam")
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(module, loader)
    reference = copy.deepcopy(net)
    optimizer = make_optimizer("sgd", reference.parameters())
    for batch in batches[::2]:
        reference_sam_step(reference, cross_entropy_of(batch), optimizer, "sam", 0.05)
    assert callback.engine.step_count == 6  # every optimizer step counts (schedules stay aligned with Lightning)
    for p, q in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
