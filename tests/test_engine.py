"""SAMEngine in a plain PyTorch loop against the reference, and its mechanics."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import cross_entropy_of, fixed_loader, make_mlp, make_optimizer
from reference import reference_sam_step

from lightning_sam import SAMEngine
from lightning_sam.variants import SAM


def run_engine(net, batches, variant, rho, optimizer_name, use_closure=False, **options):
    optimizer = make_optimizer(optimizer_name, net.parameters())
    engine = SAMEngine(net.named_parameters(), variant, rho, **options)
    for batch in batches:
        loss_of = cross_entropy_of(batch)
        if use_closure:

            def closure(loss_of=loss_of):
                optimizer.zero_grad()
                loss = loss_of(net)
                loss.backward()
                return loss

            engine.step(closure)
        else:
            optimizer.zero_grad()
            loss_of(net).backward()
            engine.ascend()
            optimizer.zero_grad()
            loss_of(net).backward()
            engine.descend()
        optimizer.step()
    return engine


@pytest.mark.parametrize("variant, rho, options", [("sam", 0.05, {}), ("asam", 0.5, {}), ("asam", 0.3, {"eta": 0.1})])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("use_closure", [False, True])
def test_engine_matches_reference(variant, rho, options, optimizer_name, use_closure):
    batches = list(fixed_loader(n=96, batch_size=16))
    net = make_mlp(batchnorm=False)
    reference = copy.deepcopy(net)
    plain = copy.deepcopy(net)
    engine = run_engine(net, batches, variant, rho, optimizer_name, use_closure, **options)
    ref_opt = make_optimizer(optimizer_name, reference.parameters())
    plain_opt = make_optimizer(optimizer_name, plain.parameters())
    for batch in batches:
        reference_sam_step(reference, cross_entropy_of(batch), ref_opt, variant, rho, **options)
        plain_opt.zero_grad()
        cross_entropy_of(batch)(plain).backward()
        plain_opt.step()
    assert engine.step_count == len(batches)
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    # the comparison can fail: SAM moved the weights away from plain training
    assert max((p - r).abs().max().item() for p, r in zip(net.parameters(), plain.parameters())) > 1e-4


def test_restore_is_bit_exact_and_buffer_is_allocated_once():
    net = make_mlp()
    batch = next(iter(fixed_loader()))
    variant = SAM()
    variant.scratch_free = False  # as a variant that writes the weights as scratch: the saved-copy path
    engine = SAMEngine(net.parameters(), variant)
    before = [p.detach().clone() for p in net.parameters()]
    pointers = None
    for _ in range(3):
        net.zero_grad()
        cross_entropy_of(batch)(net).backward()
        norm = engine.ascend()
        assert engine.is_perturbed
        torch.testing.assert_close(norm, torch.tensor(0.05), atol=1e-6, rtol=0)
        assert any(not torch.equal(p, b) for p, b in zip(net.parameters(), before))
        net.zero_grad()
        cross_entropy_of(batch)(net).backward()
        engine.descend()
        assert not engine.is_perturbed
        assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
        current = [v.data_ptr() for v in engine._saved_views]
        assert pointers is None or current == pointers
        pointers = current


def test_swap_step_keeps_no_copy_and_gives_the_parameters_their_own_memory_back():
    """SAM never writes the weights itself: w + e is built in the gradients, the parameters point at them for pass 2
    and back at their own, untouched memory afterwards (bit-exact, no saved buffer)."""
    net = make_mlp()
    batch = next(iter(fixed_loader()))
    engine = SAMEngine(net.parameters(), "sam")
    params = list(net.parameters())
    before = [p.detach().clone() for p in params]
    own = [p.data_ptr() for p in params]
    for _ in range(3):
        net.zero_grad()
        cross_entropy_of(batch)(net).backward()
        grads = [p.grad for p in params]
        e = [g * (0.05 / torch.linalg.vector_norm(torch.stack([x.norm() for x in grads]))) for g in grads]
        engine.ascend()
        assert all(p.grad is None for p in params)  # taken over by the parameters
        assert [p.data_ptr() for p in params] == [g.data_ptr() for g in grads]
        for p, b, x in zip(params, before, e):
            torch.testing.assert_close(p.detach(), b + x, atol=1e-7, rtol=0)
        cross_entropy_of(batch)(net).backward()
        engine.descend()
        assert [p.data_ptr() for p in params] == own
        assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert engine._saved_views is None  # nothing allocated


@pytest.mark.parametrize(
    "variant, options",
    [
        ("sam", {}),
        ("asam", {}),
        ("fsam", {}),
        ("looksam", {}),
        ("ssam", {"mask": "dst", "total_steps": 10}),
        ("xsam", {"steps": 2}),
        ("xsam", {"alpha": 0.5, "alpha_every": 2}),
    ],
    ids=["sam", "asam", "fsam", "looksam", "ssam-dense", "xsam-2-steps", "xsam-search"],
)
def test_scratch_free_variants_step_without_a_copy(variant, options):
    """Every built-in variant whose direction never writes the weights runs without the saved copy: after each whole
    step (every pass, the descent, an alpha search) the parameters are back on their own memory, bit for bit."""
    net = make_mlp()
    batch = next(iter(fixed_loader()))
    engine = SAMEngine(net.parameters(), variant, **options)
    assert engine._can_swap
    params = list(net.parameters())
    before = [p.detach().clone() for p in params]
    own = [p.data_ptr() for p in params]
    closure = cross_entropy_of(batch)

    def training_closure():
        net.zero_grad()
        loss = closure(net)
        loss.backward()
        return loss

    for _ in range(3):
        engine.step(training_closure)
        assert [p.data_ptr() for p in params] == own
        assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert engine._saved_views is None


def test_swap_falls_back_to_a_copy_when_gradients_are_views():
    """Gradients that view a shared buffer (DDP's gradient_as_bucket_view) are written again by pass 2: then the
    engine copies, as for every variant that writes the weights."""
    net = make_mlp()
    batch = next(iter(fixed_loader()))
    engine = SAMEngine(net.parameters(), "sam")
    params = list(net.parameters())
    buffer = torch.zeros(sum(p.numel() for p in params))
    views, offset = [], 0
    for p in params:
        views.append(buffer[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    before = [p.detach().clone() for p in params]
    own = [p.data_ptr() for p in params]
    cross_entropy_of(batch)(net).backward()
    for p, v in zip(params, views):
        v.copy_(p.grad)
        p.grad = v
    engine.ascend()
    assert [p.data_ptr() for p in params] == own  # perturbed in place
    assert engine._saved_views is not None and len(engine._saved_views) == len(params)
    buffer.fill_(1.0)  # what a bucket's next gradients would do: the weights must not care
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    engine.descend()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_parameters_sharing_memory_are_perturbed_in_place():
    base = torch.randn(8)
    first, second = torch.nn.Parameter(base[:4]), torch.nn.Parameter(base[4:])
    engine = SAMEngine([first, second], "sam")
    assert not engine._can_swap
    original = base.clone()
    first.grad, second.grad = torch.ones(4), torch.ones(4)
    engine.ascend()
    assert first.data_ptr() == base.data_ptr()
    torch.testing.assert_close(base, original + 0.05 / 8**0.5, atol=1e-7, rtol=0)  # the shared memory is perturbed
    engine.restore()
    assert torch.equal(base, original)


def test_parameters_without_grad_are_not_perturbed_nor_counted():
    net = make_mlp()
    batch = next(iter(fixed_loader()))
    first = net[0]
    first.weight.requires_grad_(False)
    first.bias.requires_grad_(False)
    engine = SAMEngine(net.named_parameters())
    cross_entropy_of(batch)(net).backward()
    grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    frozen_before = first.weight.detach().clone()
    others_before = [p.detach().clone() for p in net.parameters() if p.requires_grad]
    engine.ascend()
    assert torch.equal(first.weight, frozen_before)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    for p, before, g in zip([p for p in net.parameters() if p.requires_grad], others_before, grads):
        torch.testing.assert_close(p - before, 0.05 * g / norm, atol=1e-7, rtol=0)
    engine.restore()


def test_exception_in_second_pass_leaves_original_weights():
    net = make_mlp()
    batch = next(iter(fixed_loader()))
    engine = SAMEngine(net.parameters())
    before = [p.detach().clone() for p in net.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in pass 2")
        net.zero_grad()
        loss = cross_entropy_of(batch)(net)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="boom"):
        engine.step(closure)
    assert not engine.is_perturbed
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


def test_param_groups_rho_and_exclude():
    net = make_mlp()
    batch = next(iter(fixed_loader()))
    first, last = net[0], net[2]
    groups = [
        {"params": [("w0", first.weight)], "rho": 0.2},
        {"params": [("b0", first.bias)], "sam_exclude": True},
        {"params": [("w2", last.weight), ("b2", last.bias)]},
    ]
    engine = SAMEngine(groups, "sam", rho=0.05)
    assert engine.names == ["w0", "w2", "b2"]
    cross_entropy_of(batch)(net).backward()
    named = dict(zip(["w0", "b0", "w2", "b2"], [first.weight, first.bias, last.weight, last.bias]))
    grads = {n: p.grad.clone() for n, p in named.items()}
    before = {n: p.detach().clone() for n, p in named.items()}
    engine.ascend()
    norm = torch.sqrt(sum((grads[n] ** 2).sum() for n in ("w0", "w2", "b2")))  # the excluded group is not counted
    torch.testing.assert_close(first.weight - before["w0"], 0.2 * grads["w0"] / norm, atol=1e-7, rtol=0)
    torch.testing.assert_close(last.weight - before["w2"], 0.05 * grads["w2"] / norm, atol=1e-7, rtol=0)
    assert torch.equal(first.bias, before["b0"])
    engine.restore()


def test_state_dict_round_trip_and_variant_mismatch():
    net = make_mlp()
    engine = SAMEngine(net.named_parameters(), "asam")
    engine.step_count = 7
    fresh = SAMEngine(net.named_parameters(), "asam")
    fresh.load_state_dict(engine.state_dict())
    assert fresh.step_count == 7
    with pytest.raises(ValueError, match="same variant"):
        SAMEngine(net.named_parameters(), "sam").load_state_dict(engine.state_dict())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"variant": "nope"}, ValueError, "Available variants: asam, "),
        ({"rho": 0.0}, ValueError, "rho must be a finite number > 0"),
        ({"rho": -1.0}, ValueError, "rho must be a finite number > 0"),
        ({"rho": float("nan")}, ValueError, "rho must be a finite number > 0"),
        ({"rho": float("inf")}, ValueError, "rho must be a finite number > 0"),
        ({"variant": "sam", "eta": 0.1}, TypeError, "unknown option"),
        ({"variant": "asam", "eta": -0.1}, ValueError, "eta must be"),
        ({"variant": "asam", "bogus": 1}, TypeError, r"Its options \(defaults\): eta=0.01"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        SAMEngine(make_mlp().parameters(), **kwargs)


def test_no_parameters_and_duplicates():
    with pytest.raises(ValueError, match="no parameters"):
        SAMEngine([])
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="twice"):
        SAMEngine([p, p])
    with pytest.raises(TypeError, match="tensors"):
        SAMEngine([3.0])


def test_from_optimizer_names_and_group_options():
    net = make_mlp()
    optimizer = torch.optim.SGD(
        [
            {"params": [net[0].weight, net[2].weight], "sam_rho": 0.1},
            {"params": [net[0].bias, net[2].bias], "sam_exclude": True},
        ],
        lr=0.1,
    )
    engine = SAMEngine.from_optimizer(optimizer, net, "asam")
    assert engine.names == ["0.weight", "2.weight"]
    assert engine._rhos == [0.1, 0.1]
    unnamed = SAMEngine.from_optimizer(optimizer)
    assert unnamed.names == ["group0.param0", "group0.param1"]


def test_from_optimizer_ignores_adadelta_rho():
    net = make_mlp()
    engine = SAMEngine.from_optimizer(torch.optim.Adadelta(net.parameters()), net, "sam", rho=0.05)
    assert engine._rhos == [0.05] * 4


def test_multi_step_ascent_accumulates_and_restores_the_first_point():
    net = make_mlp()
    batch = next(iter(fixed_loader()))
    engine = SAMEngine(net.parameters(), "sam", rho=0.05)
    before = [p.detach().clone() for p in net.parameters()]
    cross_entropy_of(batch)(net).backward()
    engine.ascend()
    middle = [p.detach().clone() for p in net.parameters()]
    net.zero_grad()
    cross_entropy_of(batch)(net).backward()
    second = engine.ascend()
    torch.testing.assert_close(second, torch.tensor(0.05), atol=1e-6, rtol=0)
    moved = torch.sqrt(sum(((p - m) ** 2).sum() for p, m in zip(net.parameters(), middle)))
    torch.testing.assert_close(moved, torch.tensor(0.05), atol=1e-6, rtol=0)
    net.zero_grad()
    cross_entropy_of(batch)(net).backward()
    engine.descend()
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


def test_asam_refuses_a_second_ascent():
    net = make_mlp()
    batch = next(iter(fixed_loader()))
    engine = SAMEngine(net.parameters(), "asam")
    before = [p.detach().clone() for p in net.parameters()]
    cross_entropy_of(batch)(net).backward()
    engine.ascend()
    cross_entropy_of(batch)(net).backward()  # pass 2, as before a multi-step variant's next ascent
    with pytest.raises(RuntimeError, match="single-step"):
        engine.ascend()
    engine.restore()
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


def test_step_without_any_gradient_runs_no_second_pass():
    net = make_mlp()
    engine = SAMEngine(net.parameters())
    calls = []

    def closure():
        calls.append(1)
        return torch.zeros(())

    engine.step(closure)
    assert calls == [1] and engine.step_count == 1 and not engine.is_perturbed


def test_from_optimizer_names_ignore_compile_wrappers():
    net = make_mlp()
    compiled = torch.compile(net, backend="aot_eager")
    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.1)
    assert SAMEngine.from_optimizer(optimizer, compiled).names == [n for n, _ in net.named_parameters()]
