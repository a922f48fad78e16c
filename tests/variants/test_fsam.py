"""F-SAM (variant="fsam"): SAMEngine and SAMCallback against the plain reference and pytorch-optimizer's
FriendlySAM, exact resume, 16-mixed, state handling and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Classifier, cross_entropy_of, fixed_loader, make_mlp, make_optimizer, quiet_trainer
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from reference import ReferenceFSAM, reference_fsam_step
from torch.nn import functional as F

from lightning_sam import SAMCallback, SAMEngine, SAMMixin, in_second_pass
from lightning_sam.variants import available_variants, variant_options

CONFIGS = [
    pytest.param({}, id="defaults"),
    pytest.param({"rho": 0.1, "sigma": 0.5, "lmbda": 0.6}, id="sigma0.5-lmbda0.6"),
    pytest.param({"rho": 0.5, "adaptive": True}, id="adaptive"),
]


def engine_step(engine, net, optimizer, batch):
    loss_of = cross_entropy_of(batch)
    optimizer.zero_grad()
    loss_of(net).backward()
    engine.ascend()
    optimizer.zero_grad()
    loss_of(net).backward()
    engine.descend()
    optimizer.step()


def ema_of(owner) -> dict[str, torch.Tensor]:
    """The EMA tensors of an engine or a callback, cloned, with the LightningModule's "net." prefix removed."""
    engine = owner.engine if isinstance(owner, SAMCallback) else owner
    ema = engine.state_dict()["variant_state"]["ema"]
    return {name.removeprefix("net."): m.detach().clone() for name, m in ema.items()}


def max_diff(nets_a, nets_b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(nets_a.parameters(), nets_b.parameters()))


def reference_run(net, batches, epochs=1, optimizer_name="sgd", **options):
    net = copy.deepcopy(net)
    optimizer = make_optimizer(optimizer_name, net.parameters())
    fsam = ReferenceFSAM(**options)
    for _ in range(epochs):
        for batch in batches:
            reference_fsam_step(net, cross_entropy_of(batch), optimizer, fsam)
    return net, fsam


# ---------------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("options", CONFIGS)
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("use_closure", [False, True])
def test_engine_matches_reference(options, optimizer_name, use_closure):
    batches = list(fixed_loader(n=96, batch_size=16))  # 6 steps, twice
    net = make_mlp()
    expected, fsam = reference_run(net, batches, epochs=2, optimizer_name=optimizer_name, **options)
    optimizer = make_optimizer(optimizer_name, net.parameters())
    engine = SAMEngine(net.named_parameters(), "fsam", **options)
    for batch in batches * 2:
        if use_closure:

            def closure(batch=batch):
                optimizer.zero_grad()
                loss = cross_entropy_of(batch)(net)
                loss.backward()
                return loss

            engine.step(closure)
            optimizer.step()
        else:
            engine_step(engine, net, optimizer, batch)
    assert engine.step_count == 12 and engine.variant.steps == fsam.steps == 12
    for (name, p), q in zip(net.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    ema = ema_of(engine)
    assert sorted(ema) == sorted(fsam.ema)
    for name, m in fsam.ema.items():
        assert ema[name].dtype == torch.float32
        torch.testing.assert_close(ema[name], m, atol=1e-6, rtol=0, msg=name)


def test_first_step_is_sam_and_later_steps_are_not():
    batches = list(fixed_loader(n=32, batch_size=16))
    nets, engines, optimizers = {}, {}, {}
    for variant in ("sam", "fsam"):
        nets[variant] = make_mlp()
        optimizers[variant] = make_optimizer("sgd", nets[variant].parameters())
        engines[variant] = SAMEngine(nets[variant].named_parameters(), variant, rho=0.05)
    for variant in ("sam", "fsam"):
        engine_step(engines[variant], nets[variant], optimizers[variant], batches[0])
    assert all(torch.equal(p, q) for p, q in zip(nets["sam"].parameters(), nets["fsam"].parameters()))
    for variant in ("sam", "fsam"):
        engine_step(engines[variant], nets[variant], optimizers[variant], batches[1])
    assert max_diff(nets["sam"], nets["fsam"]) > 1e-5  # the EMA changed the ascent


@pytest.mark.parametrize("options", CONFIGS)
def test_callback_matches_reference(options):
    net = make_mlp()
    loader = fixed_loader(n=96, batch_size=16)
    expected, fsam = reference_run(net, list(loader), epochs=2, **options)
    module = Classifier(copy.deepcopy(net))
    callback = SAMCallback("fsam", **options)
    trainer = quiet_trainer(max_epochs=2, callbacks=[callback])
    trainer.fit(module, loader)
    assert trainer.global_step == 12 and callback.engine.variant.steps == 12
    for (name, p), q in zip(module.net.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    ema = ema_of(callback)
    assert sorted(ema) == sorted(fsam.ema)
    for name, m in fsam.ema.items():
        torch.testing.assert_close(ema[name], m, atol=1e-6, rtol=0, msg=name)
    sam = reference_run(net, list(loader), epochs=2, sigma=0.0)[0]  # sigma = 0 is plain SAM: the test can fail
    assert max_diff(sam, module.net) > 1e-4


class ManualFSAM(SAMMixin, Classifier):
    def __init__(self, net, **options):
        super().__init__(net)
        self.automatic_optimization = False
        self.configure_sam("fsam", **options)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.sam_step(lambda: F.cross_entropy(self(x), y))


def test_mixin_matches_reference():
    net = make_mlp()
    loader = fixed_loader(n=96, batch_size=16)
    expected, fsam = reference_run(net, list(loader), epochs=1, lmbda=0.6)
    module = ManualFSAM(copy.deepcopy(net), lmbda=0.6)
    quiet_trainer(max_epochs=1).fit(module, loader)
    assert module.sam_engine.variant.steps == 6
    for p, q in zip(module.net.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    ema = ema_of(module.sam_engine)
    for name, m in fsam.ema.items():
        torch.testing.assert_close(ema[name], m, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("options", CONFIGS)
def test_engine_matches_pytorch_optimizer_friendly_sam(options, foreach):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    batches = list(fixed_loader(n=96, batch_size=16))
    net = make_mlp()
    oracle_net = copy.deepcopy(net)
    hyper = {"rho": 0.05, "sigma": 1.0, "lmbda": 0.9, "adaptive": False, **options}
    oracle = pytorch_optimizer.FriendlySAM(
        oracle_net.parameters(), torch.optim.SGD, foreach=foreach, lr=0.1, momentum=0.9, **hyper
    )
    optimizer = make_optimizer("sgd", net.parameters())  # SGD(lr=0.1, momentum=0.9)
    engine = SAMEngine(net.named_parameters(), "fsam", **options)
    for batch in batches * 2:
        loss_of = cross_entropy_of(batch)
        oracle.zero_grad()
        loss_of(oracle_net).backward()
        oracle.first_step(zero_grad=True)
        loss_of(oracle_net).backward()
        oracle.second_step(zero_grad=True)
        engine_step(engine, net, optimizer, batch)
    for (name, p), q in zip(net.named_parameters(), oracle_net.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    ema = ema_of(engine)
    for (name, _), p in zip(net.named_parameters(), oracle_net.parameters()):
        torch.testing.assert_close(ema[name], oracle.state[p]["momentum"], atol=1e-6, rtol=0, msg=name)
    plain = copy.deepcopy(make_mlp())
    plain_opt = make_optimizer("sgd", plain.parameters())
    for batch in batches * 2:
        plain_opt.zero_grad()
        cross_entropy_of(batch)(plain).backward()
        plain_opt.step()
    assert max_diff(plain, net) > 1e-4


# ---------------------------------------------------------------------------------------------- state
def test_resume_from_epoch_boundary_is_bit_exact(tmp_path):
    net = make_mlp(batchnorm=True)
    loader = fixed_loader(n=64, batch_size=16)
    straight = Classifier(copy.deepcopy(net))
    straight_callback = SAMCallback("fsam", lmbda=0.6)
    quiet_trainer(max_epochs=3, callbacks=[straight_callback]).fit(straight, loader)

    first = Classifier(copy.deepcopy(net))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_epochs=2, callbacks=[SAMCallback("fsam", lmbda=0.6), checkpoint], enable_checkpointing=True).fit(
        first, loader
    )
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"][straight_callback.state_key]
    assert saved["engine"]["variant_state"]["step"] == 8
    resumed = Classifier(make_mlp(batchnorm=True, seed=123))  # fresh objects, other init
    resumed_callback = SAMCallback("fsam", lmbda=0.6)
    quiet_trainer(max_epochs=3, callbacks=[resumed_callback]).fit(resumed, loader, ckpt_path=tmp_path / "last.ckpt")
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    for b, c in zip(straight.buffers(), resumed.buffers()):
        assert torch.equal(b, c)
    straight_state, resumed_state = straight_callback.state_dict()["engine"], resumed_callback.state_dict()["engine"]
    assert straight_state["step"] == resumed_state["step"] == 12
    assert straight_state["variant_state"]["step"] == resumed_state["variant_state"]["step"] == 12
    straight_ema, resumed_ema = straight_state["variant_state"]["ema"], resumed_state["variant_state"]["ema"]
    assert sorted(straight_ema) == sorted(resumed_ema) == sorted(n for n, _ in straight.named_parameters())
    for name, m in straight_ema.items():
        assert torch.equal(m, resumed_ema[name]), name


def test_state_round_trip_copies_and_continues_exactly():
    batches = list(fixed_loader(n=96, batch_size=16))
    net = make_mlp()
    optimizer = make_optimizer("sgd", net.parameters())
    engine = SAMEngine(net.named_parameters(), "fsam")
    for batch in batches[:3]:
        engine_step(engine, net, optimizer, batch)
    state = engine.state_dict()
    state["variant_state"]["ema"] = {n: m.double() for n, m in state["variant_state"]["ema"].items()}  # any dtype
    snapshot = {n: m.clone() for n, m in state["variant_state"]["ema"].items()}

    twin = copy.deepcopy(net)
    twin_optimizer = make_optimizer("sgd", twin.parameters())
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    fresh = SAMEngine(twin.named_parameters(), "fsam")
    fresh.load_state_dict(state)
    assert fresh.variant.steps == 3
    assert all(torch.equal(m, snapshot[n]) for n, m in fresh.state_dict()["variant_state"]["ema"].items())
    for batch in batches[3:]:
        engine_step(engine, net, optimizer, batch)
        engine_step(fresh, twin, twin_optimizer, batch)
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    fresh_ema = fresh.state_dict()["variant_state"]["ema"]
    assert all(m.dtype == torch.float32 for m in fresh_ema.values())
    assert all(torch.equal(m, fresh_ema[n]) for n, m in engine.state_dict()["variant_state"]["ema"].items())
    # the loaded tensors were copied, never updated in place
    assert all(torch.equal(m, snapshot[n]) for n, m in state["variant_state"]["ema"].items())


def test_state_of_another_model_and_bad_state_raise():
    net = make_mlp()
    batch = next(iter(fixed_loader()))
    engine = SAMEngine(net.named_parameters(), "fsam")
    engine.load_state_dict(
        {"variant": "fsam", "step": 1, "variant_state": {"step": 1, "ema": {"0.weight": torch.zeros(3, 3)}}}
    )
    cross_entropy_of(batch)(net).backward()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="another model"):
        engine.ascend()
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    with pytest.raises(ValueError, match="state keys"):
        engine.variant.load_state_dict({"momentum": {}})
    with pytest.raises(ValueError, match="names to tensors"):
        engine.variant.load_state_dict({"step": 0, "ema": {"0.weight": [1.0]}})


def test_ema_is_fp32_one_buffer_allocated_once():
    net = make_mlp()
    batches = list(fixed_loader(n=64, batch_size=16))
    optimizer = make_optimizer("sgd", net.parameters())
    engine = SAMEngine(net.named_parameters(), "fsam")
    pointers = None
    for batch in batches:
        engine_step(engine, net, optimizer, batch)
        ema = engine.variant.state_dict()["ema"]
        current = {n: m.data_ptr() for n, m in ema.items()}
        assert pointers is None or current == pointers
        pointers = current
    assert sum(m.numel() for m in ema.values()) == sum(p.numel() for p in net.parameters())


def test_bf16_parameters_keep_an_fp32_ema_of_the_raw_gradients():
    net = make_mlp().to(torch.bfloat16)
    batches = [(x.to(torch.bfloat16), y) for x, y in fixed_loader(n=48, batch_size=16)]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    engine = SAMEngine(net.named_parameters(), "fsam", lmbda=0.8)
    expected: dict[str, torch.Tensor] = {}
    for batch in batches:
        optimizer.zero_grad()
        cross_entropy_of(batch)(net).backward()
        for name, p in net.named_parameters():
            g = p.grad.float()
            expected[name] = g.clone() if name not in expected else 0.8 * expected[name] + 0.2 * g
        engine.ascend()
        optimizer.zero_grad()
        cross_entropy_of(batch)(net).backward()
        engine.descend()
        optimizer.step()
    ema = ema_of(engine)
    for name, m in expected.items():
        assert ema[name].dtype == torch.float32
        torch.testing.assert_close(ema[name], m, atol=1e-7, rtol=1e-6, msg=name)
    assert all(torch.isfinite(p).all() and p.dtype == torch.bfloat16 for p in net.parameters())


def test_parameter_unfrozen_later_starts_its_ema_at_g():
    batches = list(fixed_loader(n=96, batch_size=16))
    net = make_mlp()
    reference = copy.deepcopy(net)
    optimizer = make_optimizer("sgd", net.parameters())
    ref_optimizer = make_optimizer("sgd", reference.parameters())
    engine = SAMEngine(net.named_parameters(), "fsam")
    fsam = ReferenceFSAM()
    for model in (net, reference):
        model[0].weight.requires_grad_(False)
    for step, batch in enumerate(batches):
        if step == 2:
            for model in (net, reference):
                model[0].weight.requires_grad_(True)
            assert "0.weight" not in engine.variant.state_dict()["ema"]
        engine_step(engine, net, optimizer, batch)
        reference_fsam_step(reference, cross_entropy_of(batch), ref_optimizer, fsam)
        if step == 2:  # its first EMA is its own gradient
            torch.testing.assert_close(ema_of(engine)["0.weight"], fsam.ema["0.weight"], atol=0, rtol=0)
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    for name, m in fsam.ema.items():
        torch.testing.assert_close(ema_of(engine)[name], m, atol=1e-6, rtol=0)


def test_refuses_a_second_ascent_in_one_step():
    net = make_mlp()
    batch = next(iter(fixed_loader()))
    engine = SAMEngine(net.parameters(), "fsam")
    before = [p.detach().clone() for p in net.parameters()]
    cross_entropy_of(batch)(net).backward()
    engine.ascend()
    net.zero_grad()
    cross_entropy_of(batch)(net).backward()
    with pytest.raises(RuntimeError, match="single-step"):
        engine.ascend()
    engine.restore()
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


# ---------------------------------------------------------------------------------------------- 16-mixed
class Poisoned(Classifier):
    """Multiplies the loss by inf in pass ``"pass1"`` or ``"pass2"`` of the listed (batch_idx, pass) pairs."""

    def __init__(self, net, poison=()):
        super().__init__(net)
        self.poison = set(poison)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if (batch_idx, "pass2" if in_second_pass() else "pass1") in self.poison:
            loss = loss * float("inf")
        return loss


class StateRecorder(Callback):
    def __init__(self, sam: SAMCallback) -> None:
        self.sam = sam
        self.states: list[tuple[int, dict[str, torch.Tensor], list[torch.Tensor]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append(
            (
                self.sam.engine.variant.steps,
                ema_of(self.sam),
                [p.detach().clone() for p in pl_module.parameters()],
            )
        )


@pytest.mark.parametrize("poisoned_pass", ["pass1", "pass2"])
def test_fp16_mixed_trains_and_a_skipped_pass_1_leaves_the_ema_untouched(poisoned_pass):
    net = make_mlp()
    loader = fixed_loader(n=96, batch_size=16)
    module = Poisoned(copy.deepcopy(net), poison=((2, poisoned_pass),))
    sam = SAMCallback("fsam")
    recorder = StateRecorder(sam)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    trainer = quiet_trainer(
        max_epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], callbacks=[sam, recorder]
    )
    trainer.fit(module, loader)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert max_diff(module.net, net) > 1e-3  # it trained
    assert scaler.get_scale() == 128.0  # the poisoned step was skipped (the scale halved once)
    steps, emas, weights = zip(*recorder.states)
    assert all(m.dtype == torch.float32 and torch.isfinite(m).all() for m in emas[-1].values())
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))  # step 2 skipped
    if poisoned_pass == "pass1":  # no ascent: the EMA and the variant's counter did not move
        assert steps[1:4] == (2, 2, 3)
        assert all(torch.equal(emas[1][n], emas[2][n]) for n in emas[1])
    else:  # the ascent ran: the EMA keeps pass 1's update (documented choice)
        assert steps[1:4] == (2, 3, 4)
        assert all(torch.isfinite(m).all() for m in emas[2].values())
        assert any(not torch.equal(emas[1][n], emas[2][n]) for n in emas[1])
    assert any(not torch.equal(emas[2][n], emas[3][n]) for n in emas[2])  # and it moves again afterwards


# ---------------------------------------------------------------------------------------------- input
BAD_INPUT = [
    ({"sigma": -0.1}, ValueError, "sigma must be a finite number >= 0"),
    ({"sigma": float("nan")}, ValueError, "sigma must be"),
    ({"sigma": float("inf")}, ValueError, "sigma must be"),
    ({"sigma": True}, ValueError, "sigma must be"),
    ({"sigma": "1"}, ValueError, "sigma must be"),
    ({"lmbda": 1.0}, ValueError, r"lmbda must be a finite number in \[0, 1\)"),
    ({"lmbda": -0.1}, ValueError, "lmbda must be"),
    ({"lmbda": float("nan")}, ValueError, "lmbda must be"),
    ({"adaptive": 1}, ValueError, "adaptive must be True or False"),
    ({"adaptive": "yes"}, ValueError, "adaptive must be True or False"),
    ({"rho": 0.0}, ValueError, "rho must be a finite number > 0"),
    ({"rho": float("inf")}, ValueError, "rho must be a finite number > 0"),
    ({"eta": 0.01}, TypeError, r"Its options \(defaults\): sigma=1.0, lmbda=0.9, adaptive=False"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_INPUT)
def test_bad_input_raises_at_callback_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        SAMCallback("fsam", **kwargs)


@pytest.mark.parametrize("kwargs, error, match", BAD_INPUT)
def test_bad_input_raises_at_engine_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        SAMEngine(make_mlp().parameters(), "fsam", **kwargs)


def test_registered_with_its_options():
    assert "fsam" in available_variants()
    assert variant_options("fsam") == {"sigma": 1.0, "lmbda": 0.9, "adaptive": False}
    assert "fsam" in SAMCallback("fsam").state_key
    engine = SAMEngine(make_mlp().parameters(), "FSAM", sigma=0.5)
    assert engine.rho == 0.05 and engine.variant.sigma == 0.5
    assert repr(engine.variant) == "FSAM(rho=0.05, sigma=0.5, lmbda=0.9, adaptive=False)"
