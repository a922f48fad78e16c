"""lightning_sam: Sharpness-Aware Minimization and its variants as a one-line addition to PyTorch Lightning."""

from lightning_sam.callback import SAMCallback
from lightning_sam.engine import SAMEngine
from lightning_sam.mixin import SAMMixin
from lightning_sam.side_effects import SecondPassGuard, in_second_pass
from lightning_sam.variants import available_variants

__all__ = ["SAMCallback", "SAMEngine", "SAMMixin", "SecondPassGuard", "available_variants", "in_second_pass"]
__version__ = "0.1.0"
