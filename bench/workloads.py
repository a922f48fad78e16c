"""Shared workloads of the bench/ scripts (a helper module, not a benchmark): models, synthetic batches, the
optimizer, the LightningModule and the Trainer every timing script uses.

Models (``MODELS``), all on synthetic tensors, 10 classes, cross-entropy, SGD (lr 0.01, momentum 0.9):

=========  ==========================================================================================
cnn        3 x (conv3x3 without bias + BatchNorm + ReLU), 16/32/64 channels, two max-pools, global pool,
           linear; 3x32x32 inputs, batch 64 (24k parameters in 11 tensors)
mlp        10 Linear layers of width 256 with ReLU, batch 128 (594k parameters in 20 tensors)
mlp48      48 x (Linear 128 + LayerNorm + GELU) + Linear 128 -> 10, batch 128: transformer-shaped, many small
           tensors (800k parameters in 194 tensors)
=========  ==========================================================================================

GPU-sized models (``LARGE_MODELS``, not in ``MODELS``: only the scripts that ask for them, e.g. ``bench/step_cost.py
--models resnet18,vit_s16``, see ``ALL_MODELS``), plain PyTorch (no torchvision, no download), 3x224x224 inputs,
batch 256 (one synthetic batch: 154 MB of float32 inputs):

=========  ==========================================================================================
resnet18   the standard ResNet-18 (7x7 stem conv + BN + ReLU + max-pool, 4 stages of 2 BasicBlocks, 64/128/256/
           512 channels, 1x1 conv + BN downsample, global average pool, linear head), 10 classes (11,181,642
           parameters in 62 tensors)
vit_s16    ViT-S/16 (16x16 stride-16 patch conv to dim 384, class token, learned position embedding, 12 pre-norm
           blocks of 6-head attention and a GELU MLP of ratio 4, final LayerNorm, linear head on the class token),
           10 classes (21,669,514 parameters in 152 tensors)
=========  ==========================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from lightning_sam import SAMEngine
from lightning_sam.batches import batchnorm_in_eval

LR = 0.01
NEVER = 10**9  # a refresh period longer than any run

# ---------------------------------------------------------------------------------------------------- models


@dataclass
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch: int
    classes: int = 10
    description: str = ""


def build_cnn() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 16),
        nn.MaxPool2d(2),  # 16x16
        *block(16, 32),
        nn.MaxPool2d(2),  # 8x8
        *block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def build_mlp(depth: int = 10, width: int = 256) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def build_mlp_ln(depth: int = 48, width: int = 128) -> nn.Module:
    """``depth`` x (Linear + LayerNorm + GELU) and a linear head: 4 * depth + 2 parameter tensors."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet's BasicBlock: two conv3x3 + BN, the shortcut a 1x1 conv + BN where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def build_resnet18(classes: int = 10) -> nn.Module:
    """ResNet-18 (torchvision's layout and initialization, written out): 62 parameter tensors."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
    ]
    cin = 64
    for i, cout in enumerate((64, 128, 256, 512)):
        stride = 1 if i == 0 else 2
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


class Attention(nn.Module):
    """Multi-head self-attention: one qkv Linear, ``F.scaled_dot_product_attention``, an output Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) (Linear, GELU, Linear)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer: patch conv, class token, learned position embedding, pre-norm blocks, LN, linear head."""

    def __init__(
        self,
        image: int = 224,
        patch: int = 16,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: int = 4,
        classes: int = 10,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (b, patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def build_vit_s16() -> nn.Module:
    """ViT-S/16: dim 384, depth 12, 6 heads, MLP ratio 4, 224x224 inputs (197 tokens): 152 parameter tensors."""
    return ViT()


MODELS = {
    "cnn": ModelSpec(
        "cnn", build_cnn, (3, 32, 32), 64, description="3x(conv3x3+BN+ReLU) 16/32/64 ch + linear, 3x32x32, batch 64"
    ),
    "mlp": ModelSpec("mlp", build_mlp, (256,), 128, description="10 Linear layers, width 256, ReLU, batch 128"),
    "mlp48": ModelSpec(
        "mlp48", build_mlp_ln, (128,), 128, description="48 x (Linear 128 + LayerNorm + GELU) + linear, batch 128"
    ),
}
LARGE_MODELS = {  # GPU-sized (see the module doc): not in MODELS, so no script lists them unless it asks
    "resnet18": ModelSpec(
        "resnet18", build_resnet18, (3, 224, 224), 256, description="ResNet-18, 3x224x224, batch 256 (62 tensors)"
    ),
    "vit_s16": ModelSpec(
        "vit_s16", build_vit_s16, (3, 224, 224), 256, description="ViT-S/16, 3x224x224, batch 256 (152 tensors)"
    ),
}
ALL_MODELS = {**MODELS, **LARGE_MODELS}


def make_model(spec: ModelSpec, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return spec.build().to(device)


def make_batches(spec: ModelSpec, device: torch.device, n: int) -> list[tuple[Tensor, Tensor]]:
    """``n`` distinct synthetic batches (seeded: the same for every method), built on the CPU and moved to ``device``.

    Each holds ``spec.batch * prod(spec.input_shape)`` float32 inputs: 154 MB for a ``LARGE_MODELS`` batch of 256
    3x224x224 images, about 0.5 s to draw on one thread. The scripts that take those models build one batch
    (:func:`make_batch`) and repeat it.
    """
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(spec.batch, *spec.input_shape, generator=generator)
        y = torch.randint(0, spec.classes, (spec.batch,), generator=generator)
        out.append((x.to(device), y.to(device)))
    return out


def make_batch(spec: ModelSpec, device: torch.device) -> tuple[Tensor, Tensor]:
    return make_batches(spec, device, 1)[0]


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def param_megabytes(model: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def param_count(spec: ModelSpec) -> int:
    return sum(p.numel() for p in spec.build().parameters())


def tensor_count(spec: ModelSpec) -> int:
    return sum(1 for _ in spec.build().parameters())


# ---------------------------------------------------------------------------------------------------- SSAM


def build_fisher_mask(engine: SAMEngine, model: nn.Module, batch: tuple[Tensor, Tensor]) -> int:
    """Feed SSAM's Fisher from ``batch`` (repeatedly if it is smaller than ``num_samples``) until the mask exists.

    Runs as the callback's Fisher passes do (BatchNorm on its running statistics). Returns the passes made.
    """
    x, y = batch
    calls = 0
    with batchnorm_in_eval(model):
        while not engine.needs_second_pass():  # (at step 0 a finished refresh would start the next one)
            if not engine.collect_samples(lambda i, j: F.cross_entropy(model(x[i:j]), y[i:j]), x.shape[0]):
                raise RuntimeError("the Fisher mask was not built")
            calls += 1
    return calls


# ---------------------------------------------------------------------------------------------------- Lightning


class BenchModule(L.LightningModule):
    """The same network as a LightningModule: nothing but training_step and configure_optimizers."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters())


class Batches(Dataset):
    """Pre-built batches (used with ``batch_size=None``: no collation)."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.batches[index]


class SameBatch(Batches):
    """``n`` copies of one pre-built batch."""

    def __init__(self, batch: tuple[Tensor, Tensor], n: int) -> None:
        super().__init__([batch] * n)


def make_trainer(
    device: torch.device, steps: int, callbacks: list[Callback], max_epochs: int = 1, **options: Any
) -> L.Trainer:
    """A Trainer with nothing but the loop: no logger, checkpointing, progress bar, summary or sanity check.

    ``steps``: ``max_steps`` (-1: run ``max_epochs`` whole epochs). ``options``: more Trainer arguments.
    """
    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index] if device.type == "cuda" and device.index is not None else 1,
        max_epochs=max_epochs,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **options,
    )
