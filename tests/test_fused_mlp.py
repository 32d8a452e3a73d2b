"""``manualbp.FusedMLP`` and the fused-MLP runs of ``manualbp.Sequential``, held to native.

The oracle is the equivalent native ``nn.Sequential`` of ``nn.Linear`` + activation modules
(``FusedMLP.to_sequential()``), run in the same dtype, with float64 as the exact value: the
fused MLP must be as accurate as native (``max |ours - exact| <= 2 max |native - exact| +
8 eps max |exact|``, see ``tests/kernels/test_fused_mlp_kernels.py``) for the output and for
every gradient. ``backend="triton"`` runs the kernels (under the CPU interpreter without a
GPU); sizes are small and odd for the interpreter's sake.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad

import manualbp
from manualbp.functional import fused_mlp
from manualbp.ops.fused_mlp import MAX_WIDTH
from tests.helpers import ACTIVATION_CASES, count_launches

_KERNELS_RUN = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in (
    "",
    "0",
)
needs_kernels = pytest.mark.skipif(not _KERNELS_RUN, reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = ("mlp_forward_kernel", "mlp_backward_kernel", "mlp_wgrad_kernel",
           "mlp_wgrad_reduce_kernel")  # fmt: skip


@pytest.fixture
def launches(monkeypatch) -> dict[str, int]:
    """Launch counts of the fused-MLP kernels during the test."""
    from manualbp.kernels import fused_mlp as fm

    return count_launches(monkeypatch, fm, KERNELS)


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _results(model, x):
    """Output, input gradient and parameter gradients of ``model`` for ``loss = sum(y * g)``."""
    x = _leaf(x)
    y = model(x)
    g = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
    y.backward(g.to(y.dtype))
    return [y, x.grad, *(p.grad for p in model.parameters())]


def _max_abs(t) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


def assert_as_accurate_as_native(mlp: nn.Module, native: nn.Sequential, x, backend="triton"):
    with manualbp.use_backend(backend):
        got = _results(mlp, x)
    want = _results(native, x)
    exact = _results(copy.deepcopy(native).double(), x.double())
    eps = torch.finfo(x.dtype).eps
    for i, (ours, nat, ex) in enumerate(zip(got, want, exact, strict=True)):
        assert ours.dtype == x.dtype and ours.shape == ex.shape, i
        err, err_native = (_max_abs(t.double() - ex) for t in (ours, nat))
        bound = 2 * err_native + 8 * eps * max(_max_abs(ex), 1.0)
        assert err <= bound, f"result {i}: error {err:.3g} > {bound:.3g} (native {err_native:.3g})"


def _mlp(in_f, hidden, out_f, depth, act, out_act=None, dtype=torch.float32, **kw):
    mlp = manualbp.FusedMLP(in_f, hidden, out_f, depth, act, out_act, device=DEVICE,
                            dtype=dtype, **kw)  # fmt: skip
    return mlp, mlp.to_sequential()


def _x(rows, features, dtype=torch.float32):
    return torch.randn(rows, features, device=DEVICE).to(dtype)


# --------------------------------------------------------------------------------------------
# Parity with native, through the kernels
# --------------------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("activation, slope", ACTIVATION_CASES)
def test_every_activation_matches_native(activation, slope, dtype):
    # fp32: the activation on the hidden layers; fp16: on the output layer too.
    out_act = activation if dtype == torch.float16 else None
    mlp, native = _mlp(3, 16, 5, 2, activation, out_act, dtype, negative_slope=slope)
    assert_as_accurate_as_native(mlp, native, _x(37, 3, dtype))


@needs_kernels
@pytest.mark.parametrize(
    "width, depth, activation, dtype, rows",
    [
        (32, 1, "relu", torch.float32, 37),
        (32, 3, "gelu", torch.float16, 37),
        (32, 4, "tanh", torch.float32, 1),
        (16, 2, "silu", torch.float32, 100),  # four row tiles, four weight-gradient chunks
        (64, 2, "silu", torch.float16, 37),
        (128, 1, "gelu_tanh", torch.float16, 19),
        (16, 8, "relu", torch.float32, 21),
        (16, 0, None, torch.float32, 37),  # a single Linear
        (32, 2, "sigmoid", torch.bfloat16, 37),
    ],
)
def test_widths_depths_and_batch_sizes_match_native(width, depth, activation, dtype, rows):
    mlp, native = _mlp(3, width, 2, depth, activation, None, dtype)
    assert_as_accurate_as_native(mlp, native, _x(rows, 3, dtype))


@needs_kernels
def test_without_bias_and_with_leading_dims():
    mlp, native = _mlp(4, 16, 3, 2, "gelu", "relu", bias=False)
    x = torch.randn(3, 5, 4, device=DEVICE)
    assert_as_accurate_as_native(mlp, native, x)


@needs_kernels
def test_zero_rows_match_native_and_launch_nothing(launches):
    mlp, native = _mlp(3, 16, 2, 2, "relu")
    assert_as_accurate_as_native(mlp, native, _x(0, 3))
    assert sum(launches.values()) == 0


@needs_kernels
def test_launch_counts(launches):
    mlp, _ = _mlp(3, 32, 2, 3, "gelu")
    x = _x(37, 3).requires_grad_()
    with manualbp.use_backend("triton"):
        y = mlp(x)
        assert launches["mlp_forward_kernel"] == 1 and sum(launches.values()) == 1
        y.sum().backward()
        # The chain, the weight gradients, and their reduction (37 rows: two chunks).
        assert launches == dict.fromkeys(KERNELS, 1)
        with torch.no_grad():
            assert mlp(x).grad_fn is None
    assert launches["mlp_forward_kernel"] == 2 and sum(launches.values()) == 5


@needs_kernels
def test_gradcheck_through_the_kernels():
    mlp, _ = _mlp(2, 16, 2, 1, "silu", "tanh", torch.float64)
    params = [p.detach().clone().requires_grad_() for p in mlp.parameters()]
    x = torch.randn(3, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def f(x, *p):
        return fused_mlp(x, p[0::2], p[1::2], "silu", "tanh")

    with manualbp.use_backend("triton"):
        assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)
        # Double backward: the backward reruns the forward in reference ops.
        assert torch.autograd.gradgradcheck(f, (x, *params), fast_mode=True)


# --------------------------------------------------------------------------------------------
# The reference path, the module's parameters and the other autograd modes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation, out_act", [("gelu", None), ("leaky_relu", "sigmoid")])
def test_reference_path_matches_native(activation, out_act):
    mlp, native = _mlp(5, 24, 3, 3, activation, out_act)
    assert_as_accurate_as_native(mlp, native, _x(17, 5), backend="reference")


def test_state_dict_maps_onto_the_native_sequential():
    mlp, native = _mlp(3, 16, 2, 2, "gelu", "tanh")
    assert list(mlp.state_dict()) == [f"layers.{k}" for k in native.state_dict()]
    assert list(native.state_dict()) == [
        "0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias",
    ]  # fmt: skip
    assert [type(m) for m in native] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear,
                                         nn.Tanh]  # fmt: skip
    back = manualbp.FusedMLP.from_sequential(native)
    for a, b in zip(back.state_dict().values(), mlp.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert (back.activation, back.output_activation) == ("gelu", "tanh")
    other = manualbp.FusedMLP(3, 16, 2, 2, "gelu", "tanh", device=DEVICE)
    other.layers.load_state_dict(native.state_dict())
    x = _x(4, 3)
    assert torch.equal(other(x), mlp(x))


def test_same_initialisation_as_native_for_the_same_seed():
    torch.manual_seed(7)
    mlp = manualbp.FusedMLP(3, 16, 2, 2, "relu")
    torch.manual_seed(7)
    native = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                           nn.Linear(16, 2))  # fmt: skip
    for a, b in zip(mlp.parameters(), native.parameters(), strict=True):
        assert torch.equal(a, b)


def test_from_sequential_rejects_what_it_cannot_express():
    with pytest.raises(ValueError, match="share one width"):
        manualbp.FusedMLP.from_sequential(
            nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1))
        )
    with pytest.raises(ValueError, match="not a plain Linear"):
        manualbp.FusedMLP.from_sequential(nn.Sequential(nn.Linear(3, 8), nn.Dropout()))
    with pytest.raises(ValueError, match="at most 128"):
        manualbp.FusedMLP(3, MAX_WIDTH + 1, 2, 1)
    with pytest.raises(ValueError, match="unknown activation"):
        manualbp.FusedMLP(3, 8, 2, 1, "swish")


def test_forward_mode_ad_matches_native():
    mlp, native = _mlp(3, 16, 2, 2, "silu", "gelu")
    x, t = _x(7, 3), _x(7, 3)
    outs = []
    for model in (mlp, native):
        with forward_ad.dual_level():
            outs.append(forward_ad.unpack_dual(model(forward_ad.make_dual(x, t))).tangent)
    torch.testing.assert_close(outs[0], outs[1])


def test_torch_func_runs_layer_by_layer():
    mlp, native = _mlp(3, 16, 2, 1, "tanh")
    x = _x(5, 3)
    got = torch.func.vmap(torch.func.grad(lambda r: mlp(r).sum()))(x)
    want = torch.func.vmap(torch.func.grad(lambda r: native(r).sum()))(x)
    torch.testing.assert_close(got, want)


def test_autocast_computes_in_the_autocast_dtype():
    mlp, native = _mlp(3, 16, 2, 1, "relu")
    x = _x(9, 3)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, want = mlp(x), native(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------
# manualbp.Sequential: runs of Linear (+ activation) as one fused MLP
# --------------------------------------------------------------------------------------------
def _seq(*widths_acts):
    """``nn.Sequential`` of Linear layers (and activation modules) from (out, act) pairs."""
    layers, width = [], 3
    for out, act in widths_acts:
        layers.append(nn.Linear(width, out, device=DEVICE))
        if act is not None:
            layers.append(act)
        width = out
    return nn.Sequential(*layers)


@needs_kernels
def test_sequential_runs_a_whole_mlp_in_one_launch(launches):
    native = _seq((16, nn.ReLU()), (16, nn.ReLU()), (4, None))
    ours = manualbp.convert(copy.deepcopy(native))
    assert ours.mlp_runs() == [["0", "1", "2", "3", "4"]]
    x = _x(37, 3)
    assert_as_accurate_as_native(ours, native, x)
    assert launches["mlp_forward_kernel"] == 1
    # The modules, their Parameters and keys are untouched.
    assert list(ours.state_dict()) == list(native.state_dict())
    assert all(type(m) is manualbp.Linear for m in ours[::2])


@needs_kernels
def test_sequential_runs_split_where_the_activation_changes(launches):
    native = _seq((16, nn.ReLU()), (16, nn.GELU()), (16, nn.GELU()), (2, None))
    ours = manualbp.convert(copy.deepcopy(native))
    assert ours.mlp_runs() == [["0", "1", "2", "3"], ["4", "5", "6"]]
    assert_as_accurate_as_native(ours, native, _x(37, 3))
    assert launches["mlp_forward_kernel"] == 2


@needs_kernels
def test_sequential_mlp_fusion_can_be_turned_off_and_yields_to_hooks(launches):
    native = _seq((16, nn.Tanh()), (16, nn.Tanh()), (16, None))
    ours = manualbp.convert(copy.deepcopy(native))
    x = _x(5, 3)
    ours.fuse_mlp = False
    assert ours.mlp_runs() == []
    assert_as_accurate_as_native(ours, native, x)
    assert launches["mlp_forward_kernel"] == 0
    ours.fuse_mlp = True
    seen = []
    handle = ours[2].register_forward_hook(lambda m, i, o: seen.append(o))
    assert ours.mlp_runs() == []  # 0+1 alone, then the hooked Linear, then 4 alone: no run
    assert_as_accurate_as_native(ours, native, x)
    assert len(seen) == 1 and launches["mlp_forward_kernel"] == 0
    handle.remove()
    assert ours.mlp_runs() == [["0", "1", "2", "3", "4"]]


def test_sequential_leaves_wide_layers_and_the_reference_path_to_the_pairs(launches):
    native = _seq((200, nn.ReLU()), (16, nn.ReLU()), (16, nn.ReLU()), (2, None))
    ours = manualbp.convert(copy.deepcopy(native))
    assert ours.mlp_runs() == [["4", "5", "6"]]  # the 3 -> 200 -> 16 layers stay pairs
    assert_as_accurate_as_native(ours, native, _x(6, 3), backend="reference")
    assert launches["mlp_forward_kernel"] == 0  # the reference path keeps the pairs


def test_image_fitting_example_runs(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "fit_image_fused_mlp.py"
    spec = importlib.util.spec_from_file_location("fit_image_fused_mlp", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "fit.png"
    threads = str(torch.get_num_threads())  # the script sets it: keep the suite's
    assert (
        example.main(["--size", "12", "--steps", "3", "--threads", threads, "--out", str(out)]) == 0
    )
    assert out.stat().st_size > 0
