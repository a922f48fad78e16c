"""BAR (variant="bar"): SAMEngine, SAMCallback and SAMMixin against the plain reference (nBAR and oBAR, each
schedule, AdamW + LR schedulers), balancedness on a matrix factorization, pair discovery (peft LoRA names, explicit,
callable), zero-gradient pairs, exact resume, 16-mixed skipped steps, logging, state and bad input."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from conftest import Classifier, fixed_loader, quiet_trainer
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from reference import balancedness, bar_alpha, reference_bar_rescale, reference_bar_run
from torch import nn
from torch.nn import functional as F

from lightning_sam import SAMCallback, SAMEngine, SAMMixin
from lightning_sam.sharding import ShardedReduction
from lightning_sam.variants import available_variants, make_variant, variant_options
from lightning_sam.variants.bar import peft_lora_pairs

CONFIGS = [
    pytest.param({}, id="nbar-linear"),
    pytest.param({"schedule": "cosine", "mu0": 2.0}, id="nbar-cosine"),
    pytest.param({"schedule": "constant", "mu0": 0.5}, id="nbar-constant"),
    pytest.param({"rule": "obar"}, id="obar-linear"),
    pytest.param({"rule": "obar", "schedule": "cosine", "mu0": 2.0}, id="obar-cosine"),
    pytest.param({"rule": "obar", "schedule": "constant"}, id="obar-constant"),
]


# ---------------------------------------------------------------------------------------------- a two-factor model
class LoRALinear(nn.Module):
    """A Linear with peft-style LoRA factors: ``lora_A.<adapter>.weight`` / ``lora_B.<adapter>.weight``."""

    def __init__(self, features: int, out: int, r: int, adapters: tuple[str, ...]) -> None:
        super().__init__()
        self.base = nn.Linear(features, out)
        self.lora_A = nn.ModuleDict({a: nn.Linear(features, r, bias=False) for a in adapters})
        self.lora_B = nn.ModuleDict({a: nn.Linear(r, out, bias=False) for a in adapters})
        for b in self.lora_B.values():
            nn.init.normal_(b.weight, std=0.3)  # not peft's zero init: both factors get gradients from step 0
        self.gates = dict.fromkeys(adapters, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for name, gate in self.gates.items():
            if gate is not None:
                out = out + gate * self.lora_B[name](self.lora_A[name](x))
        return out


class Mix(nn.Module):
    """A two-factor residual with peft's Embedding-LoRA names: ``lora_embedding_A.<adapter>`` (ParameterDict)."""

    def __init__(self, width: int, r: int) -> None:
        super().__init__()
        self.lora_embedding_A = nn.ParameterDict({"default": nn.Parameter(torch.randn(r, width) * 0.5)})
        self.lora_embedding_B = nn.ParameterDict({"default": nn.Parameter(torch.randn(width, r) * 0.2)})

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + h @ self.lora_embedding_A["default"].T @ self.lora_embedding_B["default"].T


class TwoFactorNet(nn.Module):
    def __init__(self, features: int = 8, hidden: int = 16, classes: int = 3, r: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layer = LoRALinear(features, hidden, r, ("default", "other"))
        self.mix = Mix(hidden, r)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(torch.tanh(self.layer(x))))


PAIRS = [
    ("layer.lora_A.default.weight", "layer.lora_B.default.weight"),
    ("layer.lora_A.other.weight", "layer.lora_B.other.weight"),
    ("mix.lora_embedding_A.default", "mix.lora_embedding_B.default"),
]


def bar_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with two param groups: the "other" adapter at twice the lr (so ``c`` differs between pairs)."""
    other = [p for n, p in model.named_parameters() if ".other." in n]
    rest = [p for n, p in model.named_parameters() if ".other." not in n]
    return torch.optim.AdamW([{"params": rest}, {"params": other, "lr": 0.02}], lr=0.01, weight_decay=0.01)


def bar_scheduler(optimizer: torch.optim.Optimizer, kind: str = "step"):
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 / (1.0 + 0.3 * t))


def reference_run(net, batches, epochs, total_steps, scheduler="step", **options):
    net = copy.deepcopy(net)
    optimizer = bar_optimizer(net)
    decisions = reference_bar_run(
        net, batches, optimizer, bar_scheduler(optimizer, scheduler), PAIRS, total_steps, epochs=epochs, **options
    )
    return net, decisions


def plain_run(net, batches, epochs, scheduler="step"):
    return reference_run(net, batches, epochs, 1, scheduler, mu0=0.0)[0]


def assert_close_nets(actual: nn.Module, expected: nn.Module, atol: float = 1e-6) -> None:
    for (name, p), q in zip(actual.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=name)


def pair_diff(a: nn.Module, b: nn.Module) -> float:
    named_a, named_b = dict(a.named_parameters()), dict(b.named_parameters())
    return max((named_a[n] - named_b[n]).abs().max().item() for pair in PAIRS for n in pair)


class ScheduledClassifier(Classifier):
    def __init__(self, net: nn.Module, scheduler: str = "step") -> None:
        super().__init__(net)
        self.scheduler_kind = scheduler
        self.training_steps = 0

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        optimizer = bar_optimizer(self)
        scheduler = bar_scheduler(optimizer, self.scheduler_kind)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ---------------------------------------------------------------------------------------------- the rule
def test_reference_schedules():
    assert bar_alpha(0, 10) == 1.0 and bar_alpha(5, 10) == 0.5 and bar_alpha(12, 10) == 0.0
    assert bar_alpha(5, 10, 2.0, "cosine") == pytest.approx(1.0) and bar_alpha(10, 10, 2.0, "cosine") == 0.0
    assert bar_alpha(7, None, 0.5, "constant") == 0.5
    variant = make_variant("bar", mu0=2.0, schedule="cosine", total_steps=10)
    assert [variant.alpha(t) for t in range(12)] == [bar_alpha(t, 10, 2.0, "cosine") for t in range(12)]


@pytest.mark.parametrize("options", CONFIGS)
@pytest.mark.parametrize("use_closure", [False, True])
def test_engine_matches_reference(options, use_closure):
    batches = list(fixed_loader(n=96, batch_size=16))  # 6 steps, twice
    net = TwoFactorNet()
    expected, decisions = reference_run(net, batches, epochs=2, total_steps=12, **options)
    optimizer = bar_optimizer(net)
    scheduler = bar_scheduler(optimizer)
    engine = SAMEngine.from_optimizer(optimizer, net, "bar", total_steps=12, **options)
    assert sorted(engine.variant.found_pairs) == PAIRS
    for x, y in batches * 2:
        if use_closure:

            def closure(x=x, y=y):
                optimizer.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                return loss

            engine.step(closure, optimizer)
        else:
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            engine.plain_step()
            engine.before_optimizer_step(optimizer)
            optimizer.step()
        scheduler.step()
    assert engine.step_count == 12 and engine.variant.steps == 12
    assert_close_nets(net, expected)
    assert pair_diff(net, plain_run(TwoFactorNet(), batches, 2)) > 1e-3  # BAR did something: the test can fail
    assert {"A up", "A down"} <= set(decisions)  # both branches of the rule were taken


@pytest.mark.parametrize("options", CONFIGS)
@pytest.mark.parametrize("scheduler", ["step", "lambda"])
def test_callback_matches_reference(options, scheduler):
    net = TwoFactorNet()
    loader = fixed_loader(n=96, batch_size=16)
    expected, _ = reference_run(net, list(loader), epochs=2, total_steps=12, scheduler=scheduler, **options)
    module = ScheduledClassifier(copy.deepcopy(net), scheduler)
    callback = SAMCallback("bar", **options)
    trainer = quiet_trainer(max_epochs=2, callbacks=[callback])
    trainer.fit(module, loader)
    assert trainer.global_step == 12 and callback.engine.variant.steps == 12
    assert module.training_steps == 12  # no second pass, ever
    if options.get("schedule") != "constant":
        assert callback.engine.variant.total_steps == 12  # T from the Trainer's estimated stepping batches
    assert sorted(callback.engine.variant.found_pairs) == [(f"net.{a}", f"net.{b}") for a, b in PAIRS]
    assert_close_nets(module.net, expected)


class ManualBAR(SAMMixin, ScheduledClassifier):
    def __init__(self, net, **options):
        super().__init__(net)
        self.automatic_optimization = False
        self.configure_sam("bar", **options)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.sam_step(lambda: F.cross_entropy(self(x), y))
        self.lr_schedulers().step()
        return loss


@pytest.mark.parametrize("options", [{}, {"rule": "obar", "schedule": "cosine"}], ids=["nbar", "obar"])
def test_mixin_matches_reference(options):
    net = TwoFactorNet()
    loader = fixed_loader(n=96, batch_size=16)
    expected, _ = reference_run(net, list(loader), epochs=1, total_steps=6, **options)
    module = ManualBAR(copy.deepcopy(net), **options)
    quiet_trainer(max_epochs=1).fit(module, loader)
    assert module.sam_engine.variant.steps == 6 and module.sam_engine.variant.total_steps == 6
    assert_close_nets(module.net, expected)


# ---------------------------------------------------------------------------------------------- balancedness
def factorization(bar: bool, steps: int = 300, **options):
    """min ||B A X - W X||² from an unbalanced start (||A|| >> ||B||), plain SGD; balancedness per step."""
    generator = torch.Generator().manual_seed(0)
    d, r, n = 10, 4, 64
    x = torch.randn(d, n, generator=generator)
    y = (torch.randn(d, d, generator=generator) / math.sqrt(d)) @ x
    a = torch.randn(r, d, generator=generator).requires_grad_()
    b = (0.1 * torch.randn(d, r, generator=generator)).requires_grad_()
    optimizer = torch.optim.SGD([a, b], lr=0.01)
    engine = SAMEngine([("A", a), ("B", b)], "bar", pairs=[(a, b)], total_steps=steps, **options) if bar else None
    history, losses = [balancedness([(a, b)])[0]], []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((b @ a @ x - y) ** 2).mean()
        loss.backward()
        if engine is not None:
            engine.plain_step()
            engine.before_optimizer_step(optimizer)
        optimizer.step()
        history.append(balancedness([(a, b)])[0])
        losses.append(loss.item())
    return history, losses


@pytest.mark.parametrize("options", [{}, {"rule": "obar"}, {"schedule": "constant"}], ids=["nbar", "obar", "const"])
def test_bar_drives_balancedness_to_zero_plain_training_keeps_it(options):
    plain, plain_losses = factorization(bar=False)
    bar, bar_losses = factorization(bar=True, mu0=2.0, **options)
    assert plain[0] == bar[0] > 15
    assert abs(plain[-1] - plain[0]) < 0.01 * plain[0]  # gradient flow conserves ||A||² - ||B||²
    assert bar[-1] < 0.2 * bar[0]  # BAR drives it toward 0
    assert bar_losses[-1] < 0.5 * bar_losses[0] and plain_losses[-1] < 0.5 * plain_losses[0]  # both still learn


def test_logged_balancedness_matches_the_pairs_on_lightnings_cadence():
    net = TwoFactorNet()
    module = ScheduledClassifier(net)
    callback = SAMCallback("bar")
    calls = []

    class Spy(Callback):
        def on_fit_start(self, trainer, pl_module):
            metrics = callback.engine.variant.metrics

            def counted():
                calls.append(trainer.global_step)
                return metrics()

            callback.engine.variant.metrics = counted

    trainer = quiet_trainer(max_epochs=1, callbacks=[callback, Spy()], log_every_n_steps=2)
    trainer.fit(module, fixed_loader(n=128, batch_size=16))
    assert calls == [1, 3, 5, 7]  # every log_every_n_steps (global_step before the step), not every step
    named = dict(module.named_parameters())
    expected = balancedness([(named[a], named[b]) for a, b in callback.engine.variant.found_pairs])
    values = callback.engine.variant.metrics()
    torch.testing.assert_close(values["sam/balancedness_mean"], torch.tensor(sum(expected) / 3), rtol=1e-5, atol=0)
    torch.testing.assert_close(values["sam/balancedness_max"], torch.tensor(max(expected)), rtol=1e-5, atol=0)
    assert {"sam/balancedness_mean_step", "sam/balancedness_max_epoch"} <= set(trainer.callback_metrics)


# ---------------------------------------------------------------------------------------------- pairs
@pytest.mark.parametrize("rule", ["nbar", "obar"])
def test_pairs_with_zero_or_no_gradients_are_left_alone(rule):
    net = TwoFactorNet()
    net.layer.gates["other"] = 0.0  # in the graph: both gradients exactly zero
    optimizer = bar_optimizer(net)
    engine = SAMEngine.from_optimizer(optimizer, net, "bar", rule=rule, schedule="constant", mu0=5.0)
    x, y = next(iter(fixed_loader()))
    for step in range(2):
        if step == 1:
            net.layer.gates["default"] = None  # not in the graph: no gradients at all
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        named = dict(net.named_parameters())
        before = {n: p.detach().clone() for n, p in named.items()}
        engine.plain_step()
        engine.before_optimizer_step(optimizer)
        assert named["layer.lora_A.other.weight"].grad.abs().max() == 0
        for name in ("layer.lora_A.other.weight", "layer.lora_B.other.weight"):
            assert torch.equal(named[name], before[name]), name
        if step == 1:
            assert named["layer.lora_A.default.weight"].grad is None
            for name in PAIRS[0]:
                assert torch.equal(named[name], before[name]), name
        for name in PAIRS[2]:  # the live pair was rescaled
            assert not torch.equal(named[name], before[name]), name
        for name in ("layer.base.weight", "head.weight"):  # other parameters: untouched before the step
            assert torch.equal(named[name], before[name])
        optimizer.step()


def test_explicit_pairs_as_tensors_names_or_a_callable():
    net = TwoFactorNet()
    named = dict(net.named_parameters())
    as_tensors = [(named[a], named[b]) for a, b in PAIRS[:2]]
    engine = SAMEngine(net.named_parameters(), "bar", schedule="constant", pairs=as_tensors)
    assert engine.variant.found_pairs == PAIRS[:2]
    engine = SAMEngine(net.named_parameters(), "bar", schedule="constant", pairs=[list(PAIRS[2])])
    assert engine.variant.found_pairs == [PAIRS[2]]
    seen = {}

    def choose(names, params):
        seen["names"], seen["params"] = names, params
        return [("head.weight", "layer.base.weight")]  # any two-factor layer, e.g. a plain W2 @ W1

    engine = SAMEngine(net.named_parameters(), "bar", schedule="constant", pairs=choose)
    assert engine.variant.found_pairs == [("head.weight", "layer.base.weight")]
    assert seen["names"] == list(named) and all(p is q for p, q in zip(seen["params"], named.values()))
    assert "1 pairs: (head.weight, layer.base.weight)" in engine.variant.setup_message


def test_explicit_pairs_rescale_like_the_reference():
    net = TwoFactorNet()
    twin = copy.deepcopy(net)
    x, y = next(iter(fixed_loader()))
    for model in (net, twin):
        F.cross_entropy(model(x), y).backward()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    pairs = [(net.head.weight, net.layer.base.weight)]
    engine = SAMEngine.from_optimizer(optimizer, net, "bar", schedule="constant", mu0=2.0, pairs=pairs)
    engine.plain_step()
    engine.before_optimizer_step(optimizer)
    reference_bar_rescale([(twin.head.weight, twin.layer.base.weight)], [0.1], 0, None, 2.0, "constant")
    assert_close_nets(net, twin, atol=1e-7)
    assert not torch.equal(net.head.weight, twin.head.weight - twin.head.weight.grad)  # sanity: it is not a step


def test_no_pairs_and_bad_pairs_raise_clearly():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no \(A, B\) pairs found .* pass pairs=\[\(A, B\), \.\.\.\]"):
        SAMEngine(mlp.named_parameters(), "bar", schedule="constant")
    net = TwoFactorNet()
    stranger = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="not among the trained parameters"):
        SAMEngine(net.named_parameters(), "bar", schedule="constant", pairs=[(stranger, net.head.weight)])
    with pytest.raises(ValueError, match="not among the trained parameters"):
        SAMEngine(net.named_parameters(), "bar", schedule="constant", pairs=[("nope", "head.weight")])
    with pytest.raises(ValueError, match="more than one pair"):
        SAMEngine(net.named_parameters(), "bar", schedule="constant", pairs=[PAIRS[0], (PAIRS[0][0], "head.weight")])
    with pytest.raises(ValueError, match="must return"):
        SAMEngine(net.named_parameters(), "bar", schedule="constant", pairs=lambda n, p: [("head.weight",)])
    with pytest.raises(ValueError, match="needs total_steps"):
        SAMEngine(net.named_parameters(), "bar")  # linear schedule without T
    with pytest.raises(ValueError, match=r"no \(A, B\) pairs"):  # the callback raises at setup
        quiet_trainer(max_epochs=1, callbacks=[SAMCallback("bar")]).fit(Classifier(mlp), fixed_loader(features=4))


def test_name_discovery_needs_both_factors():
    names = [
        "m.q.lora_A.default.weight",
        "m.q.lora_B.default.weight",
        "m.q.lora_A.x.weight",  # its B is not trained
        "m.q.lora_B.default.bias",  # lora_bias: not a factor
        "lora_A.a.weight",
        "lora_B.a.weight",
        "emb.lora_embedding_A.default",
        "emb.lora_embedding_B.default",
        "emb.lora_embedding_A.default.extra",
    ]
    assert peft_lora_pairs(names) == [
        ("m.q.lora_A.default.weight", "m.q.lora_B.default.weight"),
        ("lora_A.a.weight", "lora_B.a.weight"),
        ("emb.lora_embedding_A.default", "emb.lora_embedding_B.default"),
    ]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(tokens).transpose(1, 2)).transpose(1, 2)
        return self.fc(torch.tanh(h).mean(1))


def expected_pairs(model: nn.Module) -> list[tuple[str, str]]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return [
        (n, n.replace("lora_A.", "lora_B.").replace("lora_embedding_A.", "lora_embedding_B."))
        for n in names
        if ".lora_A." in n or ".lora_embedding_A." in n
    ]


def two_adapters(model: nn.Module, first: list[str], second: list[str]):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=first, init_lora_weights=False))
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=second, init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])  # both adapters active and trained
    return model


def test_peft_discovery_linear_conv_embedding_two_adapters_and_one_step_matches_reference():
    model = two_adapters(Tiny(), ["emb", "conv", "fc"], ["conv", "fc"])
    pairs = expected_pairs(model)
    assert len(pairs) == 5 and sum("lora_embedding_A" in a for a, _ in pairs) == 1
    assert sum(".conv." in a for a, _ in pairs) == 2
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for _, p in trained], lr=0.05)
    engine = SAMEngine.from_optimizer(optimizer, model, "bar", total_steps=10)
    assert sorted(engine.variant.found_pairs) == sorted(pairs)
    twin = copy.deepcopy(model)
    tokens = torch.randint(0, 20, (4, 6))
    labels = torch.tensor([0, 1, 2, 0])
    for m in (model, twin):
        F.cross_entropy(m(tokens), labels).backward()
    named_twin = dict(twin.named_parameters())
    found = engine.variant.found_pairs
    engine.plain_step()
    engine.before_optimizer_step(optimizer)
    decisions = reference_bar_rescale([(named_twin[a], named_twin[b]) for a, b in found], [0.05] * 5, 0, 10)
    assert "alone" not in decisions
    assert_close_nets(model, twin, atol=1e-7)


def test_peft_discovery_on_a_transformer_with_embedding_lora():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = two_adapters(
        transformers.BertForSequenceClassification(config), ["query", "value", "word_embeddings"], ["key", "dense"]
    )
    pairs = expected_pairs(model)
    assert len(pairs) == 2 * 2 + 1 + 2 * (1 + 3) + 1  # q, v per layer; embedding; key + 3 dense per layer; pooler
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    engine = SAMEngine([(n, p) for n, p in model.named_parameters() if p.requires_grad], "bar", total_steps=5)
    assert sorted(engine.variant.found_pairs) == sorted(pairs)
    assert {n for pair in pairs for n in pair} <= set(names)


# ---------------------------------------------------------------------------------------------- 16-mixed
class Poisoned(ScheduledClassifier):
    """Multiplies the loss by inf at the listed batch indices (GradScaler skips those steps)."""

    def __init__(self, net, poison=()):
        super().__init__(net)
        self.poison = set(poison)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx in self.poison else loss


class Recorder(Callback):
    def __init__(self, sam: SAMCallback) -> None:
        self.sam = sam
        self.states: list[tuple[int, list[torch.Tensor]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        weights = [p.detach().clone() for p in pl_module.parameters()]
        self.states.append((self.sam.engine.variant.steps, weights))


def fp16_run(net, mu0=1.0, poison=(2,)):
    module = Poisoned(copy.deepcopy(net), poison=poison)
    sam = SAMCallback("bar", mu0=mu0, schedule="constant")
    recorder = Recorder(sam)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    trainer = quiet_trainer(
        max_epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], callbacks=[sam, recorder]
    )
    trainer.fit(module, fixed_loader(n=96, batch_size=16))
    return module, recorder.states, scaler


def test_fp16_mixed_skipped_step_skips_the_rescaling_and_still_advances_t():
    net = TwoFactorNet()
    module, states, scaler = fp16_run(net)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert scaler.get_scale() == 128.0  # the poisoned step was skipped (the scale halved once)
    steps, weights = zip(*states)
    assert steps == (1, 2, 3, 4, 5, 6)  # the skipped step advanced t (no host sync to learn it was skipped)
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))  # no rescaling, no optimizer step
    assert any(not torch.equal(a, b) for a, b in zip(weights[2], weights[3]))  # it trains again afterwards
    plain, _, _ = fp16_run(net, mu0=0.0)
    assert pair_diff(module.net, plain.net) > 1e-4  # BAR acted on the other steps


@pytest.mark.parametrize("rule", ["nbar", "obar"])
def test_skip_flag_leaves_weights_bit_exact_without_a_host_sync(rule):
    net = TwoFactorNet()
    optimizer = bar_optimizer(net)
    engine = SAMEngine.from_optimizer(optimizer, net, "bar", rule=rule, schedule="constant", mu0=3.0)
    x, y = next(iter(fixed_loader()))
    F.cross_entropy(net(x), y).backward()
    before = [p.detach().clone() for p in net.parameters()]
    engine.plain_step()
    engine.before_optimizer_step(optimizer, torch.tensor(1.0))
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    twin = copy.deepcopy(net)
    for p, q in zip(net.parameters(), twin.parameters()):
        q.grad = p.grad.clone()  # deepcopy does not copy gradients
    twin_optimizer = bar_optimizer(twin)
    twin_engine = SAMEngine.from_optimizer(twin_optimizer, twin, "bar", rule=rule, schedule="constant", mu0=3.0)
    twin_engine.plain_step()
    engine.before_optimizer_step(optimizer, torch.tensor(0.0))  # skip = 0 is no skip
    twin_engine.before_optimizer_step(twin_optimizer, None)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), twin.parameters()))
    assert pair_diff(net, TwoFactorNet()) > 1e-3


# ---------------------------------------------------------------------------------------------- state
def test_resume_from_epoch_boundary_is_bit_exact(tmp_path):
    net = TwoFactorNet()
    loader = fixed_loader(n=64, batch_size=16)
    straight = ScheduledClassifier(copy.deepcopy(net))
    straight_callback = SAMCallback("bar", total_steps=12, rule="obar")
    quiet_trainer(max_epochs=3, callbacks=[straight_callback]).fit(straight, loader)

    first = ScheduledClassifier(copy.deepcopy(net))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first_callback = SAMCallback("bar", total_steps=12, rule="obar")
    quiet_trainer(max_epochs=2, callbacks=[first_callback, checkpoint], enable_checkpointing=True).fit(first, loader)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"][straight_callback.state_key]
    assert saved["engine"]["step"] == saved["engine"]["variant_state"]["step"] == 8
    resumed = ScheduledClassifier(TwoFactorNet(seed=123))  # fresh objects, other init
    resumed_callback = SAMCallback("bar", total_steps=12, rule="obar")
    quiet_trainer(max_epochs=3, callbacks=[resumed_callback]).fit(resumed, loader, ckpt_path=tmp_path / "last.ckpt")
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert straight_callback.state_dict() == resumed_callback.state_dict()
    assert resumed_callback.state_dict()["engine"]["variant_state"] == {"step": 12}
    expected, _ = reference_run(net, list(loader), epochs=3, total_steps=12, rule="obar")
    assert_close_nets(straight.net, expected)


def test_state_round_trip_and_bad_state():
    variant = make_variant("bar", schedule="constant")
    variant.load_state_dict({"step": 7})
    assert variant.state_dict() == {"step": 7}
    variant.load_state_dict({})
    assert variant.steps == 0
    with pytest.raises(ValueError, match="state keys"):
        variant.load_state_dict({"step": 1, "ema": {}})


# ---------------------------------------------------------------------------------------------- input
BAD_INPUT = [
    ({"mu0": -0.1}, ValueError, "mu0 must be a finite number >= 0"),
    ({"mu0": float("nan")}, ValueError, "mu0 must be"),
    ({"mu0": float("inf")}, ValueError, "mu0 must be"),
    ({"mu0": True}, ValueError, "mu0 must be"),
    ({"mu0": "1"}, ValueError, "mu0 must be"),
    ({"schedule": "step"}, ValueError, "unknown schedule 'step'"),
    ({"schedule": "Linear"}, ValueError, "unknown schedule"),
    ({"rule": "sam"}, ValueError, "unknown rule 'sam'"),
    ({"total_steps": 0}, ValueError, "total_steps must be an int >= 1"),
    ({"total_steps": 2.5}, ValueError, "total_steps must be"),
    ({"rho": 0.05}, ValueError, "rho has no meaning for BAR"),
    ({"pairs": "lora"}, ValueError, "pairs must be None"),
    ({"pairs": [(1, 2)]}, ValueError, r"each entry of pairs must be \(A, B\)"),
    ({"pairs": [(torch.zeros(1), "b")]}, ValueError, "each entry of pairs"),
    ({"eta": 0.01}, TypeError, r"Its options \(defaults\): mu0=1.0, schedule='linear', rule='nbar'"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_INPUT)
def test_bad_input_raises_at_callback_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        SAMCallback("bar", **kwargs)


@pytest.mark.parametrize("kwargs, error, match", BAD_INPUT)
def test_bad_input_raises_at_engine_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        SAMEngine(TwoFactorNet().named_parameters(), "bar", **kwargs)


def test_registered_with_its_options():
    assert "bar" in available_variants()
    assert variant_options("bar") == {
        "mu0": 1.0,
        "schedule": "linear",
        "rule": "nbar",
        "total_steps": None,
        "pairs": None,
    }
    assert "bar" in SAMCallback("bar").state_key
    engine = SAMEngine(TwoFactorNet().named_parameters(), "BAR", mu0=0.5, total_steps=3)
    assert not engine.needs_second_pass() and engine.has_before_step
    assert repr(engine.variant) == "BAR(mu0=0.5, schedule='linear', rule='nbar', total_steps=3)"


def test_tensor_learning_rates_stay_on_the_device():
    net = TwoFactorNet()
    twin = copy.deepcopy(net)
    x, y = next(iter(fixed_loader()))
    for model in (net, twin):
        F.cross_entropy(model(x), y).backward()
    optimizer = torch.optim.Adam(net.parameters(), lr=torch.tensor(0.01))  # a tensor lr (capturable optimizers)
    engine = SAMEngine.from_optimizer(optimizer, net, "bar", schedule="constant", mu0=3.0)
    engine.plain_step()
    engine.before_optimizer_step(optimizer)
    named = dict(twin.named_parameters())
    reference_bar_rescale([(named[a], named[b]) for a, b in PAIRS], [0.01] * 3, 0, None, 3.0, "constant")
    assert_close_nets(net, twin, atol=1e-7)
    assert pair_diff(net, TwoFactorNet()) > 1e-3


# ---------------------------------------------------------------------------------------------- the example
@pytest.mark.timeout(180)
def test_lora_bar_example_quick(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "lora_bar.py"
    spec = importlib.util.spec_from_file_location("examples_lora_bar", path)
    demo = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = demo  # dataclasses look their module up in sys.modules
    try:
        spec.loader.exec_module(demo)
        out = tmp_path / "plots" / "lora_bar.png"
        summary = demo.main(["--quick", "--out", str(out)])
    finally:
        sys.modules.pop(spec.name, None)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = summary["results"]
    assert set(results) == {"lora", "lora+sam", "lora+bar"}
    for result in results.values():
        assert 0.0 <= result.test_acc <= 1.0 and result.step_ms > 0
    assert results["lora+bar"].balancedness[-1] < results["lora"].balancedness[-1]


@pytest.mark.parametrize("rule", ["nbar", "obar"])
def test_hook_and_metrics_never_read_a_tensor_on_the_host(rule, monkeypatch):
    """No .item(), bool(), float() or .tolist() of a tensor in the hook or in metrics() (a host sync on CUDA)."""
    net = TwoFactorNet()
    optimizer = bar_optimizer(net)
    engine = SAMEngine.from_optimizer(optimizer, net, "bar", rule=rule, total_steps=10)
    x, y = next(iter(fixed_loader()))
    F.cross_entropy(net(x), y).backward()
    engine.plain_step()

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    engine.before_optimizer_step(optimizer, torch.tensor(0.0))
    values = engine.variant.metrics()
    monkeypatch.undo()
    assert sorted(values) == ["sam/balancedness_max", "sam/balancedness_mean"]
    assert pair_diff(net, TwoFactorNet()) > 1e-4


# ---------------------------------------------------------------------------------------------- sharded factors
class _TwoRanks:
    """An in-place SUM over two threads standing in for two ranks (``ShardedReduction``'s all_reduce_sum_)."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=30)
        self.slots: list[torch.Tensor | None] = [None, None]
        self.calls = [0, 0]

    def for_rank(self, rank: int):
        def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = self.slots[0] + self.slots[1]
            self.barrier.wait()  # both ranks have read the slots
            return tensor.copy_(total)

        return all_reduce_sum_


@pytest.mark.parametrize("rule", ["nbar", "obar"])
def test_sharded_factors_take_the_global_decision_with_one_all_reduce_per_step(rule, monkeypatch):
    """Two ranks (threads): the Linear LoRA factors split by rows, the Embedding-style pair held whole by both
    (counted once), one pair without gradients. Every rank rescales its shards as the unsharded BAR rescales the whole
    factors (bit-exact: the same decisions and factors), and the balancedness equals the unsharded one."""
    net = TwoFactorNet()
    x, y = next(iter(fixed_loader()))
    F.cross_entropy(net(x), y).backward()
    for name in PAIRS[1]:
        net.get_parameter(name).grad = None  # the "other" adapter: no gradient on any rank
    twin = copy.deepcopy(net)
    for p, q in zip(net.parameters(), twin.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    options = {"rule": rule, "schedule": "constant", "mu0": 3.0}
    engine = SAMEngine(twin.named_parameters(), "bar", **options)
    engine.plain_step()
    engine.variant.before_optimizer_step_(0, dict.fromkeys(engine.names, 0.05), None)
    expected_metrics = engine.variant.metrics()

    names = [name for pair in PAIRS for name in pair]
    split = {name for pair in PAIRS[:2] for name in pair}  # each rank holds half of the rows
    exchange = _TwoRanks()
    shards: list[list[torch.Tensor]] = []
    variants = []
    for rank in range(2):
        held = []
        for name in names:
            full = net.get_parameter(name)
            part = full.detach().chunk(2)[rank] if name in split else full.detach()
            shard = part.clone().requires_grad_()
            if full.grad is not None:
                shard.grad = full.grad.chunk(2)[rank].clone() if name in split else full.grad.clone()
            held.append(shard)
        variant = make_variant("bar", **options)
        variant.sharded, variant.shard_sources = True, held
        variant.reduction = ShardedReduction([1 if n in split else 2 for n in names], exchange.for_rank(rank))
        variant.bind(names, held)
        shards.append(held)
        variants.append(variant)

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    for method in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, method, host_read)
    metrics: list[dict | None] = [None, None]
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            variants[rank].before_optimizer_step_(0, dict.fromkeys(names, 0.05), None)
            assert exchange.calls[rank] == 1  # one all-reduce for the whole step
            metrics[rank] = variants[rank].metrics()
        except BaseException as error:  # re-raised in the main thread
            errors.append(error)
            exchange.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    monkeypatch.undo()
    if errors:
        raise errors[0]
    assert exchange.calls == [2, 2]  # and one for the metrics
    for i, name in enumerate(names):
        whole = torch.cat([shards[0][i], shards[1][i]]) if name in split else shards[0][i]
        assert torch.equal(whole, twin.get_parameter(name)), name
        if name not in split:
            assert torch.equal(shards[0][i], shards[1][i]), name
    for key, value in expected_metrics.items():
        for rank in range(2):
            torch.testing.assert_close(metrics[rank][key], value, rtol=1e-6, atol=0)
    assert pair_diff(twin, net) > 1e-3  # the rescaling happened
    for name in PAIRS[1]:
        assert torch.equal(twin.get_parameter(name), net.get_parameter(name))  # no gradient: left alone
