"""What both Lightning adapters are configured with: the variant and how SAM runs around it.

:class:`SAMSettings` is the one place these options are declared (typed, documented, validated at construction):
``SAMCallback`` inherits its signature (so LightningCLI configures it), and ``SAMMixin.configure_sam`` builds one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from lightning_sam import validation as check
from lightning_sam.params import check_filter
from lightning_sam.variants import Variant, resolve_variant


class SAMSettings:
    """The variant and the schedule of SAM's step, validated when built (never deep inside training).

    Args:
        variant: a name from :func:`lightning_sam.available_variants` (``"sam"``, ``"asam"``, ...), or a variant
            object such as ``SSAM(sparsity=0.5)`` (LightningCLI: ``class_path`` / ``init_args``).
        rho: neighbourhood radius; ``None`` takes the variant's default (SAM 0.05, ASAM 0.5). With a variant name
            only (a variant object carries its own).
        sync_ascent: under DDP, all-reduce pass 1 too (global-gradient SAM). Unset (``None``) or False under DDP:
            each rank ascends with its own gradient (the paper's m-sharpness; half the communication); pass 2 always
            all-reduces. Under ModelParallelStrategy pass 1 is always global (FSDP reduce-scatters every
            backward): leave it unset or True there.
        interval: run the variant's ascent and pass 2 on every ``interval``-th optimizer step only (default 1);
            the other steps are plain optimizer steps on ``g`` with no second forward/backward.
        params: which parameters are perturbed (and counted in the gradient norm): ``None`` (all trained ones),
            ``"norm"`` (normalization layers only: SAM-ON) or a callable ``(name, parameter) -> bool``.
        skip_nonfinite: skip the optimizer step (weights and optimizer state untouched, with a warning) when the
            loss at the perturbed weights is inf/NaN, which plain training would not meet at ``w``. Costs one host
            sync per SAM step (not under 16-mixed, whose GradScaler skips such steps itself); ``False`` removes the
            check and lets the non-finite gradient reach the optimizer, as plain Lightning does.
        **variant_options: the variant's options, named as on the variant's docs page (ASAM: ``eta``), with a
            variant name only.
    """

    def __init__(
        self,
        variant: Variant | str = "sam",
        rho: float | None = None,
        *,
        sync_ascent: bool | None = None,
        interval: int = 1,
        params: str | Callable[[str, Tensor], bool] | None = None,
        skip_nonfinite: bool = True,
        **variant_options: Any,
    ) -> None:
        super().__init__()
        self.spec: Variant = resolve_variant(variant, rho, **variant_options)
        self.interval = check.integer("", "interval", interval, 1, " (1 = SAM on every step)")
        check_filter(params)
        self.params = params
        self.sync_ascent = None if sync_ascent is None else check.flag("", "sync_ascent", sync_ascent)
        self.skip_nonfinite = check.flag("", "skip_nonfinite", skip_nonfinite)

    @property
    def variant(self) -> str:
        """The variant's name."""
        return self.spec.name

    @property
    def variant_options(self) -> dict[str, Any]:
        """The options given to the variant (``rho`` aside)."""
        return {k: v for k, v in self.spec.config.items() if k != "rho"}

    @property
    def engine_options(self) -> dict[str, Any]:
        """The keywords of :meth:`lightning_sam.SAMEngine.from_optimizer` these settings fix."""
        return {"select": self.params, "interval": self.interval}
