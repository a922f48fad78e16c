"""Run by tests/test_ddp.py as ``python tests/ddp_script.py MODE OUT_DIR``: 2-process DDP (gloo, CPU).

Each rank writes ``OUT_DIR/MODE_rank{r}.pt`` with its final weights, the number of gradient all-reduces its
counting comm hook saw, and the GradScaler scale history where one is used.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, os.path.dirname(__file__))

from conftest import Classifier, fixed_loader, make_mlp, quiet_trainer
from lightning.pytorch import Callback
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from script_exit import finish
from torch.nn import functional as F

from lightning_sam import SAMCallback, SAMMixin, in_second_pass

N_SAMPLES, BATCH_SIZE = 160, 16  # 80 samples per rank: 5 steps


class CountingState:
    def __init__(self) -> None:
        self.count = 0
        self.process_group = None


def counting_allreduce(state: CountingState, bucket):
    state.count += 1
    return default_hooks.allreduce_hook(state.process_group, bucket)


class RegisterCountingHook(Callback):
    """Lightning registers comm hooks on CUDA only; register the counting hook on the CPU DDP model here."""

    def __init__(self, state: CountingState) -> None:
        self.state = state

    def on_fit_start(self, trainer, pl_module):
        trainer.strategy.model.register_comm_hook(self.state, counting_allreduce)


class PoisonRankZero(Classifier):
    """Makes pass 1 of step 2 non-finite on rank 0 only (the DDP + GradScaler deadlock case)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if batch_idx == 2 and self.global_rank == 0 and not in_second_pass():
            loss = loss * float("inf")
        return loss


class ManualSAM(SAMMixin, Classifier):
    def __init__(self, net, sync_ascent: bool = False) -> None:
        super().__init__(net)
        self.automatic_optimization = False
        self.configure_sam("sam", sync_ascent=sync_ascent)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.sam_step(lambda: F.cross_entropy(self(x), y))


class ManualPoisonRankZero(ManualSAM):
    def training_step(self, batch, batch_idx):
        x, y = batch

        def loss_fn():
            loss = F.cross_entropy(self(x), y)
            if batch_idx == 2 and self.global_rank == 0 and not in_second_pass():
                loss = loss * float("inf")
            return loss

        return self.sam_step(loss_fn)


class ScaleRecorder(Callback):
    def __init__(self) -> None:
        self.scales: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.scales.append(trainer.precision_plugin.scaler.get_scale())


class SaveResult(Callback):
    """Each rank writes its result at the end of training (also inside ddp_spawn's worker processes)."""

    def __init__(self, out_dir: str, mode: str, state: CountingState, recorder: ScaleRecorder) -> None:
        self.out_dir, self.mode, self.state, self.recorder = out_dir, mode, state, recorder

    def on_train_end(self, trainer, pl_module):
        sam = next((c for c in trainer.callbacks if isinstance(c, SAMCallback)), None)
        dense_masks = getattr(sam.engine.variant, "dense_masks", None) if sam is not None else None
        result = {
            "masks": dense_masks() if dense_masks else None,
            "weights": {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()},
            "allreduce_count": self.state.count,
            "global_step": trainer.global_step,
            "scales": self.recorder.scales,
        }
        torch.save(result, os.path.join(self.out_dir, f"{self.mode}_rank{trainer.global_rank}.pt"))


def main(mode: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    state = CountingState()
    strategy = DDPStrategy(
        timeout=timedelta(seconds=60),
        find_unused_parameters=mode.endswith("unused"),
        start_method="spawn" if mode.endswith("spawn") else "popen",
    )
    callbacks: list[Callback] = [RegisterCountingHook(state)]
    plugins = []
    module_cls = Classifier
    if mode.startswith(("local", "fp16")):
        callbacks.append(SAMCallback("sam"))
    elif mode in ("fsam", "xsam"):
        callbacks.append(SAMCallback(mode))
    elif mode == "bar":  # the MLP's two weight matrices form a two-factor product W2 @ W1
        callbacks.append(SAMCallback("bar", pairs=[("net.0.weight", "net.2.weight")], total_steps=5))
    elif mode == "looksam":
        callbacks.append(SAMCallback("looksam", k=2))
    elif mode == "interval":
        callbacks.append(SAMCallback("sam", interval=2))
    elif mode == "fsam_ckpt":
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(SAMCallback("fsam"))
        callbacks.append(ModelCheckpoint(dirpath=out_dir, save_last=True, save_top_k=0))
    elif mode == "xsam_k2":
        callbacks.append(SAMCallback("xsam", steps=2, alpha_every=2))
    elif mode == "ssam_fisher":
        callbacks.append(SAMCallback("ssam", num_samples=24, mask_every=2, sparsity=0.7))
    elif mode == "ssam_dst":
        callbacks.append(SAMCallback("ssam", mask="dst", mask_every=2, sparsity=0.7))
    elif mode == "sync":
        callbacks.append(SAMCallback("sam", sync_ascent=True))
    recorder = ScaleRecorder()
    if mode.startswith("fp16"):
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        plugins.append(MixedPrecision("16-mixed", "cpu", scaler=scaler))
        callbacks.append(recorder)
        module_cls = PoisonRankZero
    callbacks.append(SaveResult(out_dir, mode, state, recorder))
    module = module_cls(make_mlp(), optimizer="adam_fused") if mode == "fp16_fused" else module_cls(make_mlp())
    if mode == "fp16_mixin":
        callbacks = [c for c in callbacks if not isinstance(c, SAMCallback)]
        module = ManualPoisonRankZero(make_mlp())
    if mode.startswith("mixin"):
        module = ManualSAM(make_mlp(), sync_ascent=mode == "mixin_sync")
    if mode == "mixin_fsam_ckpt":
        from lightning.pytorch.callbacks import ModelCheckpoint

        module.configure_sam("fsam")
        callbacks.append(ModelCheckpoint(dirpath=out_dir, save_last=True, save_top_k=0))
    trainer = quiet_trainer(
        enable_checkpointing=mode.endswith("fsam_ckpt"),
        max_epochs=1,
        devices=2,
        strategy=strategy,
        callbacks=callbacks,
        plugins=plugins,
        use_distributed_sampler=True,
        accumulate_grad_batches=2 if mode.endswith("accum") else 1,
    )
    trainer.fit(module, fixed_loader(n=N_SAMPLES, batch_size=BATCH_SIZE))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    finish()  # destroy the process group, exit without finalization (see script_exit)
