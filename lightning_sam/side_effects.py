"""Make the extra forward passes of SAM invisible to the user's module.

Pass 2 (and any other extra forward: probes, Fisher passes) re-runs ``training_step`` at perturbed weights.
Everything that forward may change and the user can see is put back exactly as pass 1 left it:

* ``self.log`` / ``self.log_dict`` are no-ops (Lightning has no mute flag; otherwise the perturbed loss would
  overwrite the step's logs and corrupt epoch means);
* every torchmetrics ``Metric`` / ``MetricCollection`` in the module gets its state back (attribute bindings
  and tensor contents, so compute-group references stay shared);
* normalization layers with running statistics (BatchNorm, SyncBatchNorm, InstanceNorm with
  ``track_running_stats``) get their buffers back, ``num_batches_tracked`` included. The snapshot buffers are
  allocated once and reused.

:func:`in_second_pass` tells code inside ``training_step`` (random augmentation, counters, ...) that it runs
in such an extra pass.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

_IN_SECOND_PASS: contextvars.ContextVar[bool] = contextvars.ContextVar("lightning_sam_in_second_pass", default=False)


def in_second_pass() -> bool:
    """True while lightning_sam re-runs ``training_step`` at perturbed weights (pass 2, probes, Fisher passes).

    Use it to keep other side effects of ``training_step`` out of those passes, e.g.::

        if not lightning_sam.in_second_pass():
            self.samples_seen += len(batch)
    """
    return _IN_SECOND_PASS.get()


def _noop_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log`` / ``log_dict`` during extra passes."""


def _metric_types() -> tuple[type, ...]:
    try:
        from torchmetrics import Metric, MetricCollection
    except ImportError:  # torchmetrics is a dependency, but keep the guard usable without it
        return ()
    return (Metric, MetricCollection)


def _copy_value(value: Any) -> Any:
    """A snapshot of one metric attribute: tensor contents cloned, containers copied one level deep."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


class _MetricSnapshot:
    """The exact state of one Metric/MetricCollection: its attribute bindings and the data behind them."""

    _SKIP = frozenset({"_modules", "_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks"})

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.bindings = {k: v for k, v in module.__dict__.items() if k not in self._SKIP}
        self.data = {k: _copy_value(v) for k, v in self.bindings.items() if isinstance(v, (Tensor, list, dict))}

    @torch.no_grad()
    def restore(self) -> None:
        for key, original in self.data.items():
            obj = self.bindings[key]
            if isinstance(obj, Tensor):
                if obj.shape == original.shape and obj.dtype == original.dtype:
                    obj.copy_(original)
                else:  # resized in place (rare): rebind to the snapshot itself
                    self.bindings[key] = original
            elif isinstance(obj, list):
                obj[:] = original
            else:
                obj.clear()
                obj.update(original)
        current = self.module.__dict__
        for key in [k for k in current if k not in self._SKIP and k not in self.bindings]:
            del current[key]
        current.update(self.bindings)


class _NormBufferSnapshot:
    """Running statistics of every normalization layer, copied into buffers allocated once."""

    def __init__(self, module: nn.Module) -> None:
        self.live: list[Tensor] = [
            buffer
            for m in module.modules()
            if isinstance(m, _NormBase) and m.track_running_stats
            for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)
            if buffer is not None
        ]
        self.saved: list[Tensor] = [torch.empty_like(b) for b in self.live]

    @torch.no_grad()
    def save(self) -> None:
        if self.live:
            torch._foreach_copy_(self.saved, self.live)

    @torch.no_grad()
    def restore(self) -> None:
        if self.live:
            torch._foreach_copy_(self.live, self.saved)


class SecondPassGuard:
    """Context manager factory: ``with guard.active(): ...`` runs code without visible side effects.

    Build it once per module (it allocates the normalization-buffer snapshots once).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._norm = _NormBufferSnapshot(module)
        types = _metric_types()
        self._metrics = [m for m in module.modules() if types and isinstance(m, types)]

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        self._norm.save()
        metrics = [_MetricSnapshot(m) for m in self._metrics]
        try:
            yield
        finally:
            self._norm.restore()
            for snapshot in metrics:
                snapshot.restore()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Mute logging, restore metrics and norm buffers afterwards, and set :func:`in_second_pass`."""
        module = self.module
        had_log = "log" in module.__dict__
        had_log_dict = "log_dict" in module.__dict__
        token = _IN_SECOND_PASS.set(True)
        module.log = _noop_log  # type: ignore[method-assign]
        module.log_dict = _noop_log  # type: ignore[method-assign]
        try:
            with self._snapshot():
                yield
        finally:
            _IN_SECOND_PASS.reset(token)
            if not had_log:
                del module.log
            if not had_log_dict:
                del module.log_dict
