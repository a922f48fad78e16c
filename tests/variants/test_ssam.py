"""SSAM: masks, patterns, engine and callback against the plain reference, state, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Classifier, fixed_loader, make_mlp, make_optimizer, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from reference import ReferenceSSAM, reference_ssam_run
from torch.nn import functional as F

from lightning_sam import SAMCallback, SAMEngine
from lightning_sam.sharded_selection import ShardedSelection, random_keys
from lightning_sam.variants import ssam_masks
from lightning_sam.variants.ssam import STORAGES

CONFIGS = {
    "fisher-unstructured": {"mask": "fisher", "pattern": "unstructured", "sparsity": 0.7},
    "fisher-structured": {"mask": "fisher", "pattern": "structured", "sparsity": 0.5},
    "fisher-n:m": {"mask": "fisher", "pattern": "n:m", "n": 1, "m": 4},
    "dst": {"mask": "dst", "sparsity": 0.6, "drop_rate": 0.5, "seed": 3},
}
SCHEDULE = {"num_samples": 24, "mask_every": 3, "total_steps": 8}  # a Fisher mask spans two batches of 16


def engine_run(net, batches, options):
    optimizer = make_optimizer("sgd", net.parameters())
    engine = SAMEngine(net.named_parameters(), "ssam", 0.05, **options)
    for x, y in batches:
        if engine.samples_needed():
            engine.collect_samples(lambda i, j, x=x, y=y: F.cross_entropy(net(x[i:j]), y[i:j]), x.shape[0])
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        if not engine.needs_second_pass():
            engine.plain_step()
        else:
            engine.ascend()
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            engine.descend()
        optimizer.step()
    return engine


def reference_run(net, batches, options):
    net = copy.deepcopy(net)
    options = {k: v for k, v in options.items() if k != "storage"}  # how the library stores the step, not the rule
    reference = ReferenceSSAM(net, rho=0.05, **options)
    reference_ssam_run(net, batches, make_optimizer("sgd", net.parameters()), reference)
    return net, reference


def assert_close_nets(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("storage", ["dense", "sparse"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_engine_matches_reference_across_refreshes(config, storage):
    options = {**CONFIGS[config], **SCHEDULE, "storage": storage}
    batches = list(fixed_loader(n=128, batch_size=16))  # 8 steps: refreshes at 0 (done at 1), 3 (4), 6 (7)
    net = make_mlp()
    expected, reference = reference_run(net, batches, options)
    engine = engine_run(net, batches, options)
    assert_close_nets(net, expected)
    masks = engine.variant.dense_masks()
    flat = torch.cat([masks[name].reshape(-1) for name, _ in net.named_parameters()])
    assert set(torch.nonzero(flat).reshape(-1).tolist()) == reference.mask


@pytest.mark.parametrize("config", ["fisher-unstructured", "dst"])
def test_callback_matches_reference(config):
    options = {**CONFIGS[config], **SCHEDULE}
    loader = fixed_loader(n=128, batch_size=16)
    net = make_mlp()
    expected, _ = reference_run(net, list(loader), options)
    module = Classifier(copy.deepcopy(net))
    callback = SAMCallback("ssam", rho=0.05, **options)
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], log_every_n_steps=1)  # variant metrics: on cadence
    trainer.fit(module, loader)
    assert_close_nets(module.net, expected)
    assert trainer.callback_metrics["sam/mask_density_step"].item() == pytest.approx(
        callback.engine.variant.kept_count() / 195
    )


def test_callback_defaults_refresh_fisher_every_epoch_and_dst_every_five():
    loader = fixed_loader(n=64, batch_size=16)
    fisher = SAMCallback("ssam")
    quiet_trainer(max_epochs=1, callbacks=[fisher]).fit(Classifier(make_mlp()), loader)
    assert fisher.engine.variant.mask_every == 4
    dst = SAMCallback("ssam", mask="dst")
    quiet_trainer(max_epochs=2, callbacks=[dst]).fit(Classifier(make_mlp()), loader)
    assert dst.engine.variant.mask_every == 20 and dst.engine.variant.total_steps == 8


def test_sparsity_zero_is_sam_exactly():
    batches = list(fixed_loader(n=96, batch_size=16))
    net = make_mlp()
    sam_net = copy.deepcopy(net)
    engine_run(net, batches, {"sparsity": 0.0})
    optimizer = make_optimizer("sgd", sam_net.parameters())
    engine = SAMEngine(sam_net.named_parameters(), "sam", 0.05)
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(sam_net(x), y).backward()
        engine.ascend()
        optimizer.zero_grad()
        F.cross_entropy(sam_net(x), y).backward()
        engine.descend()
        optimizer.step()
    for p, q in zip(net.parameters(), sam_net.parameters()):
        assert torch.equal(p, q)


def one_ascent(options, net=None):
    net = net or make_mlp()
    x, y = next(iter(fixed_loader(n=32, batch_size=32)))
    engine = SAMEngine(net.named_parameters(), "ssam", 0.05, **{"num_samples": 32, "mask_every": 1, **options})
    engine.collect_samples(lambda i, j: F.cross_entropy(net(x[i:j]), y[i:j]), 32)
    F.cross_entropy(net(x), y).backward()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    engine.ascend()
    moved = {n: p.detach() != before[n] for n, p in net.named_parameters()}
    engine.restore()
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())
    return engine, engine.variant.dense_masks(), moved


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_unstructured_density_is_exact_and_only_masked_coordinates_move(sparsity):
    engine, masks, moved = one_ascent({"sparsity": sparsity})
    assert engine.variant.kept_count() == round(195 * (1 - sparsity))
    moved_masked = torch.cat([moved[name][mask] for name, mask in masks.items()])
    for name, mask in masks.items():
        assert not moved[name][~mask].any()  # unmasked coordinates bit-identical
    assert moved_masked.float().mean() > 0.9  # masked ones moved (only a zero gradient would not)


def test_n_of_m_keeps_exactly_n_in_every_group_and_whole_small_tensors():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Unflatten(1, (2, 2, 2)), torch.nn.Conv2d(2, 4, 2), torch.nn.Flatten(), torch.nn.Linear(4, 3)
    )
    engine, masks, _ = one_ascent({"pattern": "n:m", "n": 2, "m": 4}, net)
    conv = masks["1.weight"].reshape(4, -1)  # in * kh * kw = 8 per filter: two groups of 4
    assert conv.reshape(4, 2, 4).sum(-1).eq(2).all()
    assert masks["3.weight"].reshape(3, 1, 4).sum(-1).eq(2).all()
    assert masks["1.bias"].all() and masks["3.bias"].all()
    assert sorted(engine.variant.fully_perturbed) == ["1.bias", "3.bias"]


def test_structured_keeps_whole_tensors():
    _, masks, _ = one_ascent({"pattern": "structured", "sparsity": 0.5})
    assert all(mask.all() or not mask.any() for mask in masks.values())
    kept = sum(mask.sum().item() for mask in masks.values())
    assert kept >= 195 * 0.5


def test_dst_density_exact_and_identical_given_the_seed():
    sizes = [50, 30, 20]
    selection = ShardedSelection.whole([torch.zeros(s) for s in sizes])
    mask = ssam_masks.dst_initial(selection, 0.3, seed=1)
    for draw in range(1, 6):
        scores = [torch.rand(s) for s in sizes]
        new = ssam_masks.dst_update(selection, mask, scores, 0.5, seed=1, draw=draw)
        assert sum(k.numel() for k in new) == 30
        assert any(not torch.equal(a, b) for a, b in zip(mask, new))
        mask = new
    again = ssam_masks.dst_initial(selection, 0.3, seed=1)
    first = ssam_masks.dst_initial(selection, 0.3, seed=1)
    other = ssam_masks.dst_initial(selection, 0.3, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(again, first))
    assert any(not torch.equal(a, b) for a, b in zip(other, first))


def test_random_keys_choose_uniformly():
    """DST's random choices are the smallest random keys: over many draws every coordinate is chosen about as
    often (a chi-square test at a fixed seed), and the keys of two draws are unrelated."""
    index = torch.arange(40)
    hits = torch.zeros(40)
    for draw in range(2000):
        hits[torch.sort(random_keys(index, 0, draw)).indices[:10]] += 1
    expected = 2000 * 10 / 40
    chi2 = (((hits - expected) ** 2) / expected).sum().item()
    assert chi2 < 80, chi2  # 39 degrees of freedom: p < 1e-4 above ~80
    first, second = random_keys(index, 0, 1), random_keys(index, 0, 2)
    assert (first >= 0).all() and len(set(first.tolist())) == 40
    assert abs(torch.corrcoef(torch.stack([first.double(), second.double()]))[0, 1].item()) < 0.5


def test_selection_equals_a_plain_sort_with_ties():
    """The radix selection (the one every layout uses) keeps exactly k, the highest scores, ties to the lower
    global index: the same as sorting all scores."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        shapes = [(5, 7), (13,), (3, 4, 2), (1,)]
        scores = [torch.randint(0, 4, s, generator=generator).float() * 0.5 for s in shapes]  # many ties, zeros
        if trial % 2:
            scores[1] = scores[1].double()
        keep = torch.rand((), generator=generator).item()
        mask = ssam_masks.unstructured(ShardedSelection.whole(scores), scores, keep)
        flat = torch.cat([s.reshape(-1).double() for s in scores])
        order = sorted(range(flat.numel()), key=lambda i: (-flat[i].item(), i))[: round(flat.numel() * keep)]
        offsets = [0, 35, 48, 72]
        got = sorted(int(i) + offsets[t] for t, kept in enumerate(mask) for i in kept)
        assert got == sorted(order)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_dense_and_sparse_storage_give_the_same_weights_bit_for_bit(config):
    """The two storages run the same rule: dense (foreach ops over whole tensors and bool masks) and sparse (index
    ops on the kept coordinates) end in identical weights, and log the same ||e||."""
    options = {**CONFIGS[config], **SCHEDULE}
    batches = list(fixed_loader(n=128, batch_size=16))
    nets = [make_mlp(), make_mlp()]
    engines = [engine_run(net, batches, {**options, "storage": storage}) for net, storage in zip(nets, STORAGES)]
    for p, q in zip(*(net.parameters() for net in nets)):
        assert torch.equal(p, q)
    norms = [float(engine.last_perturbation_norm) for engine in engines]  # summed in another order: fp32 rounding
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)
    dense = engines[0].variant
    assert all(m is None or m.dtype == torch.bool for m in dense._dense_masks.values())
    # dense: no copy at all (the engine swaps w + e in, as for SAM); sparse: its own copy of the kept coordinates
    assert engines[0]._saved_views is None and not dense._saved
    assert not engines[1]._saved_views and engines[1].variant._saved


def test_saved_copy_holds_only_kept_coordinates():
    engine, _, _ = one_ascent({"sparsity": 0.9, "storage": "sparse"})
    saved = sum(t.numel() for t in engine.variant._saved.values())
    assert saved == engine.variant.kept_count() == round(195 * (1 - 0.9))
    assert all(i is None or i.dtype == torch.int32 for i in engine.variant._device_index.values())


def test_fisher_refresh_does_not_touch_grads_or_batchnorm():
    net = make_mlp(batchnorm=True)
    x, y = next(iter(fixed_loader(n=32, batch_size=32)))
    engine = SAMEngine(net.named_parameters(), "ssam", num_samples=8, mask_every=1)
    F.cross_entropy(net(x), y).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    buffers = [b.clone() for b in net.buffers()]
    net[1].eval()
    engine.collect_samples(lambda i, j: F.cross_entropy(net(x[i:j]), y[i:j]), 32)
    net[1].train()
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
    assert all(torch.equal(b, c) for b, c in zip(net.buffers(), buffers))
    assert engine.needs_second_pass()


def test_resume_exact_with_a_fisher_refresh_in_progress(tmp_path):
    options = {"num_samples": 24, "mask_every": 7, "sparsity": 0.5}  # 4 steps per epoch: the refresh of step 7
    # takes 16 samples there and its last 8 in step 8, the first step after the checkpoint
    loader = fixed_loader(n=64, batch_size=16)
    straight = Classifier(make_mlp())
    straight_callback = SAMCallback("ssam", **options)
    quiet_trainer(max_epochs=3, callbacks=[straight_callback]).fit(straight, loader)
    first = Classifier(make_mlp())
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first_callback = SAMCallback("ssam", **options)
    quiet_trainer(max_epochs=2, callbacks=[first_callback, checkpoint], enable_checkpointing=True).fit(first, loader)
    saved_state = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"][first_callback.state_key]
    assert "fisher" in saved_state["engine"]["variant_state"]  # the refresh started at step 6 is still running
    resumed = Classifier(make_mlp(seed=9))
    resumed_callback = SAMCallback("ssam", **options)
    quiet_trainer(max_epochs=3, callbacks=[resumed_callback]).fit(resumed, loader, ckpt_path=tmp_path / "last.ckpt")
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    a, b = straight_callback.engine.variant.dense_masks(), resumed_callback.engine.variant.dense_masks()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_exact_with_dst(tmp_path):
    # T is fixed: by default it is each run's own estimated total, which differs for the 2-epoch first leg
    options = {"mask": "dst", "mask_every": 2, "sparsity": 0.5, "total_steps": 12}
    loader = fixed_loader(n=64, batch_size=16)
    straight = Classifier(make_mlp())
    quiet_trainer(max_epochs=3, callbacks=[SAMCallback("ssam", **options)]).fit(straight, loader)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_epochs=2, callbacks=[SAMCallback("ssam", **options), checkpoint], enable_checkpointing=True).fit(
        Classifier(make_mlp()), loader
    )
    resumed = Classifier(make_mlp(seed=4))
    quiet_trainer(max_epochs=3, callbacks=[SAMCallback("ssam", **options)]).fit(
        resumed, loader, ckpt_path=tmp_path / "last.ckpt"
    )
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_16_mixed_trains_and_skips_an_overflowing_step():
    class Poisoned(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 3 else loss

    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    module = Poisoned(make_mlp())
    callback = SAMCallback("ssam", num_samples=16, mask_every=2)
    trainer = quiet_trainer(
        max_epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], callbacks=[callback]
    )
    trainer.fit(module, fixed_loader(n=96, batch_size=16))
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert scaler.get_scale() == 128.0  # halved once for the poisoned step
    assert callback.engine.variant.kept_count() == round(195 * 0.5)


class Unsliceable(Classifier):
    def training_step(self, batch, batch_idx):
        return super().training_step((batch.x, batch.y), batch_idx)


class Box:
    def __init__(self, x, y):
        self.x, self.y = x, y


def test_unsliceable_batch_names_the_option_that_avoids_it():
    data = [Box(*b) for b in fixed_loader(n=32, batch_size=16)]
    loader = torch.utils.data.DataLoader(data, batch_size=None, collate_fn=lambda b: b)
    callback = SAMCallback("ssam", mask_every=1, total_steps=2)
    with pytest.raises(ValueError, match="mask='dst'"):
        quiet_trainer(max_steps=1, callbacks=[callback]).fit(Unsliceable(make_mlp()), loader)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"mask": "random"}, "unknown mask"),
        ({"pattern": "blocks"}, "unknown pattern"),
        ({"pattern": "n:m", "n": 4, "m": 4}, "1 <= n < m"),
        ({"pattern": "n:m", "n": 0, "m": 4}, "n must be"),
        ({"num_samples": 0}, "num_samples"),
        ({"mask": "dst", "pattern": "structured"}, "pattern='unstructured' only"),
        ({"drop_rate": 1.5}, "drop_rate"),
        ({"mask_every": 0}, "mask_every"),
        ({"storage": "flat"}, "unknown storage"),
    ],
)
def test_bad_input_raises_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        SAMCallback("ssam", **options)


def test_no_tensor_fitting_n_of_m_raises_at_setup():
    net = torch.nn.Linear(3, 2)  # fan-in 3: not divisible by 4; the bias is 1-D
    with pytest.raises(ValueError, match="no trained tensor can take the 2:4 pattern"):
        SAMEngine(net.named_parameters(), "ssam", pattern="n:m")
    with pytest.raises(ValueError, match="total_steps"):
        SAMEngine(net.named_parameters(), "ssam", mask="dst")


def test_mixin_with_fisher_mask_matches_reference():
    from lightning_sam import SAMMixin

    class ManualSSAM(SAMMixin, Classifier):
        def __init__(self, net, **options):
            super().__init__(net)
            self.automatic_optimization = False
            self.configure_sam("ssam", rho=0.05, **options)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.sam_step(
                lambda: F.cross_entropy(self(x), y),
                sample_loss_fn=lambda i, j: F.cross_entropy(self(x[i:j]), y[i:j]),
                batch_size=x.shape[0],
            )

    options = {**CONFIGS["fisher-unstructured"], **SCHEDULE}
    loader = fixed_loader(n=128, batch_size=16)
    net = make_mlp()
    expected, _ = reference_run(net, list(loader), options)
    module = ManualSSAM(copy.deepcopy(net), **options)
    quiet_trainer(max_epochs=1).fit(module, loader)
    assert_close_nets(module.net, expected)

    class Forgetful(ManualSSAM):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.sam_step(lambda: F.cross_entropy(self(x), y))

    with pytest.raises(RuntimeError, match="sample_loss_fn"):
        quiet_trainer(max_steps=1).fit(Forgetful(make_mlp()), loader)


def test_one_fisher_refresh_per_step_under_accumulation_and_its_cost_is_logged():
    refreshes = []

    class Counting(SAMCallback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            metrics = self.engine.variant.metrics()
            refreshes.append("sam/mask_refresh_seconds" in metrics)
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

    callback = Counting("ssam", num_samples=16, mask_every=2)
    trainer = quiet_trainer(max_epochs=1, accumulate_grad_batches=4, callbacks=[callback])
    trainer.fit(Classifier(make_mlp()), fixed_loader(n=256, batch_size=16))  # 4 optimizer steps
    assert refreshes == [True, False, True, False]  # steps 0 and 2 refresh once each, the first one reported too


def test_dst_refresh_due_on_a_skipped_step_runs_at_the_next_ascent():
    batches = list(fixed_loader(n=96, batch_size=16))
    net = make_mlp()
    optimizer = make_optimizer("sgd", net.parameters())
    engine = SAMEngine(
        net.named_parameters(), "ssam", mask="dst", mask_every=3, total_steps=6, interval=2, sparsity=0.5
    )
    masks = []
    for x, y in batches:

        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        engine.step(closure, optimizer)
        masks.append(torch.cat([m.reshape(-1) for m in engine.variant.dense_masks().values()]).clone())
    # steps with an ascent: 0, 2, 4. The refresh due at step 3 (no ascent) runs at step 4.
    assert torch.equal(masks[0], masks[3]) and not torch.equal(masks[3], masks[4])


def test_frozen_parameters_collect_no_samples_and_train_like_plain_steps():
    """Every parameter in the optimizer frozen (the loss still has a gradient elsewhere): no autograd error, plain
    steps, the optimizer's parameters unchanged."""
    net = make_mlp()
    for p in net.parameters():
        p.requires_grad_(False)

    class FrozenNet(Classifier):
        def __init__(self):
            super().__init__(net)
            self.extra = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) + self.extra**2

        def configure_optimizers(self):
            return torch.optim.SGD(list(self.net.parameters()), lr=0.1)

    module = FrozenNet()
    before = [p.clone() for p in net.parameters()]
    callback = SAMCallback("ssam", num_samples=4)
    trainer = quiet_trainer(max_steps=3, callbacks=[callback])
    trainer.fit(module, fixed_loader())
    assert trainer.global_step == 3 and callback.engine.step_count == 3
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_warns_when_the_first_fisher_mask_would_take_the_whole_first_epoch():
    with pytest.warns(UserWarning, match=r"collects 128 training samples .* 8 batches of 16, but an epoch has 4"):
        quiet_trainer(max_steps=2, callbacks=[SAMCallback("ssam")]).fit(Classifier(make_mlp()), fixed_loader())


def test_no_warning_when_the_first_mask_is_ready_within_the_first_epoch(recwarn):
    quiet_trainer(max_steps=2, callbacks=[SAMCallback("ssam", num_samples=32)]).fit(
        Classifier(make_mlp()), fixed_loader()
    )
    assert not [w for w in recwarn if "training samples for its first mask" in str(w.message)]
