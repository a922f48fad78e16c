"""torch.compile (backend "aot_eager", CPU) with SAMCallback: same weights as eager SAM, no recompilation per step.

Compilations are counted as graphs handed to the backend (``CompileCounterWithBackend.frame_count``), recorded after
every optimizer step. Three ways of compiling are covered (docs/compile.md):

* the inner network: ``module.net = torch.compile(module.net)``;
* the whole LightningModule: ``trainer.fit(torch.compile(module))`` (Lightning compiles ``forward`` and
  ``training_step``); ``self.log`` inside that ``training_step`` fails in Lightning 2.6.6 + torch 2.13 with or
  without SAM, so the module here logs through a ``torch.compiler.disable``-d helper;
* ``training_step`` decorated with ``@torch.compile`` and calling ``self.log``: SAM's muting of ``self.log`` in
  pass 2 (an instance attribute) fails a Dynamo guard once, i.e. costs exactly one extra compilation.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from conftest import Classifier, fixed_loader, make_mlp, quiet_trainer
from lightning.pytorch import Callback
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn import functional as F

from lightning_sam import SAMCallback

EPOCHS, STEPS_PER_EPOCH = 3, 4


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CompileRecorder(Callback):
    """The number of graphs compiled so far, after every optimizer step."""

    def __init__(self, counter: CompileCounterWithBackend) -> None:
        self.counter = counter
        self.seen: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(int(self.counter.frame_count))


def fit(model, sam: bool, counter: CompileCounterWithBackend | None = None):
    """Fit 3 epochs of 4 equal-sized batches (no shape change, so no shape recompiles); returns (trainer, counts)."""
    callbacks: list[Callback] = [SAMCallback("sam", rho=0.05)] if sam else []
    recorder = CompileRecorder(counter) if counter is not None else None
    if recorder is not None:
        callbacks.append(recorder)
    trainer = quiet_trainer(max_epochs=EPOCHS, callbacks=callbacks)
    trainer.fit(model, fixed_loader(n=16 * STEPS_PER_EPOCH, batch_size=16))
    assert trainer.global_step == EPOCHS * STEPS_PER_EPOCH
    return trainer, (recorder.seen if recorder is not None else None)


def assert_same_training(compiled_net, compiled_trainer, eager_net, eager_trainer):
    """Weights (and BatchNorm buffers) within 1e-6 of eager SAM (measured: bit-identical), and the same logs."""
    for (name, p), q in zip(compiled_net.state_dict().items(), eager_net.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    logged, expected = compiled_trainer.callback_metrics, eager_trainer.callback_metrics
    assert set(logged) == set(expected)
    for name, value in expected.items():  # pass 2 was muted under compile too: the logs are pass 1's
        torch.testing.assert_close(logged[name], value, atol=1e-6, rtol=0, msg=name)


def eager_sam(module):
    module = copy.deepcopy(module)
    trainer, _ = fit(module, sam=True)
    return module, trainer


class LogsOutsideTheGraph(Classifier):
    """Logs through a helper that Dynamo does not trace (see the module docstring)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self._log_loss(loss)
        return loss

    @torch.compiler.disable
    def _log_loss(self, loss):
        self.log("train_loss", loss, on_step=True, on_epoch=True)


def compiled_step_class(counter: CompileCounterWithBackend) -> type[Classifier]:
    """A module whose ``training_step`` is compiled as a method (a fresh class per test: its own Dynamo cache)."""

    class CompiledStep(Classifier):
        @torch.compile(backend=counter)
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            return loss

    return CompiledStep


@pytest.mark.parametrize("batchnorm", [False, True])
def test_compiled_inner_net_matches_eager_and_compiles_once(batchnorm):
    module = Classifier(make_mlp(batchnorm=batchnorm))  # training_step calls self.log, eagerly
    eager, eager_trainer = eager_sam(module)
    counter = CompileCounterWithBackend("aot_eager")
    module.net = torch.compile(module.net, backend=counter)
    trainer, seen = fit(module, sam=True, counter=counter)
    # one graph, compiled in pass 1 of the first step and reused by every pass 2 and every later step
    assert seen == [1] * (EPOCHS * STEPS_PER_EPOCH)
    assert_same_training(module.net._orig_mod, trainer, eager.net, eager_trainer)


def test_compiled_lightning_module_matches_eager_and_sam_adds_no_compilation():
    module = LogsOutsideTheGraph(make_mlp(batchnorm=True))
    eager, eager_trainer = eager_sam(module)
    plain_counter, sam_counter = CompileCounterWithBackend("aot_eager"), CompileCounterWithBackend("aot_eager")
    _, plain_seen = fit(torch.compile(copy.deepcopy(module), backend=plain_counter), sam=False, counter=plain_counter)
    trainer, sam_seen = fit(torch.compile(module, backend=sam_counter), sam=True, counter=sam_counter)
    assert sam_seen[0] >= 1  # it did compile
    assert sam_seen == plain_seen  # the callback costs no compilation at all
    assert len(set(sam_seen)) == 1  # all compiled in the first step, nothing after
    assert_same_training(module.net, trainer, eager.net, eager_trainer)


def test_compiled_training_step_with_self_log_costs_one_recompilation():
    module = Classifier(make_mlp())
    eager, eager_trainer = eager_sam(module)  # Classifier logs "train_loss" the same way
    plain_counter, sam_counter = CompileCounterWithBackend("aot_eager"), CompileCounterWithBackend("aot_eager")
    plain = compiled_step_class(plain_counter)(copy.deepcopy(module.net))
    _, plain_seen = fit(plain, sam=False, counter=plain_counter)
    compiled = compiled_step_class(sam_counter)(copy.deepcopy(module.net))
    trainer, sam_seen = fit(compiled, sam=True, counter=sam_counter)
    # Lightning's own self.log recompiles in the first steps of the first two epochs (its logger state). With SAM,
    # pass 2 of step 1 recompiles training_step once for the muted self.log (guard: not ___dict_contains('log',
    # self.__dict__)), and that second graph serves every later pass 2; the SAM epoch means logged at the end of
    # epoch 1 change the logger state once more (one recompile in the second step of epoch 2), then no more.
    second = STEPS_PER_EPOCH + 1
    assert sam_seen[:second] == [count + 1 for count in plain_seen[:second]]
    assert sam_seen[second:] == [count + 2 for count in plain_seen[second:]]
    last_epoch = sam_seen[-STEPS_PER_EPOCH:]
    assert last_epoch == [sam_seen[STEPS_PER_EPOCH + 1]] * STEPS_PER_EPOCH  # constant from then on: no per-step cost
    assert_same_training(compiled.net, trainer, eager.net, eager_trainer)
