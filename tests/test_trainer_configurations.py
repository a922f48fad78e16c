"""Every registered variant under each Trainer configuration users write.

Each run either trains (optimizer steps happen; their count equals the Trainer's ``global_step`` and the engine's
step counter, so the variants' schedules stay aligned) or, only where the number the variant needs truly cannot be
known, stops before the first ``training_step`` with an error that names this variant's option to pass.
"""

from __future__ import annotations

import re
from typing import Any

import lightning as L
import pytest
import torch
from conftest import make_data, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset

from lightning_sam import SAMCallback, SAMMixin, available_variants

SAMPLES, BATCH = 64, 16  # 4 batches per epoch

# What each variant needs to run on the small model below (BAR: one two-factor pair; SSAM: a quick first mask).
OPTIONS: dict[str, dict[str, Any]] = {
    "bar": {"pairs": [("net.0.weight", "net.2.weight")]},
    "ssam": {"num_samples": 4, "sparsity": 0.5},
}
CASES = [(name, OPTIONS.get(name, {})) for name in available_variants()]
CASES.append(("ssam", {"mask": "dst", "sparsity": 0.5}))


class Unsized(IterableDataset):
    """An IterableDataset without ``__len__``: its epoch length is unknown until it ends."""

    def __init__(self) -> None:
        self.data = make_data(SAMPLES)

    def __iter__(self):
        return iter(self.data)


class Counting(L.LightningModule):
    """An MLP whose first two Linear layers form a (B, A) pair for BAR; counts training_step and optimizer steps."""

    def __init__(self, unsized: bool = False, with_val: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 4, bias=False), nn.Tanh(), nn.Linear(4, 3))
        self.unsized, self.with_val = unsized, with_val
        self.training_steps = 0
        self.optimizer_steps = 0
        self.validation_steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.training_steps += 1
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_steps += 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        optimizer.register_step_post_hook(lambda *_: setattr(self, "optimizer_steps", self.optimizer_steps + 1))
        return optimizer

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Unsized() if self.unsized else make_data(SAMPLES), batch_size=BATCH)

    def val_dataloader(self) -> DataLoader | list:
        return DataLoader(make_data(32, seed=1), batch_size=BATCH) if self.with_val else []


# configuration -> (Trainer arguments, module arguments)
CONFIGURATIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "max_steps": ({"max_steps": 6}, {}),
    "max_epochs": ({"max_epochs": 2}, {}),
    "both": ({"max_epochs": 3, "max_steps": 5}, {}),
    "max_steps+limit_train_batches": ({"max_steps": 5, "limit_train_batches": 3}, {}),
    "max_steps+accumulate": ({"max_steps": 3, "accumulate_grad_batches": 2}, {}),
    "max_time": ({"max_time": {"seconds": 0.5}}, {}),
    "iterable+max_steps": ({"max_steps": 6}, {"unsized": True}),
    "val_check_interval": ({"max_epochs": 2, "val_check_interval": 0.5}, {"with_val": True}),
    "64-true": ({"max_steps": 5, "precision": "64-true"}, {}),
}

# Where the variant's default needs a length this configuration cannot tell: the option the error must name.
UNKNOWABLE: dict[tuple[str, str], str] = {
    ("bar", "max_time"): "total_steps",
    ("ssam-dst", "max_time"): "total_steps",
    ("ssam", "iterable+max_steps"): "mask_every",
    ("ssam-dst", "iterable+max_steps"): "mask_every",
    ("xsam", "iterable+max_steps"): "alpha_every",
}


def case_id(name: str, options: dict[str, Any]) -> str:
    return f"{name}-dst" if options.get("mask") == "dst" else name


def check_trained(trainer: L.Trainer, module: Counting, callback: SAMCallback) -> None:
    assert trainer.global_step > 0
    assert module.optimizer_steps == trainer.global_step
    assert callback.engine is not None and callback.engine.step_count == trainer.global_step
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
@pytest.mark.parametrize(("name", "options"), CASES, ids=[case_id(*case) for case in CASES])
def test_every_variant_under_every_trainer_configuration(name, options, configuration):
    trainer_args, module_args = CONFIGURATIONS[configuration]
    module = Counting(**module_args)
    callback = SAMCallback(variant=name, **options)
    trainer = quiet_trainer(callbacks=[callback], **trainer_args)
    option = UNKNOWABLE.get((case_id(name, options), configuration))
    if option is not None:
        with pytest.raises(ValueError, match=rf"^{name}: .*Pass {option}=") as error:
            trainer.fit(module)
        assert module.training_steps == 0, "the error must come before the first training_step"
        named = set(re.findall(r"(\w+)=", str(error.value))) - {"limit_train_batches", "mask"}  # Trainer hint
        assert named == {option}, str(error.value)  # this variant's option only, not a generic list
        return
    trainer.fit(module)
    check_trained(trainer, module, callback)
    expected = {
        "max_steps": 6,
        "max_epochs": 8,
        "both": 5,
        "max_steps+limit_train_batches": 5,
        "max_steps+accumulate": 3,
        "iterable+max_steps": 6,
        "val_check_interval": 8,
        "64-true": 5,
    }.get(configuration)
    if expected is not None:
        assert trainer.global_step == expected
    if configuration == "val_check_interval":
        assert module.validation_steps == 2 * 2 * 2  # 2 checks per epoch, 2 epochs, 2 batches each
    if configuration == "64-true":
        assert all(p.dtype == torch.float64 for p in module.parameters())


@pytest.mark.parametrize(("name", "options"), CASES, ids=[case_id(*case) for case in CASES])
def test_resume_from_a_mid_epoch_checkpoint(name, options, tmp_path):
    path = tmp_path / "mid.ckpt"
    module = Counting()
    first = SAMCallback(variant=name, **options)
    trainer = quiet_trainer(callbacks=[first], max_steps=3)  # epoch 0 has 4 steps: this stops mid-epoch
    trainer.fit(module)
    trainer.save_checkpoint(path)
    module = Counting()
    callback = SAMCallback(variant=name, **options)
    checkpoint = ModelCheckpoint(dirpath=tmp_path)  # Lightning asks for the callbacks that wrote the checkpoint
    trainer = quiet_trainer(callbacks=[callback, checkpoint], max_steps=7, enable_checkpointing=True)
    trainer.fit(module, ckpt_path=path)
    assert trainer.global_step == 7
    assert module.optimizer_steps == 4
    assert callback.engine is not None and callback.engine.step_count == 7  # the variant's schedule continued


def test_the_run_length_comes_from_the_loaded_dataloader():
    """max_steps alone: the epoch length is the dataloader's (after limit and accumulation), not Lightning's
    ``estimated_stepping_batches`` (which returns max_steps without loading the dataloader)."""
    callback = SAMCallback(variant="xsam")
    trainer = quiet_trainer(callbacks=[callback], max_steps=2, limit_train_batches=3, accumulate_grad_batches=2)
    trainer.fit(Counting())
    assert callback.engine.variant.alpha_every == 2  # ceil(3 / 2)
    callback = SAMCallback(variant="bar", **OPTIONS["bar"])
    trainer = quiet_trainer(callbacks=[callback], max_epochs=5, max_steps=7)
    trainer.fit(Counting())
    assert callback.engine.variant.total_steps == 7  # max_steps ends the run before 5 epochs of 4 steps
    callback = SAMCallback(variant="bar", **OPTIONS["bar"])
    trainer = quiet_trainer(callbacks=[callback], max_epochs=2, max_steps=100)
    trainer.fit(Counting())
    assert callback.engine.variant.total_steps == 8  # 2 epochs end it first


def test_explicit_options_make_an_unknown_length_trainable():
    module = Counting(unsized=True)
    callback = SAMCallback(variant="xsam", alpha_every=3)
    trainer = quiet_trainer(callbacks=[callback], max_steps=4)
    trainer.fit(module)
    check_trained(trainer, module, callback)
    module = Counting()
    callback = SAMCallback(variant="bar", total_steps=50, **OPTIONS["bar"])
    trainer = quiet_trainer(callbacks=[callback], max_time={"seconds": 0.3})
    trainer.fit(module)
    check_trained(trainer, module, callback)


# ---------------------------------------------------------------------------------------------- SAMMixin
class ManualCounting(SAMMixin, Counting):
    def __init__(self, variant: str, options: dict[str, Any], unsized: bool = False) -> None:
        super().__init__(unsized=unsized)
        self.automatic_optimization = False
        self.configure_sam(variant, **options)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.training_steps += 1
        x, y = batch
        return self.sam_step(
            lambda: F.cross_entropy(self.net(x), y),
            sample_loss_fn=lambda i, j: F.cross_entropy(self.net(x[i:j]), y[i:j]),
            batch_size=len(x),
        )


@pytest.mark.parametrize(("name", "options"), CASES, ids=[case_id(*case) for case in CASES])
def test_mixin_under_max_steps_alone(name, options):
    module = ManualCounting(name, options)
    trainer = quiet_trainer(max_steps=6)
    trainer.fit(module)
    assert trainer.global_step == 6 and module.optimizer_steps == 6
    assert module.sam_engine is not None and module.sam_engine.step_count == 6


def test_mixin_stops_before_training_when_the_epoch_length_is_unknown():
    module = ManualCounting("xsam", {}, unsized=True)
    with pytest.raises(ValueError, match=re.escape("Pass alpha_every=")):
        quiet_trainer(max_steps=4).fit(module)
    assert module.training_steps == 0
