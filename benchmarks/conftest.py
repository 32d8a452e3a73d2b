"""pytest-benchmark set-up for ``pytest benchmarks/`` (never part of the default test run,
whose ``testpaths`` is ``tests/``): one test per (case, mode, provider); options below."""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("manualbp-benchmarks")
    group.addoption("--bench-full", action="store_true", help="the full suite, not --quick's")
    group.addoption("--bench-device", default=None, help="cuda or cpu")
    group.addoption("--bench-rounds", type=int, default=10, help="timed rounds per benchmark")
    group.addoption("--bench-filter", default=None, help="regex on case names")


def bench_device(config: pytest.Config) -> torch.device:
    name = config.getoption("--bench-device")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bench_spec" not in metafunc.fixturenames:
        return
    import re

    from benchmarks.suites import build_cases

    config = metafunc.config
    device = bench_device(config)
    cases = build_cases(device, quick=not config.getoption("--bench-full"))
    pattern = config.getoption("--bench-filter")
    if pattern:
        cases = [c for c in cases if re.search(pattern, c.name)]
    specs, ids = [], []
    for case in cases:
        for mode in case.modes:
            for provider in case.providers:
                specs.append((case, mode, provider, device))
                ids.append(f"{case.name}:{mode}:{provider}")
    metafunc.parametrize("bench_spec", specs, ids=ids)
