"""float64 end to end: every variant in fp64 against the plain reference run in fp64, to fp64 rounding.

The precision rule (``lightning_sam.tensor_ops``): norms, inner products and variant buffers are computed in at
least the parameters' precision: fp32 for fp16 / bf16 / fp32 tensors, fp64 for fp64 tensors. fp32 results are
unchanged (the rest of the suite pins them at 1e-6); here an fp64 model must match ``tests/reference.py``, itself
run in fp64, to ~1e-12, state evolution included (EMA, masks, alpha search, BAR's rescaling), through
``SAMEngine`` and through a real ``Trainer(precision="64-true")``.

The drivers and references are the variant test modules' own (imported, not duplicated).
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import reference
import torch
from conftest import (
    Classifier,
    cross_entropy_of,
    fixed_loader,
    make_mlp,
    make_optimizer,
    quiet_trainer,
    training_closure,
)
from reference import balancedness, reference_looksam_run, reference_sam_step
from test_callback import reference_weights
from test_engine import run_engine
from torch import Tensor, nn
from torch.nn import functional as F
from variants import test_bar, test_fsam, test_ssam, test_xsam

from lightning_sam import SAMCallback, SAMEngine, available_variants
from lightning_sam.clipping import clip_gradients_
from lightning_sam.tensor_ops import accumulation_dtype, global_norm, widen, widened_dtype

TOL: dict[str, float] = {"atol": 1e-12, "rtol": 1e-12}


def double_batches(n: int = 96, batch_size: int = 16) -> list[tuple[Tensor, Tensor]]:
    """``fixed_loader``'s batches with fp64 inputs (the labels stay int64)."""
    return [(x.double(), y) for x, y in fixed_loader(n=n, batch_size=batch_size)]


def assert_fp64_close(actual: nn.Module, expected: nn.Module) -> None:
    """Same fp64 parameters up to fp64 rounding (``TOL``)."""
    for (name, p), q in zip(actual.named_parameters(), expected.parameters()):
        assert p.dtype == q.dtype == torch.float64, name
        torch.testing.assert_close(p, q, msg=name, **TOL)


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def floating_tensors(state: Any) -> list[Tensor]:
    """Every floating-point tensor in a (nested) state dict."""
    if isinstance(state, Tensor):
        return [state] if state.is_floating_point() else []
    if isinstance(state, dict):
        return [t for value in state.values() for t in floating_tensors(value)]
    if isinstance(state, (list, tuple)):
        return [t for value in state for t in floating_tensors(value)]
    return []


# ---------------------------------------------------------------------------------------------- the helpers
@pytest.mark.parametrize(
    "dtype, wide",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_widen_and_accumulation_dtype(dtype, wide):
    t = torch.randn(5).to(dtype)
    assert widened_dtype(dtype) == wide and widen(t).dtype == wide
    if dtype == wide:
        assert widen(t) is t  # the fast path: no copy for fp32 / fp64
    assert accumulation_dtype([t]) == wide
    assert accumulation_dtype([torch.zeros(1, dtype=torch.float16), t]) == wide  # fp64 wins over anything
    assert global_norm([t]).dtype == wide


def test_global_norm_is_fp64_exact_for_fp64_and_unchanged_for_fp32():
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in [(7, 3), (11,), (2, 2, 2)]]
    exact = sum((t * t).sum() for t in tensors).sqrt()
    torch.testing.assert_close(global_norm(tensors), exact, atol=0, rtol=1e-15)
    narrow = [t.float() for t in tensors]
    assert global_norm(narrow).dtype == torch.float32
    assert torch.equal(global_norm(narrow), torch.linalg.vector_norm(torch.stack([t.norm() for t in narrow])))
    mixed = [tensors[0], narrow[1]]  # one fp64 tensor: the whole norm in fp64, the fp32 one widened exactly
    torch.testing.assert_close(global_norm(mixed), torch.cat([tensors[0].reshape(-1), narrow[1].double()]).norm())


# ---------------------------------------------------------------------------------------------- SAMEngine
def check_sam_family(variant: str, options: dict[str, Any]) -> None:
    batches = double_batches()
    net = make_mlp().double()
    rho = {"sam": 0.05, "asam": 0.5}[variant]
    expected = copy.deepcopy(net)
    plain = copy.deepcopy(net)
    engine = run_engine(net, batches, variant, rho, "adamw", use_closure=options.pop("closure"), **options)
    ref_opt, plain_opt = make_optimizer("adamw", expected.parameters()), make_optimizer("adamw", plain.parameters())
    for batch in batches:
        reference_sam_step(expected, cross_entropy_of(batch), ref_opt, variant, rho, **options)
        plain_opt.zero_grad()
        cross_entropy_of(batch)(plain).backward()
        plain_opt.step()
    assert engine.last_perturbation_norm is not None and engine.last_perturbation_norm.dtype == torch.float64
    if variant == "sam":  # ||e|| = rho ||g|| / (||g|| + eps): rho to fp64 rounding, not to fp32's
        torch.testing.assert_close(engine.last_perturbation_norm, torch.tensor(rho, dtype=torch.float64), **TOL)
    assert_fp64_close(net, expected)
    assert max_diff(net, plain) > 1e-4  # SAM moved the weights: the comparison can fail


def check_fsam(options: dict[str, Any]) -> None:
    batches = double_batches()
    net = make_mlp().double()
    expected, fsam = test_fsam.reference_run(net, batches, epochs=2, **options)
    optimizer = make_optimizer("sgd", net.parameters())
    engine = SAMEngine(net.named_parameters(), "fsam", **options)
    for batch in batches * 2:
        test_fsam.engine_step(engine, net, optimizer, batch)
    assert engine.variant.steps == fsam.steps == 12
    assert_fp64_close(net, expected)
    ema = test_fsam.ema_of(engine)
    assert sorted(ema) == sorted(fsam.ema)
    for name, m in fsam.ema.items():
        assert ema[name].dtype == m.dtype == torch.float64
        torch.testing.assert_close(ema[name], m, msg=name, **TOL)


def check_looksam(options: dict[str, Any]) -> None:
    batches = double_batches()  # 6 steps with k = 2: SAM steps 0, 2, 4 and three reuses of g_v
    net = make_mlp().double()
    expected = copy.deepcopy(net)
    reference_looksam_run(expected, batches, make_optimizer("sgd", expected.parameters()), **options)
    optimizer = make_optimizer("sgd", net.parameters())
    engine = SAMEngine(net.named_parameters(), "looksam", **options)
    for x, y in batches:
        engine.step(training_closure(net, optimizer, (x, y)), optimizer)
    assert_fp64_close(net, expected)
    g_v = engine.state_dict()["variant_state"]["g_v"]
    assert g_v and all(t.dtype == torch.float64 for t in g_v.values())


def check_xsam(options: dict[str, Any]) -> None:
    batches = double_batches()  # 6 steps, searches at 0 and 3
    net = make_mlp().double()
    expected, alphas = test_xsam.reference_run(net, batches, alpha_every=3, **options)
    optimizer = make_optimizer("sgd", net.parameters())
    engine = SAMEngine(net.named_parameters(), "xsam", alpha_every=3, **options)
    seen = []
    for x, y in batches:
        engine.step(
            training_closure(net, optimizer, (x, y)), optimizer, probe=lambda x=x, y=y: F.cross_entropy(net(x), y)
        )
        seen.append(engine.variant.alpha)
    assert seen == alphas and engine.variant.searches == 2
    assert any(alpha != 1.0 for alpha in alphas)  # the descent really interpolated (alpha = 1 is plain SAM)
    probes = engine.variant.last_probe_losses
    assert probes is not None and probes.dtype == torch.float64
    assert_fp64_close(net, expected)


def check_ssam(options: dict[str, Any]) -> None:
    options = {**test_ssam.CONFIGS[options["config"]], **test_ssam.SCHEDULE}
    batches = double_batches(n=128)  # 8 steps: refreshes at 0 (done at 1), 3 (4), 6 (7)
    net = make_mlp().double()
    expected, ref = test_ssam.reference_run(net, batches, options)
    engine = test_ssam.engine_run(net, batches, options)
    assert_fp64_close(net, expected)
    masks = engine.variant.dense_masks()
    flat = torch.cat([masks[name].reshape(-1) for name, _ in net.named_parameters()])
    assert set(torch.nonzero(flat).reshape(-1).tolist()) == ref.mask
    assert engine.last_perturbation_norm is not None and engine.last_perturbation_norm.dtype == torch.float64


def check_bar(options: dict[str, Any]) -> None:
    batches = double_batches()  # 6 steps, twice
    net = test_bar.TwoFactorNet().double()
    expected, decisions = test_bar.reference_run(net, batches, epochs=2, total_steps=12, **options)
    optimizer = test_bar.bar_optimizer(net)
    scheduler = test_bar.bar_scheduler(optimizer)
    engine = SAMEngine.from_optimizer(optimizer, net, "bar", total_steps=12, **options)
    for x, y in batches * 2:
        engine.step(training_closure(net, optimizer, (x, y)), optimizer)
        scheduler.step()
    assert engine.variant.steps == 12
    assert_fp64_close(net, expected)
    assert {"A up", "A down"} <= set(decisions)  # both branches of the rule were taken
    named = dict(expected.named_parameters())
    values = engine.variant.balancedness()
    assert values.dtype == torch.float64
    wanted = balancedness([(named[a], named[b]) for a, b in engine.variant.found_pairs])
    torch.testing.assert_close(values, torch.tensor(wanted, dtype=torch.float64), **TOL)


CHECKS = {
    "sam": lambda options: check_sam_family("sam", options),
    "asam": lambda options: check_sam_family("asam", options),
    "fsam": check_fsam,
    "looksam": check_looksam,
    "xsam": check_xsam,
    "ssam": check_ssam,
    "bar": check_bar,
}

CASES = [
    pytest.param("sam", {"closure": False}, id="sam"),
    pytest.param("sam", {"closure": True}, id="sam-closure"),
    pytest.param("asam", {"closure": False}, id="asam"),
    pytest.param("asam", {"closure": True, "eta": 0.1}, id="asam-eta0.1-closure"),
    pytest.param("fsam", {}, id="fsam"),
    pytest.param("fsam", {"rho": 0.5, "adaptive": True, "sigma": 0.5, "lmbda": 0.6}, id="fsam-adaptive"),
    pytest.param("looksam", {"k": 2}, id="looksam-k2"),
    pytest.param("xsam", {"steps": 1}, id="xsam"),
    pytest.param("xsam", {"steps": 2}, id="xsam-2steps"),
    *[pytest.param("ssam", {"config": config}, id=f"ssam-{config}") for config in test_ssam.CONFIGS],
    pytest.param("bar", {}, id="bar-nbar-linear"),
    pytest.param("bar", {"rule": "obar", "schedule": "cosine", "mu0": 2.0}, id="bar-obar-cosine"),
]


def test_every_registered_variant_has_an_fp64_check():
    assert set(CHECKS) == set(available_variants()) == {case.values[0] for case in CASES}


@pytest.mark.parametrize("variant, options", CASES)
def test_engine_matches_fp64_reference(variant, options):
    CHECKS[variant](dict(options))


def test_fp64_tolerance_is_sharp_an_fp32_norm_would_fail(monkeypatch):
    """The same run with only the reference's norm narrowed to fp32 (the old behaviour) misses ``TOL`` by far."""
    batches = double_batches()
    net = make_mlp().double()
    exact = copy.deepcopy(net)
    run_engine(net, batches, "sam", 0.05, "adamw")
    optimizer = make_optimizer("adamw", exact.parameters())
    for batch in batches:
        reference_sam_step(exact, cross_entropy_of(batch), optimizer, "sam", 0.05)
    assert_fp64_close(net, exact)

    def fp32_norm(tensors: list[Tensor]) -> Tensor:
        return torch.sqrt(sum((t.detach().float() ** 2).sum() for t in tensors)).double()

    narrowed = copy.deepcopy(make_mlp().double())
    monkeypatch.setattr(reference, "l2_norm", fp32_norm)
    optimizer = make_optimizer("adamw", narrowed.parameters())
    for batch in batches:
        reference_sam_step(narrowed, cross_entropy_of(batch), optimizer, "sam", 0.05)
    with pytest.raises(AssertionError):  # ~1e-10 apart after six steps, 100x the tolerance
        assert_fp64_close(narrowed, exact)


# ---------------------------------------------------------------------------------------------- state dicts
STATEFUL = [
    pytest.param("fsam", {}, id="fsam"),
    pytest.param("looksam", {"k": 2}, id="looksam"),
    pytest.param("xsam", {"alpha_every": 2}, id="xsam"),
    pytest.param("ssam", {"num_samples": 24, "mask_every": 2, "sparsity": 0.5}, id="ssam-fisher-in-progress"),
    pytest.param("ssam", {"mask": "dst", "total_steps": 8, "mask_every": 2, "sparsity": 0.5}, id="ssam-dst"),
]


def engine_steps(engine: SAMEngine, net: nn.Module, optimizer: torch.optim.Optimizer, batches: list) -> None:
    """Drive ``engine`` as ``tests/variants/test_ssam.engine_run`` does (Fisher samples, plain or SAM steps)."""
    for x, y in batches:
        if engine.samples_needed():
            engine.collect_samples(lambda i, j, x=x, y=y: F.cross_entropy(net(x[i:j]), y[i:j]), x.shape[0])
        engine.step(
            training_closure(net, optimizer, (x, y)), optimizer, probe=lambda x=x, y=y: F.cross_entropy(net(x), y)
        )


def round_trip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("variant, options", STATEFUL)
def test_fp64_state_dict_round_trip_keeps_fp64_buffers_and_resumes_exactly(variant, options):
    batches = double_batches(n=80)
    net = make_mlp().double()
    optimizer = make_optimizer("sgd", net.parameters())
    engine = SAMEngine(net.named_parameters(), variant, **options)
    engine_steps(engine, net, optimizer, batches[:1])
    saved_net, saved_optimizer = copy.deepcopy(net), copy.deepcopy(optimizer.state_dict())
    state = round_trip(engine.state_dict())

    resumed_net = copy.deepcopy(saved_net)
    resumed_optimizer = make_optimizer("sgd", resumed_net.parameters())
    resumed_optimizer.load_state_dict(saved_optimizer)
    resumed = SAMEngine(resumed_net.named_parameters(), variant, **options)
    resumed.load_state_dict(state)
    for t in floating_tensors(resumed.state_dict()):
        assert t.dtype == torch.float64
    engine_steps(engine, net, optimizer, batches[1:])
    engine_steps(resumed, resumed_net, resumed_optimizer, batches[1:])
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), resumed_net.parameters()))
    live = floating_tensors(resumed.state_dict())
    for t in live:
        assert t.dtype == torch.float64
    if variant in ("fsam", "looksam"):
        assert live  # the EMA / g_v really were checked


def test_fisher_sums_of_fp64_parameters_are_fp64():
    x, y = double_batches(n=16)[0]
    net = make_mlp().double()
    engine = SAMEngine(net.named_parameters(), "ssam", num_samples=32, mask_every=1)
    engine.collect_samples(lambda i, j: F.cross_entropy(net(x[i:j]), y[i:j]), 16)  # half a refresh: kept as state
    fisher = engine.state_dict()["variant_state"]["fisher"]
    assert fisher and all(t.dtype == torch.float64 for t in fisher.values())


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stored_dtype", [torch.float32, torch.float64])
def test_loaded_buffers_take_the_parameters_precision_whatever_they_were_stored_in(model_dtype, stored_dtype):
    x, y = double_batches(n=16)[0]
    x = x.to(model_dtype)
    net = make_mlp().to(model_dtype)
    names = [n for n, _ in net.named_parameters()]
    zeros = {n: torch.zeros(p.shape, dtype=stored_dtype) for n, p in net.named_parameters()}

    looksam = SAMEngine(net.named_parameters(), "looksam")
    looksam.load_state_dict({"variant": "looksam", "step": 1, "variant_state": {"have_gv": True, "g_v": zeros}})
    assert [looksam.variant._gv[n].dtype for n in names] == [model_dtype] * len(names)

    ssam = SAMEngine(net.named_parameters(), "ssam", num_samples=32, mask_every=1)
    state = ssam.state_dict()
    state["variant_state"].update(fisher=zeros, fisher_count=16)
    ssam.load_state_dict(state)
    assert [f.dtype for f in ssam.variant._fisher] == [model_dtype] * len(names)

    fsam = SAMEngine(net.named_parameters(), "fsam")
    fsam.load_state_dict({"variant": "fsam", "step": 1, "variant_state": {"step": 1, "ema": dict(zeros)}})
    F.cross_entropy(net(x), y).backward()
    fsam.ascend()  # the loaded EMA is taken up (copied) when its parameter first takes part
    fsam.restore()
    ema = fsam.state_dict()["variant_state"]["ema"]
    assert [ema[n].dtype for n in names] == [model_dtype] * len(names)
    assert all(zeros[n].dtype == stored_dtype and not zeros[n].any() for n in names)  # the caller's are untouched


# ---------------------------------------------------------------------------------------------- clipping
def test_clipping_fp64_gradients_matches_torch():
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in [(4, 3), (5,)]]
    for value in (0.1, 0.7):
        clipped, expected = [g.clone() for g in grads], [nn.Parameter(g.clone()) for g in grads]
        for p, g in zip(expected, grads):
            p.grad = g.clone()
        clip_gradients_(clipped, value, "norm")
        torch.nn.utils.clip_grad_norm_(expected, value)
        for c, p in zip(clipped, expected):
            torch.testing.assert_close(c, p.grad, atol=0, rtol=1e-15)
        clipped = [g.clone() for g in grads]
        clip_gradients_(clipped, value, "value")
        for c, g in zip(clipped, grads):
            assert torch.equal(c, g.clamp(-value, value))  # the bound is not rounded to fp32 first


# ---------------------------------------------------------------------------------------------- Trainer
def run_steps_reference(variant: str, net: nn.Module, batches: list) -> nn.Module:
    if variant in ("sam", "asam"):
        return reference_weights(net, batches, variant, {"sam": 0.05, "asam": 0.5}[variant], "sgd")
    if variant == "fsam":
        return test_fsam.reference_run(net, batches)[0]
    expected = copy.deepcopy(net)
    reference_looksam_run(expected, batches, make_optimizer("sgd", expected.parameters()))
    return expected


@pytest.mark.parametrize("variant", ["sam", "asam", "fsam", "looksam"])
def test_trainer_64_true_max_steps_matches_fp64_reference(variant):
    loader = fixed_loader(n=64, batch_size=16)
    net = make_mlp()
    expected = run_steps_reference(variant, copy.deepcopy(net).double(), double_batches(n=64)[:3])
    module = Classifier(copy.deepcopy(net))
    callback = SAMCallback(variant)
    trainer = quiet_trainer(precision="64-true", max_steps=3, callbacks=[callback], log_every_n_steps=1)
    trainer.fit(module, loader)
    assert trainer.global_step == 3
    assert callback.engine is not None and callback.engine.last_perturbation_norm.dtype == torch.float64
    assert_fp64_close(module.net, expected)


def test_trainer_64_true_ssam_xsam_bar_with_explicit_options_match_fp64_reference():
    """One epoch each, every run-length option given explicitly (no Trainer-derived defaults involved)."""
    options = {**test_ssam.CONFIGS["fisher-unstructured"], **test_ssam.SCHEDULE}
    expected, _ = test_ssam.reference_run(make_mlp().double(), double_batches(n=128), options)
    module = Classifier(make_mlp())
    quiet_trainer(precision="64-true", max_epochs=1, callbacks=[SAMCallback("ssam", rho=0.05, **options)]).fit(
        module, fixed_loader(n=128, batch_size=16)
    )
    assert_fp64_close(module.net, expected)

    expected, alphas = test_xsam.reference_run(make_mlp().double(), double_batches(), alpha_every=3)
    module = Classifier(make_mlp())
    callback = SAMCallback("xsam", alpha_every=3)
    quiet_trainer(precision="64-true", max_epochs=1, callbacks=[callback]).fit(module, fixed_loader(n=96))
    assert callback.engine.variant.alpha == alphas[-1] and callback.engine.variant.searches == 2
    assert_fp64_close(module.net, expected)

    net = test_bar.TwoFactorNet()
    expected, _ = test_bar.reference_run(copy.deepcopy(net).double(), double_batches(), epochs=1, total_steps=6)
    module = test_bar.ScheduledClassifier(net)  # fp32: the Trainer converts it
    callback = SAMCallback("bar", total_steps=6)
    quiet_trainer(precision="64-true", max_epochs=1, callbacks=[callback]).fit(module, fixed_loader(n=96))
    assert callback.engine.variant.steps == 6
    assert_fp64_close(module.net, expected)
