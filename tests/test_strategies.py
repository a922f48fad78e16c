"""Gradient accumulation, gradient clipping, exact resume and strategy checks through SAMCallback."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import Classifier, cross_entropy_of, fixed_loader, make_mlp, make_optimizer, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from reference import PERTURBATIONS, reference_sam_step

from lightning_sam import SAMCallback
from lightning_sam.strategies import check_static_graph, check_strategy, resolve_sync_ascent


def reference_accumulated_sam(
    net, batches, accumulate, variant="sam", rho=0.05, clip=None, clip_algorithm="norm", skipped=frozenset()
):
    """SAM on windows of ``accumulate`` micro-batches, each forwarded separately, losses divided by ``accumulate``
    (also on a partial last window, as Lightning does). Micro-batches whose index is in ``skipped`` (training_step
    returned None) take part in neither pass."""
    net = copy.deepcopy(net)
    optimizer = make_optimizer("sgd", net.parameters())
    indices = range(0, len(batches), accumulate)
    windows = [[b for j, b in enumerate(batches[i : i + accumulate], i) if j not in skipped] for i in indices]
    for window in windows:
        optimizer.zero_grad()
        for batch in window:
            (cross_entropy_of(batch)(net) / accumulate).backward()
        params = [p for p in net.parameters() if p.grad is not None]
        grads = [p.grad.detach().clone() for p in params]
        originals = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, PERTURBATIONS[variant](params, grads, rho)):
                p.add_(e)
        optimizer.zero_grad()
        for batch in window:
            (cross_entropy_of(batch)(net) / accumulate).backward()
        with torch.no_grad():
            for p, original in zip(params, originals):
                p.copy_(original)
        if clip is not None:
            if clip_algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(params, clip)
            else:
                torch.nn.utils.clip_grad_value_(params, clip)
        optimizer.step()
    return net


@pytest.mark.parametrize("accumulate, n", [(2, 128), (3, 112)], ids=["full-windows", "partial-last-window"])
def test_accumulation_equals_sam_on_the_window(accumulate, n):
    net = make_mlp()
    loader = fixed_loader(n=n, batch_size=16)
    expected = reference_accumulated_sam(net, list(loader), accumulate)
    module = Classifier(copy.deepcopy(net))
    callback = SAMCallback("sam")
    trainer = quiet_trainer(max_epochs=1, accumulate_grad_batches=accumulate, callbacks=[callback])
    trainer.fit(module, loader)
    assert callback.engine.step_count == -(-len(loader) // accumulate)
    for p, q in zip(module.net.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_accumulation_replays_only_the_micro_batches_that_returned_a_loss():
    """training_step returns None for some micro-batches (in both passes, as plain Lightning allows): pass 2
    replays exactly the micro-batches whose pass 1 reached backward."""
    skipped = {1, 4}

    class Skipping(Classifier):
        def training_step(self, batch, batch_idx):
            return None if batch_idx in skipped else super().training_step(batch, batch_idx)

    net = make_mlp()
    loader = fixed_loader(n=128, batch_size=16)
    expected = reference_accumulated_sam(net, list(loader), 2, skipped=skipped)
    module = Skipping(copy.deepcopy(net))
    callback = SAMCallback("sam")
    trainer = quiet_trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[callback])
    trainer.fit(module, loader)
    assert callback.engine.step_count == trainer.global_step == 4
    for p, q in zip(module.net.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("algorithm, value", [("norm", 0.05), ("value", 0.01)])
def test_clipping_applies_to_the_descent_gradient(algorithm, value):
    net = make_mlp()
    loader = fixed_loader(n=96, batch_size=16)
    expected = reference_accumulated_sam(net, list(loader), 1, clip=value, clip_algorithm=algorithm)
    unclipped = reference_accumulated_sam(net, list(loader), 1)
    module = Classifier(copy.deepcopy(net))
    trainer = quiet_trainer(
        max_epochs=1, gradient_clip_val=value, gradient_clip_algorithm=algorithm, callbacks=[SAMCallback("sam")]
    )
    trainer.fit(module, loader)
    for p, q in zip(module.net.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert max((p - q).abs().max().item() for p, q in zip(expected.parameters(), unclipped.parameters())) > 1e-4


@pytest.mark.parametrize("variant", ["sam", "asam"])
def test_resume_from_epoch_boundary_is_bit_exact(tmp_path, variant):
    net = make_mlp(batchnorm=True)
    loader = fixed_loader(n=64, batch_size=16)
    straight = Classifier(copy.deepcopy(net))
    straight_callback = SAMCallback(variant)
    quiet_trainer(max_epochs=3, callbacks=[straight_callback]).fit(straight, loader)

    first = Classifier(copy.deepcopy(net))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_epochs=2, callbacks=[SAMCallback(variant), checkpoint], enable_checkpointing=True).fit(
        first, loader
    )
    resumed = Classifier(make_mlp(batchnorm=True, seed=123))  # fresh objects, other init
    resumed_callback = SAMCallback(variant)
    quiet_trainer(max_epochs=3, callbacks=[resumed_callback]).fit(resumed, loader, ckpt_path=tmp_path / "last.ckpt")
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    for b, c in zip(straight.buffers(), resumed.buffers()):
        assert torch.equal(b, c)
    assert resumed_callback.state_dict() == straight_callback.state_dict()
    assert straight_callback.engine.step_count == 12


def test_mid_epoch_checkpoint_restores_variant_state(tmp_path):
    module = Classifier(make_mlp())
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    quiet_trainer(max_steps=3, callbacks=[SAMCallback("asam"), checkpoint], enable_checkpointing=True).fit(
        module, fixed_loader(n=96, batch_size=16)
    )
    state = torch.load(tmp_path / "step=3.ckpt", weights_only=False)["callbacks"]
    key = SAMCallback("asam").state_key
    assert state[key]["engine"]["step"] == 3
    fresh = SAMCallback("asam")
    trainer = quiet_trainer(max_steps=4, callbacks=[fresh])
    trainer.fit(Classifier(make_mlp()), fixed_loader(n=96, batch_size=16), ckpt_path=tmp_path / "step=3.ckpt")
    assert fresh.engine.step_count == 4


def test_parameters_frozen_mid_training_are_not_perturbed():
    net = make_mlp()
    loader = fixed_loader(n=96, batch_size=16)
    batches = list(loader)

    class Freezing(Classifier):
        def on_train_batch_start(self, batch, batch_idx):
            if batch_idx == 2:
                self.net[0].weight.requires_grad_(False)

    reference = copy.deepcopy(net)
    optimizer = make_optimizer("sgd", reference.parameters())
    for i, batch in enumerate(batches):
        if i == 2:
            reference[0].weight.requires_grad_(False)
        reference_sam_step(reference, cross_entropy_of(batch), optimizer, "sam", 0.05)
    module = Freezing(copy.deepcopy(net))
    quiet_trainer(max_epochs=1, callbacks=[SAMCallback("sam")]).fit(module, loader)
    for p, q in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def _fake_trainer(strategy):
    return SimpleNamespace(strategy=strategy)


def test_fsdp1_and_deepspeed_are_rejected_with_a_clear_error():
    with pytest.raises(RuntimeError, match=r"FSDP1.*ModelParallelStrategy.*fully_shard"):
        check_strategy(_fake_trainer(FSDPStrategy()))
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # the real class; deepspeed itself is not installed
    with pytest.raises(RuntimeError, match="DeepSpeed owns the optimizer step"):
        check_strategy(_fake_trainer(deepspeed))
    with pytest.raises(RuntimeError, match=r"supports the single-device, DDP .* and ModelParallelStrategy"):
        check_strategy(_fake_trainer(object()))
    check_strategy(_fake_trainer(DDPStrategy()))  # accepted


def test_model_parallel_is_accepted_but_not_with_16_mixed_or_a_local_ascent():
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    check_strategy(SimpleNamespace(strategy=strategy, precision_plugin=SimpleNamespace()))
    scaled = SimpleNamespace(strategy=strategy, precision_plugin=SimpleNamespace(scaler=object()))
    with pytest.raises(RuntimeError, match=r"not '16-mixed'.*Use 'bf16-mixed'"):
        check_strategy(scaled)
    trainer = _fake_trainer(strategy)
    assert resolve_sync_ascent(trainer, None) is True
    assert resolve_sync_ascent(trainer, True) is True
    with pytest.raises(ValueError, match=r"sync_ascent=False .* cannot be honoured under ModelParallelStrategy"):
        resolve_sync_ascent(trainer, False)
    assert resolve_sync_ascent(_fake_trainer(DDPStrategy()), None) is False  # DDP: local pass 1 unless asked


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDP needs CUDA")
def test_fsdp_rejected_in_setup_before_training():
    trainer = quiet_trainer(max_steps=1, accelerator="cuda", strategy=FSDPStrategy(), callbacks=[SAMCallback()])
    with pytest.raises(RuntimeError, match=r"FSDP1.*ModelParallelStrategy"):
        trainer.fit(Classifier(make_mlp()), fixed_loader())


def test_static_graph_is_rejected_unless_sync_ascent():
    trainer = _fake_trainer(DDPStrategy(static_graph=True))
    with pytest.raises(RuntimeError, match="static_graph"):
        check_static_graph(trainer)
    check_static_graph(_fake_trainer(DDPStrategy()))


def test_per_rank_state_from_another_world_size_falls_back_to_rank_zero_with_a_warning():
    from lightning_sam.checkpointing import engine_state_for_this_rank

    state = {"engine": {"step": 1}, "engine_per_rank": [{"step": 1}, {"step": 2}]}
    with pytest.warns(UserWarning, match="every rank resumes from rank 0"):
        assert engine_state_for_this_rank(state) == {"step": 1}
    assert engine_state_for_this_rank({"engine": {"step": 3}}) == {"step": 3}
