"""The step driver (lightning_sam.step.TwoPassStep) with a plain replay: no Lightning involved."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import cross_entropy_of, fixed_loader, make_mlp, make_optimizer
from reference import reference_sam_step

from lightning_sam import SAMEngine
from lightning_sam.precision import NoScaling
from lightning_sam.step import TwoPassStep


class Replay:
    """Passes of one batch on ``net``; records the sync flag of every pass and can fail or diverge on request."""

    probe_clobbers_grads = False

    def __init__(self, net, batch, fail_in_second=False, nan_in_second=False):
        self.net, self.loss_of = net, cross_entropy_of(batch)
        self.fail_in_second, self.nan_in_second = fail_in_second, nan_in_second
        self.syncs: list[tuple[str, bool]] = []

    def first_pass(self, sync):
        self.syncs.append(("first", sync))
        loss = self.loss_of(self.net)
        loss.backward()
        return loss.detach()

    def second_pass(self, sync):
        self.syncs.append(("second", sync))
        if self.fail_in_second:
            raise RuntimeError("boom")
        loss = self.loss_of(self.net) * (float("nan") if self.nan_in_second else 1.0)
        loss.backward()
        return loss.detach()

    def probe(self):
        with torch.no_grad():
            return self.loss_of(self.net)


def driver_for(net, variant="sam", precision=None, **options):
    optimizer = make_optimizer("sgd", net.parameters())
    engine = SAMEngine(net.named_parameters(), variant, **options)
    return TwoPassStep(engine, precision or NoScaling(skip_nonfinite=True)), optimizer


def test_the_driver_is_sam_against_the_reference():
    net, batches = make_mlp(), list(fixed_loader(n=64, batch_size=16))
    reference = copy.deepcopy(net)
    reference_optimizer = make_optimizer("sgd", reference.parameters())
    driver, optimizer = driver_for(net)
    for batch in batches:
        optimizer.zero_grad()
        _, outcome = driver.run(optimizer, Replay(net, batch))
        optimizer.step()
        reference_sam_step(reference, cross_entropy_of(batch), reference_optimizer, "sam", 0.05)
        assert outcome.second_pass and not outcome.skipped
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_sync_plan_local_first_pass_and_synced_last_pass():
    net, batch = make_mlp(), next(iter(fixed_loader()))
    driver, optimizer = driver_for(net, "xsam", steps=2, alpha_every=0)
    replay = Replay(net, batch)
    driver.run(optimizer, replay)
    assert replay.syncs == [("first", False), ("second", False), ("second", True)]  # k = 2: only the last syncs
    driver, optimizer = driver_for(net, "sam", interval=2)
    replays = [Replay(net, batch) for _ in range(2)]
    for replay in replays:
        optimizer.zero_grad()
        driver.run(optimizer, replay)
    assert replays[1].syncs == [("first", True)]  # a step without pass 2 descends on pass 1: it must all-reduce
    driver.sync_ascent = True
    optimizer.zero_grad()
    replay = Replay(net, batch)
    driver.run(optimizer, replay)
    assert replay.syncs == [("first", True), ("second", True)]


def test_weights_are_restored_when_the_second_pass_raises():
    net, batch = make_mlp(), next(iter(fixed_loader()))
    before = [p.detach().clone() for p in net.parameters()]
    driver, optimizer = driver_for(net)
    with pytest.raises(RuntimeError, match="boom"):
        driver.run(optimizer, Replay(net, batch, fail_in_second=True))
    assert not driver.engine.is_perturbed
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


@pytest.mark.parametrize("skip", [True, False])
def test_a_non_finite_second_pass_drops_the_update_only_when_asked(skip):
    net, batch = make_mlp(), next(iter(fixed_loader()))
    before = [p.detach().clone() for p in net.parameters()]
    warnings = []
    driver, optimizer = driver_for(net, precision=NoScaling(skip_nonfinite=skip, warn=warnings.append))
    _, outcome = driver.run(optimizer, Replay(net, batch, nan_in_second=True))
    optimizer.step()
    assert outcome.skipped is skip
    assert len(warnings) == (1 if skip else 0)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert unchanged is skip  # skipped: untouched; let through: the NaN gradient reached the weights


def test_measure_false_skips_the_norm_of_e():
    net, batch = make_mlp(), next(iter(fixed_loader()))
    driver, optimizer = driver_for(net)
    _, outcome = driver.run(optimizer, Replay(net, batch), measure=False)
    assert outcome.second_pass and outcome.perturbation_norm is None
    optimizer.zero_grad()
    _, outcome = driver.run(optimizer, Replay(net, batch))
    torch.testing.assert_close(outcome.perturbation_norm, torch.tensor(0.05), atol=1e-6, rtol=0)
