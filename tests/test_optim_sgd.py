"""``manualbp.optim.SGD`` against ``torch.optim.SGD``.

Every test runs on the reference backend, and also on the Triton backend when the kernels can
run here (CUDA, or the CPU interpreter under ``TRITON_INTERPRET=1``, which ``tests/conftest.py``
sets without a GPU).
"""

from __future__ import annotations

import copy
import itertools
import os
import re

import pytest
import torch

from manualbp import use_backend
from manualbp.optim.sgd import SGD

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BACKENDS = [
    "reference",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(not _TRITON_OK, reason="needs CUDA or TRITON_INTERPRET=1"),
    ),
]
SHAPES = [(7, 5), (5,), (1,), (3, 4)]
STEPS = 20


@pytest.fixture(params=BACKENDS)
def backend(request):
    with use_backend(request.param):
        yield request.param


def _params(dtypes=(torch.float32,), shapes=SHAPES) -> list[torch.nn.Parameter]:
    out = []
    for i, s in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        out.append(torch.nn.Parameter(torch.randn(s, dtype=torch.float64, device=DEVICE).to(dtype)))
    return out


def _twin(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _set_grads(*param_lists, seed: int) -> None:
    """The same pseudo-random gradient (a function of the step and of p) in every list."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for i, ps in enumerate(zip(*param_lists)):
        noise = torch.randn(ps[0].shape, generator=gen, dtype=torch.float64)
        for p in ps:
            p.grad = (noise.to(DEVICE) + 0.1 * p.detach().double().sin()).to(p.dtype)
        del i


def _tol(dtype: torch.dtype) -> dict:
    rtol, atol = {
        torch.float16: (1e-3, 1e-5),
        torch.bfloat16: (1.6e-2, 1e-5),
        torch.float32: (1.3e-6, 1e-5),
        torch.float64: (1e-7, 1e-7),
    }[dtype]  # torch.testing.assert_close's defaults
    return dict(rtol=rtol, atol=atol)


def _assert_same(ours, theirs, steps: int = STEPS) -> None:
    for a, b in zip(ours, theirs):
        tol = _tol(a.dtype)
        if a.dtype in (torch.float16, torch.bfloat16):
            # torch rounds every intermediate (g + wd*p, the buffer, ...) to fp16/bf16, the
            # kernel keeps them in fp32: up to an ulp of the largest value per step (a whole
            # ulp: in bf16 under Triton's CPU interpreter the kernel's stores truncate
            # fp32 -> bf16 where torch rounds to nearest).
            tol["atol"] = steps * torch.finfo(a.dtype).eps * b.detach().abs().max().item()
        torch.testing.assert_close(a.detach(), b.detach(), **tol)


OPTIONS = [
    dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx, lr=lr)
    for m, d, wd, n, mx, lr in itertools.product(
        [0.0, 0.9], [0.0, 0.1], [0.0, 1e-2], [False, True], [False, True], ["float", "tensor"]
    )
    if not (n and (m == 0 or d != 0))
]


def _lr(kind: str, value: float = 0.05):
    return torch.tensor(value) if kind == "tensor" else value


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_matches_torch(backend, opts):
    ours = _params()
    theirs = _twin(ours)
    kw = {**opts, "lr": _lr(opts["lr"])}
    opt = SGD(ours, **kw)
    ref = torch.optim.SGD(theirs, **{**kw, "lr": _lr(opts["lr"])}, foreach=False)
    for step in range(STEPS):
        _set_grads(ours, theirs, seed=step)
        opt.step()
        ref.step()
    _assert_same(ours, theirs)
    for p, q in zip(ours, theirs):
        if opts["momentum"] != 0:
            torch.testing.assert_close(
                opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], **_tol(p.dtype)
            )
        else:
            assert "momentum_buffer" not in opt.state[p]


def test_groups_and_mixed_dtypes(backend):
    """Two groups with their own hyper-parameters; each group mixes fp32, fp64 and fp16 params
    (fp16 run for fewer steps: torch rounds every intermediate to fp16, the kernel does not)."""
    for dtypes, steps in (((torch.float32, torch.float64), STEPS), ((torch.float16,), 3)):
        a, b = _params(dtypes), _params(dtypes[::-1])
        a2, b2 = _twin(a), _twin(b)
        groups = [
            {"params": a, "momentum": 0.9, "nesterov": True},
            {"params": b, "lr": 0.02, "weight_decay": 0.1, "maximize": True},
        ]
        twin_groups = [{**groups[0], "params": a2}, {**groups[1], "params": b2}]
        opt = SGD(groups, lr=0.05)
        ref = torch.optim.SGD(twin_groups, lr=0.05, foreach=False)
        for step in range(steps):
            _set_grads(a + b, a2 + b2, seed=step)
            opt.step()
            ref.step()
        _assert_same(a + b, a2 + b2, steps)


def test_params_without_grad_are_skipped(backend):
    ours = _params()
    opt = SGD(ours, lr=0.1, momentum=0.9)
    frozen = ours[1].detach().clone()
    _set_grads(ours, seed=0)
    ours[1].grad = None
    opt.step()
    assert torch.equal(ours[1].detach(), frozen)
    assert "momentum_buffer" not in opt.state[ours[1]]


def test_non_contiguous_params(backend):
    """Transposed params (and so grads) are fine: the Triton backend routes them to the
    reference path."""
    ours = [
        torch.nn.Parameter(torch.randn(4, 6, device=DEVICE).t()),
        torch.nn.Parameter(torch.randn(6, 4, device=DEVICE)[:, ::2]),
        torch.nn.Parameter(torch.randn(6, 4, device=DEVICE)),
    ]
    assert not ours[0].is_contiguous() and not ours[1].is_contiguous()
    theirs = _twin(ours)
    opt = SGD(ours, lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, foreach=False)
    for step in range(5):
        _set_grads(ours, theirs, seed=step)
        opt.step()
        ref.step()
    _assert_same(ours, theirs)


@pytest.mark.parametrize("direction", ["ours->torch", "torch->ours"])
def test_state_dict_round_trip(backend, direction):
    kw = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)
    p1 = _params()
    p2 = _twin(p1)
    first_cls, second_cls = (SGD, torch.optim.SGD) if direction == "ours->torch" else (
        torch.optim.SGD, SGD)  # fmt: skip
    first = first_cls(p1, **kw)
    # Run 5 steps with the first optimizer, on both param copies (p2 follows via a copy).
    for step in range(5):
        _set_grads(p1, seed=step)
        first.step()
    with torch.no_grad():
        for a, b in zip(p1, p2):
            b.copy_(a)
    second = second_cls(p2, lr=1.0)  # hyper-parameters come from the state dict
    # deepcopy, as torch.save/torch.load would: load_state_dict keeps the very tensors it is
    # given when dtype and device already match, so both optimizers would share the buffers.
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    assert second.param_groups[0]["momentum"] == 0.9
    for step in range(5, 10):
        _set_grads(p1, p2, seed=step)
        first.step()
        second.step()
    _assert_same(p1, p2)
    # And the formats are the same: state keys, group keys.
    sd1, sd2 = first.state_dict(), second.state_dict()
    assert sd1["state"].keys() == sd2["state"].keys()
    assert all(sd1["state"][k].keys() == {"momentum_buffer"} for k in sd1["state"])
    assert {k for k in sd1["param_groups"][0]} == {k for k in sd2["param_groups"][0]}


def test_closure(backend):
    ours = _params()
    opt = SGD(ours, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = sum((p.double() ** 2).sum() for p in ours)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in ours]
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    for p, b in zip(ours, before):
        torch.testing.assert_close(p.detach(), b - 0.1 * 2 * b)


# ------------------------------------------------------------------------------------------
# Sparse gradients: torch's single-tensor path, same values; same rejections, nothing written.
# ------------------------------------------------------------------------------------------
SPARSE_OPTIONS = [
    dict(momentum=m, dampening=d, nesterov=n, maximize=mx, lr=lr)
    for m, d, n, mx, lr in itertools.product(
        [0.0, 0.9], [0.0, 0.1], [False, True], [False, True], ["float", "tensor"]
    )
    if not (n and (m == 0 or d != 0))
]


def _sparse_model(dtype=torch.float64):
    """Parameters in three groups: dense, sparse (an Embedding's weight), and both."""
    emb = torch.nn.Embedding(11, 4, sparse=True).to(dtype=dtype, device=DEVICE)
    emb2 = torch.nn.Embedding(7, 3, sparse=True).to(dtype=dtype, device=DEVICE)
    lin = torch.nn.Linear(4, 2).to(dtype=dtype, device=DEVICE)
    head = torch.nn.Parameter(torch.randn(3, dtype=dtype, device=DEVICE))
    return (
        torch.nn.ModuleList([emb, emb2, lin]),
        [
            {"params": list(lin.parameters())},
            {"params": [emb.weight]},
            {"params": [head, emb2.weight]},
        ],
        head,
    )


def _sparse_twins(dtype=torch.float64):
    ours, groups, head = _sparse_model(dtype)
    theirs = copy.deepcopy(ours)
    head2 = torch.nn.Parameter(head.detach().clone())
    groups2 = [
        {"params": list(theirs[2].parameters())},
        {"params": [theirs[0].weight]},
        {"params": [head2, theirs[1].weight]},
    ]
    return (ours, groups, head), (theirs, groups2, head2)


def _sparse_loss(model, head, step):
    gen = torch.Generator(device="cpu").manual_seed(step)
    idx = torch.randint(0, 11, (9,), generator=gen).to(DEVICE)  # repeats: uncoalesced grads
    idx2 = torch.randint(0, 7, (5,), generator=gen).to(DEVICE)
    emb, emb2, lin = model
    return lin(emb(idx)).pow(2).sum() + (emb2(idx2) * head).sin().sum()


def _flat(groups) -> list[torch.Tensor]:
    return [p for g in groups for p in g["params"]]


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.layout != torch.strided else t


@pytest.mark.parametrize(
    "opts", SPARSE_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
def test_sparse_gradients_match_torch(backend, opts):
    (ours, groups, head), (theirs, groups2, head2) = _sparse_twins()
    kw = {**opts, "lr": _lr(opts["lr"])}
    opt = SGD(groups, **kw)
    ref = torch.optim.SGD(groups2, **{**kw, "lr": _lr(opts["lr"])}, foreach=False)
    for step in range(5):
        for model, h, o in ((ours, head, opt), (theirs, head2, ref)):
            o.zero_grad()
            _sparse_loss(model, h, step).backward()
        assert ours[0].weight.grad.is_sparse and theirs[0].weight.grad.is_sparse
        opt.step()
        ref.step()
    for p, q in zip(_flat(groups), _flat(groups2), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)
        if opts["momentum"] != 0:
            a, b = opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"]
            assert a.layout == b.layout  # sparse where torch keeps a sparse buffer
            torch.testing.assert_close(_dense(a), _dense(b), rtol=1e-12, atol=1e-12)
        else:
            assert "momentum_buffer" not in opt.state[p]


def _snapshot(opt, params):
    """Everything a step may write: values, gradients (and their layout), optimizer state."""
    grads = [None if p.grad is None else (p.grad.layout, _dense(p.grad).clone()) for p in params]
    return [p.detach().clone() for p in params], grads, copy.deepcopy(opt.state_dict())


def _assert_unchanged(before, after):
    (vals0, grads0, sd0), (vals1, grads1, sd1) = before, after
    for a, b in zip(vals0, vals1, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(grads0, grads1, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert sd0["param_groups"] == sd1["param_groups"]
    assert sd0["state"].keys() == sd1["state"].keys()
    for k, st in sd0["state"].items():
        assert st.keys() == sd1["state"][k].keys()
        for name, v in st.items():
            w = sd1["state"][k][name]
            assert v.layout == w.layout and torch.equal(_dense(v), _dense(w))


def _prime_sparse_buffer(opt_kw):
    """A step with a sparse gradient and momentum, then a dense gradient for that param."""

    def setup(opt, groups):
        emb = groups[1]["params"][0]
        emb.grad = torch.randn(emb.shape, dtype=emb.dtype, device=DEVICE).to_sparse()
        opt.step()
        emb.grad = torch.randn(emb.shape, dtype=emb.dtype, device=DEVICE)

    return opt_kw, setup


def _mismatched_buffer(opt_kw):
    def setup(opt, groups):
        emb = groups[1]["params"][0]
        opt.state[emb]["momentum_buffer"] = torch.zeros(3, device=DEVICE, dtype=emb.dtype)

    return opt_kw, setup


REJECTED = {
    "weight_decay": (dict(lr=0.1, weight_decay=1e-2), None),
    "weight_decay_momentum": (dict(lr=0.1, weight_decay=1e-2, momentum=0.9), None),
    "fused": (dict(lr=0.1, fused=True), None),
    "dense_after_sparse_buffer": _prime_sparse_buffer(dict(lr=0.1, momentum=0.9)),
    "mismatched_buffer": _mismatched_buffer(dict(lr=0.1, momentum=0.9)),
    "lr_requires_grad": (dict(lr=torch.tensor(0.1, requires_grad=True)), None),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_rejected_steps_raise_like_torch_and_change_nothing(backend, case):
    """Torch raises on these; it may first update the dense group (it does for all but
    ``fused``). Ours raises the same exception type and writes nothing."""
    opt_kw, setup = REJECTED[case]
    (ours, groups, head), (theirs, groups2, head2) = _sparse_twins()
    opt = SGD(groups, **opt_kw)
    ref = torch.optim.SGD(groups2, **opt_kw, foreach=False)
    for model, h, o, g in ((ours, head, opt, groups), (theirs, head2, ref, groups2)):
        o.zero_grad()
        _sparse_loss(model, h, 0).backward()
        if setup is not None:
            setup(o, g)
    with pytest.raises(Exception) as native:
        ref.step()
    before = _snapshot(opt, _flat(groups))
    with pytest.raises(type(native.value)):
        opt.step()
    _assert_unchanged(before, _snapshot(opt, _flat(groups)))


def test_triton_backend_unavailable_changes_nothing(monkeypatch):
    """Resolving the backend can fail ('triton' on CPU tensors without the interpreter): that
    too happens before the first write, not after the first group's update."""
    if torch.cuda.is_available():
        pytest.skip("CUDA tensors resolve to Triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float32))
    opt = SGD([{"params": [a]}, {"params": [b]}], lr=0.1, momentum=0.9)
    a.grad, b.grad = torch.randn(3, dtype=torch.float64), torch.randn(3)
    before = _snapshot(opt, [a, b])
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        opt.step()
    _assert_unchanged(before, _snapshot(opt, [a, b]))


BAD_ARGS = [
    dict(lr=-0.1),
    dict(lr=torch.tensor([0.1, 0.2])),
    dict(momentum=-0.5),
    dict(weight_decay=-1e-3),
    dict(nesterov=True),
    dict(nesterov=True, momentum=0.9, dampening=0.1),
    dict(fused=True, differentiable=True),
    dict(fused=True, foreach=True),
]


@pytest.mark.parametrize("kwargs", BAD_ARGS, ids=lambda k: ",".join(k))
def test_constructor_validation_matches_torch(kwargs):
    def raised(cls):
        p = torch.nn.Parameter(torch.randn(3))
        with pytest.raises(Exception) as info:
            cls([p], **kwargs)
        return type(info.value), str(info.value)

    assert raised(SGD) == raised(torch.optim.SGD)


def test_defaults_match_torch():
    p = torch.nn.Parameter(torch.randn(3))
    assert SGD([p]).defaults == torch.optim.SGD([p]).defaults
    assert isinstance(SGD([p]), torch.optim.SGD)


def test_differentiable_is_not_supported():
    with pytest.raises(NotImplementedError, match=re.escape("differentiable=True")):
        SGD([torch.nn.Parameter(torch.randn(3))], differentiable=True)


def test_tensor_lr_can_change_in_place(backend):
    """A tensor lr is read at every step (an LR schedule may write into it)."""
    ours = _params()
    theirs = _twin(ours)
    lr = torch.tensor(0.05)
    opt = SGD(ours, lr=lr, momentum=0.9)
    ref = torch.optim.SGD(theirs, lr=0.05, momentum=0.9, foreach=False)
    for step in range(6):
        _set_grads(ours, theirs, seed=step)
        opt.step()
        ref.step()
        lr.mul_(0.5)
        ref.param_groups[0]["lr"] *= 0.5
    _assert_same(ours, theirs)


def test_triton_backend_launches_once_per_device_dtype_split(monkeypatch):
    if not _TRITON_OK:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    import manualbp.kernels.sgd as kernels

    calls = []
    real = kernels.sgd_step_

    def counting(params, *args, **kwargs):
        calls.append((params[0].dtype, len(params)))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(kernels, "sgd_step_", counting)
    ours = _params((torch.float32, torch.float64, torch.float32))
    opt = SGD(ours, lr=0.1, momentum=0.9)
    _set_grads(ours, seed=0)
    with use_backend("triton"):
        opt.step()
    assert sorted(calls, key=str) == sorted([(torch.float32, 3), (torch.float64, 1)], key=str)
