"""Drop-in without surprises (issue 23): one table of user-level cases, native against manualbp.

Each row is a pair of callables, one written with native PyTorch, one with manualbp, run on the
same fresh random inputs (the same seed) on each path: the reference path and the Triton path
(the kernels under Triton's CPU interpreter without a GPU). manualbp must give what native
gives: the same values (within the dtype's ``assert_close`` tolerance: most rows compute in
float64), the same tensor types, the same ``UserWarning``s, or an exception of native's type.
A regression shows as the row's id, ``<finding>/<case>[<path>]``.

Where native has nothing to compare with (``FusedMLP.from_sequential`` on a model it cannot
express), the native callable raises the error a drop-in must raise (:func:`refuses`).

The findings without a row: the choice cache file (7) in ``test_linear_choice.py``; leaving
``manualbp.enable()`` with a foreign mode left entered (8) in ``test_enable.py``; Ctrl-C in
``manualbp demo`` (9) in ``test_cli.py``; bf16 rounding on the GPU (10) in
``tests/kernels/test_linear_kernels.py`` and ``tests/test_mse.py`` (``-m cuda``).
"""

from __future__ import annotations

import copy
import functools
import itertools
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import manualbp
from manualbp import functional
from manualbp.activations import ACTIVATIONS
from manualbp.testing import DEFAULT_TOLERANCES

DT = torch.float64
PATHS = ("reference", "triton")


# --------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """``native()`` and ``ours()`` build their inputs from the same seed and return what is
    compared (tensors, tensor types, names: anything ``==`` or ``assert_close`` compares)."""

    name: str
    native: Callable[[], object]
    ours: Callable[[], object]
    paths: tuple[str, ...] = PATHS
    xfail: tuple[tuple[str, str], ...] = ()  # (path, reason): a known difference, strict


@dataclass(frozen=True)
class Raised:
    type: type[BaseException]
    message: str


def refuses(error: type[Exception], why: str) -> Callable[[], object]:
    """The native side of a row native has no counterpart for: the error a drop-in raises."""

    def native() -> object:
        raise error(why)

    return native


def _outcome(fn: Callable[[], object], seed: int, path: str) -> tuple[object, list[str]]:
    """``fn()``'s value or exception, and the UserWarnings it gave, from seed ``seed``."""
    torch.manual_seed(seed)
    with warnings.catch_warnings(record=True) as caught, manualbp.use_backend(path):
        warnings.simplefilter("always")
        try:
            value: object = fn()
        except Exception as e:  # compared with native's below
            value = Raised(type(e), str(e))
    user = sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)})
    return value, user


def _assert_same(ours: object, native: object, where: str = "") -> None:
    if isinstance(native, Raised):
        assert isinstance(ours, Raised), f"{where}: native raised {native}, manualbp returned"
        assert issubclass(ours.type, native.type), f"{where}: {ours} where native: {native}"
        return
    assert not isinstance(ours, Raised), f"{where}: manualbp raised {ours}"
    if isinstance(native, Tensor):
        assert isinstance(ours, Tensor), where
        assert type(ours) is type(native), f"{where}: {type(ours)} where native {type(native)}"
        assert ours.dtype == native.dtype and ours.device == native.device, where
        if native.device.type == "meta":
            assert ours.shape == native.shape, where
            return
        rtol, atol = DEFAULT_TOLERANCES.get(native.dtype.to_real(), (0.0, 0.0))
        torch.testing.assert_close(
            ours.as_subclass(Tensor), native.as_subclass(Tensor), rtol=rtol, atol=atol,
            msg=lambda m: f"{where}: {m}",
        )  # fmt: skip
    elif isinstance(native, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(native), where
        for i, (o, n) in enumerate(zip(ours, native, strict=True)):
            _assert_same(o, n, f"{where}[{i}]")
    else:
        assert ours == native, f"{where}: {ours!r} where native {native!r}"


# --------------------------------------------------------------------------------------------
# Builders (called inside the row callables: both sides draw the same numbers)
# --------------------------------------------------------------------------------------------
def _x(*shape: int, grad: bool = True, dtype: torch.dtype = DT) -> Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _act(name: str, slope: float = 0.2) -> nn.Module:
    return ACTIVATIONS[name].native_module(slope)


def _stack(widths: tuple[int, ...], act: str = "gelu", slope: float = 0.2,
           last_act: bool = False) -> nn.Sequential:  # fmt: skip
    """``Linear act Linear act ... Linear [act]`` in float64."""
    layers: list[nn.Module] = []
    for i, (k, n) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(k, n, dtype=DT))
        if i < len(widths) - 2 or last_act:
            layers.append(_act(act, slope))
    return nn.Sequential(*layers)


def _step(model: nn.Module, x: Tensor) -> list:
    """The output, then the gradients of ``sum(out^2)`` for every parameter and ``x``."""
    out = model(x)
    out.square().sum().backward()
    return [out, *(p.grad for p in model.parameters()), x.grad]


def _converted(model: nn.Module, **kw) -> nn.Module:
    return manualbp.convert(model, **kw)


def _patch_times_ten(module: nn.Module) -> None:
    """``module.forward`` replaced on the instance by a wrapper that scales its output."""
    old = module.forward
    module.forward = lambda *args: old(*args) * 10


def _attach_accelerate_style_hook(module: nn.Module) -> None:
    """As Hugging Face accelerate's ``add_hook_to_module``: a ``functools.partial`` of a new
    forward bound to the module, wrapping the old one."""
    old = module.forward

    def new_forward(mod: nn.Module, *args: Tensor) -> Tensor:
        return old(*(a + 1 for a in args))

    module.forward = functools.update_wrapper(functools.partial(new_forward, module), old)


# --------------------------------------------------------------------------------------------
# 1. A child's forward replaced on the instance runs, as natively
# --------------------------------------------------------------------------------------------
def _patched_row(name: str, widths: tuple[int, ...], index: int, patch=_patch_times_ten) -> Row:
    def run(convert: bool) -> list:
        model = _stack(widths, "gelu")
        if convert:
            _converted(model)
        patch(model[index])
        return _step(model, _x(6, widths[0], grad=False))

    return Row(f"1/{name}", lambda: run(False), lambda: run(True))


ROWS: list[Row] = [
    _patched_row("patched-linear-forward", (5, 7, 4), 0),
    _patched_row("patched-activation-forward", (5, 7, 4), 1),
    _patched_row("patched-last-linear-of-a-fused-mlp-run", (5, 7, 6, 4), 4),
    _patched_row("patched-hidden-linear-of-a-fused-mlp-run", (5, 7, 6, 4), 2),
    _patched_row("accelerate-style-hook", (5, 7, 6, 4), 0, _attach_accelerate_style_hook),
]


# --------------------------------------------------------------------------------------------
# 2. A slice (and a copy) keeps fuse_mlp=False
# --------------------------------------------------------------------------------------------
def _slices(convert: bool) -> list:
    model = _stack((5, 7, 6, 4), "relu")
    if not convert:
        return [[], [], [], model[:3](_x(4, 5, grad=False))]
    _converted(model, fuse_mlp=False)
    copies = [model[:3], copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    return [*(c.mlp_runs() for c in copies), model[:3](_x(4, 5, grad=False))]


ROWS.append(Row("2/slice-deepcopy-pickle-keep-fuse_mlp-False", lambda: _slices(False),
                lambda: _slices(True)))  # fmt: skip


# --------------------------------------------------------------------------------------------
# 3. FusedMLP.from_sequential refuses what it cannot express
# --------------------------------------------------------------------------------------------
class _ScaledLinear(nn.Linear):
    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input) * 2


def _from_sequential(seq: Callable[[], nn.Sequential]) -> Callable[[], object]:
    def ours() -> object:
        model, x = seq(), _x(4, 3, grad=False)  # (from_sequential draws weights, then loads)
        return manualbp.FusedMLP.from_sequential(model)(x)

    return ours


def _patched_seq() -> nn.Sequential:
    seq = _stack((3, 8, 2), "relu")
    _patch_times_ten(seq[2])
    return seq


def _hooked_seq() -> nn.Sequential:
    seq = _stack((3, 8, 2), "relu")
    seq[0].register_forward_hook(lambda m, i, o: o * 2)
    return seq


def _quantizable_seq() -> nn.Sequential:
    # A subclass that keeps nn.Linear's forward (as nn.MultiheadAttention.out_proj's class).
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear as Keeps

    return nn.Sequential(Keeps(3, 8, dtype=DT), nn.ReLU(), Keeps(8, 2, dtype=DT))


ROWS += [
    Row("3/from_sequential-linear-subclass-with-its-own-forward",
        refuses(ValueError, "computes something else"),
        _from_sequential(lambda: nn.Sequential(_ScaledLinear(3, 8, dtype=DT), nn.ReLU(),
                                               nn.Linear(8, 2, dtype=DT)))),
    Row("3/from_sequential-patched-forward", refuses(ValueError, "skips the patch"),
        _from_sequential(_patched_seq)),
    Row("3/from_sequential-hooked-module", refuses(ValueError, "skips the hook"),
        _from_sequential(_hooked_seq)),
    Row("3/from_sequential-empty", refuses(ValueError, "nothing to express"),
        lambda: manualbp.FusedMLP.from_sequential(nn.Sequential())),
    Row("3/from_sequential-subclass-keeping-linear-forward",
        lambda: _quantizable_seq()(_x(4, 3, grad=False)), _from_sequential(_quantizable_seq)),
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# 4. Tensor subclasses: their __torch_function__ sees the ops, they get their type back
# --------------------------------------------------------------------------------------------
_OPS = {"linear", "mse_loss", "gelu", "relu", "tanh", "silu", "sigmoid", "leaky_relu"}


class Logged(Tensor):
    """Records the ops of interest its ``__torch_function__`` is handed."""

    seen: ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _OPS:
            cls.seen.append(name)
        return super().__torch_function__(func, types, args, kwargs or {})


def _logged(t: Tensor) -> Tensor:
    return t.detach().as_subclass(Logged).requires_grad_(t.requires_grad)


def _subclass_linear(ours: bool, which: str) -> list:
    Logged.seen = []
    x, w, b = _x(5, 3), _x(4, 3), _x(4)
    if which == "input":
        x = _logged(x)
    else:
        w = _logged(w)
    y = functional.linear(x, w, b, "gelu") if ours else F.gelu(F.linear(x, w, b))
    y.sum().backward()
    return [type(y), list(Logged.seen), y, x.grad, w.grad, b.grad]


def _subclass_mse(ours: bool, which: str) -> list:
    Logged.seen = []
    x, t = _x(5, 3), _x(5, 3, grad=False)
    x, t = (_logged(x), t) if which == "input" else (x, _logged(t))
    loss = (functional.mse_loss if ours else F.mse_loss)(x, t)
    loss.backward()
    return [type(loss), list(Logged.seen), loss, x.grad]


def _subclass_sequential(ours: bool) -> list:
    Logged.seen = []
    model = _stack((3, 8, 8, 2), "relu")
    if ours:
        _converted(model)
    x = _logged(_x(5, 3))
    y = model(x)
    y.sum().backward()
    return [type(y), list(Logged.seen), y, x.grad, *(p.grad for p in model.parameters())]


def _subclass_fused_mlp_module(ours: bool) -> list:
    Logged.seen = []
    x, t = _logged(_x(5, 3)), _x(5, 2, grad=False)
    mlp = manualbp.FusedMLP(3, 8, 2, 1, "relu", dtype=DT)
    model = mlp if ours else mlp.to_sequential()
    y = model(x)
    loss = mlp.mse_loss(x, t) if ours else F.mse_loss(model(x), t)
    (y.sum() + loss).backward()
    return [type(y), type(loss), list(Logged.seen), y, loss, x.grad,
            *(p.grad for p in model.parameters())]  # fmt: skip


def _subclass_target_folded_loss(ours: bool) -> list:
    Logged.seen = []
    model = _stack((3, 8, 8, 2), "relu")
    x, t = _x(5, 3, grad=False), _logged(_x(5, 2, grad=False))
    loss = _converted(model.append(nn.MSELoss()))(x, t) if ours else F.mse_loss(model(x), t)
    loss.backward()
    return [type(loss), list(Logged.seen), loss, *(p.grad for p in model.parameters())]


ROWS += [
    Row("4/subclass-input-linear", lambda: _subclass_linear(False, "input"),
        lambda: _subclass_linear(True, "input")),
    Row("4/subclass-weight-linear", lambda: _subclass_linear(False, "weight"),
        lambda: _subclass_linear(True, "weight")),
    Row("4/subclass-input-mse", lambda: _subclass_mse(False, "input"),
        lambda: _subclass_mse(True, "input")),
    Row("4/subclass-target-mse", lambda: _subclass_mse(False, "target"),
        lambda: _subclass_mse(True, "target")),
    Row("4/subclass-through-a-converted-sequential", lambda: _subclass_sequential(False),
        lambda: _subclass_sequential(True)),
    Row("4/subclass-through-a-fused-mlp-module", lambda: _subclass_fused_mlp_module(False),
        lambda: _subclass_fused_mlp_module(True)),
    Row("4/subclass-target-of-a-folded-loss", lambda: _subclass_target_folded_loss(False),
        lambda: _subclass_target_folded_loss(True)),
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# 5. In-place updates between forward and backward: accepted where native accepts them
# --------------------------------------------------------------------------------------------
# (activation, slope): every registry activation, leaky_relu with a negative slope too (it
# saves the pre-activation, as GELU and SiLU do).
_ACTS = [(name, 0.2) for name in ACTIVATIONS] + [("leaky_relu", -0.2)]
# struct: widths, and whether the activation also follows the last layer.
_STRUCTS = {
    "single": ((5, 7), True),  # manualbp.Linear(activation=...) against Linear + activation
    "pair": ((5, 7), True),  # a converted Sequential: Linear + activation module, fused
    "chain": ((5, 130, 4), True),  # too wide for a fused MLP run: the cross-layer chain
    "mlp": ((5, 7, 6, 4), False),  # a fused MLP run
}
# (what is changed in place, which layer, whether the input requires grad)
_CHANGES = {
    "single": [("bias", 0, False), ("weight", 0, False), ("weight", 0, True)],
    "chain": [
        ("bias", 0, False),
        ("weight", 0, False),
        ("weight", 0, True),
        ("bias", -1, False),
        ("weight", -1, False),
    ],
}
_CHANGES["pair"] = _CHANGES["single"]
_CHANGES["mlp"] = _CHANGES["chain"]


def _in_place(struct: str, act: str, slope: float, what: str, layer: int, x_grad: bool,
              ours: bool) -> object:  # fmt: skip
    widths, last_act = _STRUCTS[struct]
    native = _stack(widths, act, slope, last_act=last_act)
    x = _x(3, widths[0], grad=x_grad)
    if not ours:
        model = native
    elif struct == "single":
        model = manualbp.Linear(5, 7, dtype=DT, activation=act, negative_slope=slope)
        model.load_state_dict(native[0].state_dict())
    else:
        model = _converted(native)
    out = model(x)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        getattr(linears[layer], what).mul_(1.5)
    out.square().sum().backward()
    return [out, *(p.grad for p in model.parameters()), x.grad]


for _struct, _changes in _CHANGES.items():
    for _act_name, _slope in _ACTS:
        for _what, _layer, _x_grad in _changes:
            _args = (_struct, _act_name, _slope, _what, _layer, _x_grad)
            ROWS.append(Row(
                f"5/{_struct}-{_act_name}{'' if _slope > 0 else '-negative-slope'}-"
                f"{_what}{_layer}-changed{'-x-requires-grad' if _x_grad else ''}",
                functools.partial(_in_place, *_args, ours=False),
                functools.partial(_in_place, *_args, ours=True),
            ))  # fmt: skip


# --------------------------------------------------------------------------------------------
# 6. Where the hand-derived path does not apply: native's op, never a new error
# --------------------------------------------------------------------------------------------
def _complex_linear(convert: bool) -> list:
    model = nn.Sequential(nn.Linear(3, 4, dtype=torch.complex128))
    if convert:
        _converted(model)
    x = _x(5, 3, dtype=torch.complex128)
    y = model(x)
    y.abs().sum().backward()
    return [y, x.grad, *(p.grad for p in model.parameters())]


def _draw(shape: tuple[int, ...], dtype: torch.dtype, grad: bool = True) -> Tensor:
    if dtype.is_floating_point or dtype.is_complex:
        return _x(*shape, dtype=dtype, grad=grad)
    return torch.randint(-3, 4, shape, dtype=dtype)


def _mse_fn(mse: Callable, reduction: str, x_shape, t_shape, dtype=DT) -> list:
    x, t = _draw(x_shape, dtype), _draw(t_shape, dtype, grad=False)
    loss = mse(x, t, reduction=reduction)
    loss.sum().backward()
    return [loss, x.grad]


def _linear_fn(lin: Callable, x_shape, w_shape, b_shape=None, dtypes=(DT, DT, DT)) -> list:
    x, w = _draw(x_shape, dtypes[0]), _draw(w_shape, dtypes[1])
    b = None if b_shape is None else _draw(b_shape, dtypes[2])
    y = lin(x, w, b)
    if y.requires_grad:
        y.sum().abs().backward()
    return [y, x.grad, w.grad, None if b is None else b.grad]


def _mse_module(cls: type[nn.Module]) -> Callable[[], list]:
    return lambda: _mse_fn(lambda x, t, reduction: cls(reduction=reduction)(x, t),
                           "elementwise_mean", (4, 3), (4, 3))  # fmt: skip


_LONG, _CPLX = torch.long, torch.complex128
ROWS += [
    Row("6/complex-linear-after-convert", lambda: _complex_linear(False),
        lambda: _complex_linear(True)),
    Row("6/elementwise_mean", lambda: _mse_fn(F.mse_loss, "elementwise_mean", (4, 3), (4, 3)),
        lambda: _mse_fn(functional.mse_loss, "elementwise_mean", (4, 3), (4, 3))),
    Row("6/elementwise_mean-module", _mse_module(nn.MSELoss), _mse_module(manualbp.MSELoss)),
    Row("6/unknown-reduction", lambda: _mse_fn(F.mse_loss, "avg", (4, 3), (4, 3)),
        lambda: _mse_fn(functional.mse_loss, "avg", (4, 3), (4, 3))),
    Row("6/1d-weight", lambda: _linear_fn(F.linear, (5, 3), (3,)),
        lambda: _linear_fn(functional.linear, (5, 3), (3,))),
    Row("6/1d-weight-1d-input", lambda: _linear_fn(F.linear, (3,), (3,)),
        lambda: _linear_fn(functional.linear, (3,), (3,))),
    Row("6/1d-weight-with-a-bias", lambda: _linear_fn(F.linear, (5, 3), (3,), (1,)),
        lambda: _linear_fn(functional.linear, (5, 3), (3,), (1,))),
    Row("6/integer-linear", lambda: _linear_fn(F.linear, (5, 3), (4, 3), (4,), (_LONG,) * 3),
        lambda: _linear_fn(functional.linear, (5, 3), (4, 3), (4,), (_LONG,) * 3)),
    Row("6/complex-linear", lambda: _linear_fn(F.linear, (5, 3), (4, 3), (4,), (_CPLX,) * 3),
        lambda: _linear_fn(functional.linear, (5, 3), (4, 3), (4,), (_CPLX,) * 3)),
    Row("6/integer-mse", lambda: _mse_fn(F.mse_loss, "mean", (4,), (4,), dtype=_LONG),
        lambda: _mse_fn(functional.mse_loss, "mean", (4,), (4,), dtype=_LONG)),
    Row("6/complex-mse", lambda: _mse_fn(F.mse_loss, "sum", (4,), (4,), dtype=_CPLX),
        lambda: _mse_fn(functional.mse_loss, "sum", (4,), (4,), dtype=_CPLX)),
    Row("6/weight-on-another-device",
        lambda: [F.linear(_x(2, 3), _x(4, 3).to("meta")).device.type],
        lambda: [functional.linear(_x(2, 3), _x(4, 3).to("meta")).device.type]),
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# 9. Errors of native's types, and no TracerWarnings native does not give
# --------------------------------------------------------------------------------------------
def _linear_error(lin: Callable, x_dtype, w_dtype, b_dtype) -> object:
    x, w, b = _x(2, 3, dtype=x_dtype), _x(4, 3, dtype=w_dtype), _x(4, dtype=b_dtype)
    return lin(x, w, b)


def _module_error(convert: bool) -> object:
    model = nn.Sequential(nn.Linear(3, 4, dtype=torch.float32), nn.ReLU())
    if convert:
        _converted(model)
    return model(_x(2, 3))  # float64 into a float32 layer


def _target_without_loss(convert: bool) -> object:
    model = _stack((3, 4, 2))
    if convert:
        _converted(model)
    return model(_x(2, 3), _x(2, 2))


def _tracer_warnings(fn: Callable[[], object]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]


def _trace(how: str) -> list[str]:
    model = _stack((5, 8, 8, 3), "gelu")
    if how == "convert":
        _converted(model)
    x = _x(4, 5, grad=False)
    if how == "enable":
        with manualbp.enable():
            return _tracer_warnings(lambda: torch.jit.trace(model, x))
    return _tracer_warnings(lambda: torch.jit.trace(model, x))


_F32, _F16 = torch.float32, torch.float16
ROWS += [
    Row("9/dtype-mismatch-weight", lambda: _linear_error(F.linear, DT, _F32, DT),
        lambda: _linear_error(functional.linear, DT, _F32, DT)),
    Row("9/dtype-mismatch-bias", lambda: _linear_error(F.linear, _F32, _F32, _F16),
        lambda: _linear_error(functional.linear, _F32, _F32, _F16)),
    Row("9/dtype-mismatch-converted-module", lambda: _module_error(False),
        lambda: _module_error(True)),
    Row("9/dtype-mismatch-head", lambda: F.mse_loss(F.linear(_x(2, 3), _x(4, 3, dtype=_F32)),
                                                    _x(2, 4)),
        lambda: functional.linear_mse_loss(_x(2, 3), _x(4, 3, dtype=_F32), None, _x(2, 4))),
    Row("9/target-for-a-sequential-without-a-loss", lambda: _target_without_loss(False),
        lambda: _target_without_loss(True)),
    Row("9/jit-trace-of-a-converted-sequential", lambda: _trace("native"),
        lambda: _trace("convert")),
    Row("9/jit-trace-under-enable", lambda: _trace("native"), lambda: _trace("enable")),
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
def _params() -> list:
    out = []
    for row in ROWS:
        reasons = dict(row.xfail)
        for path in row.paths:
            marks = (
                [pytest.mark.xfail(strict=True, reason=reasons[path])] if path in reasons else []
            )
            out.append(pytest.param(row, path, id=f"{row.name}[{path}]", marks=marks))
    return out


@pytest.mark.parametrize("row, path", _params())
def test_drop_in(row: Row, path: str):
    seed = int(torch.randint(2**31 - 1, ()).item())  # fresh per test id (conftest's seed)
    native, native_warnings = _outcome(row.native, seed, path)
    ours, our_warnings = _outcome(row.ours, seed, path)
    _assert_same(ours, native, row.name)
    assert our_warnings == native_warnings


# --------------------------------------------------------------------------------------------
# Around the table
# --------------------------------------------------------------------------------------------
def test_the_rows_reach_the_fused_paths_they_name():
    """On the Triton path the in-place rows run the fused ops they are about (else a row
    would pass by running layer by layer)."""
    names = {}
    for struct in ("pair", "chain", "mlp"):
        widths, last_act = _STRUCTS[struct]
        model = _converted(_stack(widths, "gelu", last_act=last_act))
        with manualbp.use_backend("triton"):
            node = model(_x(3, widths[0])).grad_fn
        if type(node).__name__ == "ViewBackward0":  # the fused MLP's rows back to (*, N)
            node = node.next_functions[0][0]
        names[struct] = type(node).__name__
    assert names == {"pair": "LinearFunctionBackward", "chain": "LinearChainFunctionBackward",
                     "mlp": "FusedMLPFunctionBackward"}  # fmt: skip
    model = _converted(_stack((5, 7, 6, 4), "relu"))
    _attach_accelerate_style_hook(model[2])
    with manualbp.use_backend("triton"):  # the hooked layer splits the run
        assert [s.kind for s, _ in model._plan()] == ["pair", "module", "module", "module"]


_SHAPE_ERRORS = {
    "width": (lambda f: f(torch.randn(2, 5), torch.randn(4, 3)), functional.linear, F.linear),
    "width-3d": (lambda f: f(torch.randn(6, 2, 5), torch.randn(4, 3)), functional.linear,
                 F.linear),
    "bias": (lambda f: f(torch.randn(2, 3), torch.randn(4, 3), torch.randn(2)),
             functional.linear, F.linear),
    "input-0d": (lambda f: f(torch.tensor(1.0), torch.randn(4, 3)), functional.linear,
                 F.linear),
    "mse-broadcast": (lambda f: f(torch.randn(2, 3, 4), torch.randn(5, 4)), functional.mse_loss,
                      F.mse_loss),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_SHAPE_ERRORS))
def test_shape_errors_say_what_native_says(case):
    """A ShapeError (a RuntimeError, as natively) whose text carries native's (up to its
    trailing detail, where native's lists internal sizes)."""
    call, ours, native = _SHAPE_ERRORS[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the size-mismatch warning
        with pytest.raises(RuntimeError) as want:
            call(native)
        with pytest.raises(manualbp.ShapeError) as got:
            call(ours)
    stem = str(want.value).split(" at non-singleton dimension 1.")[0]
    assert stem.lower() in str(got.value).lower(), (str(got.value), str(want.value))


def _ops(gm: torch.fx.GraphModule) -> set[str]:
    """The call targets of a Dynamo graph and of its subgraphs (autograd.Functions' bodies)."""
    return {str(n.target) for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if n.op == "call_function"}  # fmt: skip


@pytest.mark.parametrize("index", [0, 1, 4], ids=["first-linear", "activation", "last-linear"])
def test_a_forward_patched_after_compiling_recompiles(index):
    """torch.compile guards on the children's ``forward`` (``runs_as_written``): a forward
    replaced on the instance after compiling a fused MLP run recompiles and runs, as natively
    (finding 1)."""
    graphs: list[set[str]] = []

    def backend(gm, _inputs):
        graphs.append(_ops(gm))
        return gm.forward

    torch._dynamo.reset()
    try:
        native = _stack((5, 7, 6, 4), "gelu")
        ours = _converted(copy.deepcopy(native))
        x = _x(6, 5, grad=False)
        compiled = torch.compile(ours, backend=backend, fullgraph=True)
        with manualbp.use_backend("triton"):
            torch.testing.assert_close(compiled(x), native(x))
            assert any("mlp_forward" in op for op in graphs[0]), graphs[0]  # the fused run
            for model in (native, ours):
                _patch_times_ten(model[index])
            torch.testing.assert_close(compiled(x), native(x))
        assert len(graphs) == 2  # recompiled for the patch
    finally:
        torch._dynamo.reset()
