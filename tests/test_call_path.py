"""The shape of a call: how much of manualbp a Linear passes through before its kernel runs,
what ``import manualbp`` loads, and that the package's imports run one way."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from manualbp.kernels import _host

import manualbp

ROOT = Path(__file__).resolve().parent.parent
OURS = (str(ROOT / "manualbp"), str(ROOT / "triton_kernels"))


def _our_frames(stack: list) -> list[tuple[str, str]]:
    return [(f.f_code.co_filename, f.f_code.co_name) for f in stack
            if f.f_code.co_filename.startswith(OURS)]  # fmt: skip


def _stack_at_launch(run, kernel_name: str) -> list[tuple[str, str]]:
    """manualbp's frames on the stack when ``kernel_name`` is launched: a profile hook on the
    launch expression ``kernel[grid]`` (Triton's ``__getitem__`` of the jitted function), or
    on the recorded launch (``_host.keep``) under ``_host.record``."""
    found: list[list[tuple[str, str]]] = []

    def kernel_of(frame) -> str:
        code, local = frame.f_code, frame.f_locals
        if code.co_name == "__getitem__" and "triton" in code.co_filename:
            return getattr(getattr(local.get("self"), "fn", None), "__name__", "")
        if code.co_name == "keep" and code.co_filename.endswith("_host.py"):
            return getattr(getattr(local.get("entry"), "kernel", None), "__name__", "")
        return ""

    def hook(frame, event, arg):
        if event == "call" and not found and kernel_of(frame) == kernel_name:
            stack, f = [], frame.f_back
            while f is not None:
                stack.append(f)
                f = f.f_back
            found.append(_our_frames(stack[::-1]))

    sys.setprofile(hook)
    try:
        run()
    finally:
        sys.setprofile(None)
    assert found, f"{kernel_name} was not launched"
    return found[0]


def _linear_call(device="cpu", dtype=torch.float32):
    layer = manualbp.Linear(32, 32, activation="gelu", device=device, dtype=dtype)
    x = torch.randn(8, 32, device=device, dtype=dtype, requires_grad=True)
    layer(x)  # the first call of the shape: nothing of it is measured
    return lambda: layer(x)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter path")
def test_an_eager_linear_reaches_its_kernel_in_few_frames():
    with manualbp.use_backend("triton"):
        frames = _stack_at_launch(_linear_call(), "linear_forward_kernel")
    files = {f for f, _ in frames}
    assert len(frames) <= 6 and len(files) <= 5, frames
    assert frames[0][1] == "forward" and frames[0][0].endswith("modules/linear.py")


def test_on_an_h100_a_linear_reaches_its_kernel_in_few_frames():
    # The CUDA path (sm_90, TMA GEMM, its config chosen per bucket), planned on meta tensors.
    # The Linear choice forced (a decided bucket: a recorded first call would also show the
    # frames of the timing it does once).
    from manualbp.kernels import linear

    x = torch.randn(256, 512, device="meta", dtype=torch.bfloat16, requires_grad=True)
    layer = manualbp.Linear(512, 512, activation="gelu", device="meta", dtype=torch.bfloat16)
    with (
        manualbp.use_backend("triton"),
        _host.simulate(90, 132),
        _host.record(),
        linear.force("triton"),
    ):
        frames = _stack_at_launch(lambda: layer(x), "matmul_tma_kernel")
    files = {f for f, _ in frames}
    assert len(frames) <= 8 and len(files) <= 6, frames


def test_a_breakpoint_in_the_functions_fires_in_eager():
    called = []

    def hook(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.endswith("ops/linear.py"):
            called.append(frame.f_code.co_name)

    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(5, 3, requires_grad=True)
    sys.setprofile(hook)
    try:
        manualbp.functional.linear(x, w, None, "relu").sum().backward()
    finally:
        sys.setprofile(None)
    assert "forward" in called and "backward" in called  # LinearFunction's own methods


def test_import_manualbp_loads_neither_dynamo_nor_triton():
    code = "import sys, manualbp; print('torch._dynamo' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)  # fmt: skip
    assert out.stdout.split() == ["False", "False"], out


def _imports(package: Path, name: str) -> dict[str, set[str]]:
    """Module -> the modules of ``name`` (the package) it imports, anywhere in its code."""
    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        rel = path.relative_to(package).with_suffix("")
        parts = [name, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        module = ".".join(parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = parts[: len(parts) - node.level] if node.level else []
                if path.name == "__init__.py" and node.level:
                    base = parts[: len(parts) - node.level + 1]
                target = ".".join([*base, *(node.module or "").split(".")]).strip(".")
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t == name or t.startswith(name + ".")}
        graph[module] = found - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    known = set(graph)
    edges = {m: {t for t in ts if t in known} for m, ts in graph.items()}
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append([*path[path.index(t) :], t])
            elif t not in state:
                visit(t, [*path, t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycles():
    kernels = _imports(ROOT / "triton_kernels", "manualbp.kernels")
    library = _imports(ROOT / "manualbp", "manualbp")
    # A package's __init__ importing its submodules is not a cycle through them.
    for graph in (kernels, library):
        for module in graph:
            graph[module] = {t for t in graph[module] if not module.startswith(t + ".")}
    assert _cycles(kernels) == [] and _cycles(library) == []


def test_the_kernels_import_nothing_from_the_rest_of_manualbp():
    for path in (ROOT / "triton_kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            assert not [n for n in names if n.split(".")[0] == "manualbp"], (path, names)


def test_imports_run_one_way():
    # kernels <- ops <- modules / optim / overrides <- cli
    layer = {"kernels": 0, "_mode": 0, "errors": 0, "activations": 1, "ops": 2,
             "functional": 3, "modules": 4, "optim": 4, "overrides": 4, "backends": 4,
             "testing": 4, "cli": 5}  # fmt: skip
    graph = _imports(ROOT / "manualbp", "manualbp")

    def rank(module: str) -> int | None:
        parts = module.split(".")
        return layer.get(parts[1]) if len(parts) > 1 else None

    wrong = [(m, t) for m, ts in graph.items() for t in ts
             if rank(m) is not None and rank(t) is not None and rank(t) > rank(m)]  # fmt: skip
    assert wrong == []
