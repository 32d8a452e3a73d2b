"""The benchmark cases under pytest-benchmark: one test per (case, mode, provider).

Each round runs the case's untimed ``prepare`` in pytest-benchmark's ``setup`` and times the
call and a device synchronisation (wall clock); throughput goes into ``extra_info``. On CPU
torch.compile is skipped.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from benchmarks.cases import COMPILE_PROVIDERS, Case, UnavailableError
from benchmarks.measure import configure_compile
from benchmarks.runner import CPU_LABEL
from benchmarks.timing import synchronize


def test_bench(
    benchmark: Any, bench_spec: tuple[Case, str, str, torch.device], request: pytest.FixtureRequest
) -> None:
    case, mode, provider, device = bench_spec
    if provider in COMPILE_PROVIDERS and device.type == "cpu":
        pytest.skip("torch.compile not benchmarked on CPU (inductor's C++ compile is slow)")
    if provider in COMPILE_PROVIDERS:
        configure_compile()  # raise the recompile limits; dynamo is not reset between cases
    torch.manual_seed(0)
    try:
        bound = case.bind(provider)
    except UnavailableError as e:
        pytest.skip(str(e))
    if mode not in bound.modes:
        pytest.skip(f"{provider} offers no {mode!r} mode")
    prepare, run = bound.modes[mode]
    sets = [case.make_set(i) for i in range(2)]
    counter = itertools.count()

    def setup() -> tuple[tuple[Any], dict[str, Any]]:
        arg = prepare(sets[next(counter) % len(sets)])
        synchronize(device)
        return (arg,), {}

    def target(arg: Any) -> None:
        run(arg)
        synchronize(device)

    rounds = request.config.getoption("--bench-rounds")
    benchmark.extra_info.update(
        case=case.name,
        mode=mode,
        provider=provider,
        provider_label=bound.label,
        label=CPU_LABEL if device.type == "cpu" else f"{device.type}",
        metric=case.metric,
        work=case.work[mode],
        work_note=case.work_note,
    )
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=2, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the call ran once, nothing was timed
        return
    median_s = benchmark.stats.stats.median
    rate = case.work[mode] / median_s
    key = "tflops" if case.metric == "tflops" else "gbps"
    benchmark.extra_info[key] = rate / (1e12 if key == "tflops" else 1e9)
