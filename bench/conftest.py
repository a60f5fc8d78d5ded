"""pytest-benchmark suites: providers side by side, one group per (subject, shape, dtype, mode).

`pytest bench/` measures; `pytest bench/ --quick` runs every provider once on tiny shapes so that
CI catches breakage (the numbers mean nothing; torch.compile runs on the models only, each graph
costs seconds). Providers, their setup and the timed step come from `fastres.benchmark`, the
implementation `fastres bench` uses. Timings are reported, never asserted."""
import pytest
import torch

from fastres.benchmark import Case


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="tiny shapes, one round per provider")


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return request.config.getoption("--quick")


@pytest.fixture(scope="session")
def baselines() -> dict:
    """(group, provider) -> median seconds of the eager providers measured so far this session."""
    return {}


def run(benchmark, case: Case, *, quick: bool, batch: int, baselines: dict) -> None:
    """Time `case.step` (already run once by `prepare`); img/s, setup seconds, thread count and,
    where eager / eager_cl of the same group ran before, speedups go into extra_info."""
    benchmark.extra_info.update(provider=case.provider, setup_s=round(case.setup_s, 3),
                                threads=torch.get_num_threads())
    benchmark.pedantic(case.step, rounds=1 if quick else 5, iterations=1, warmup_rounds=0 if quick else 1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["img_per_s"] = round(batch / median, 2)
    if case.provider in ("eager", "eager_cl"):
        baselines[benchmark.group, case.provider] = median
    for base in ("eager", "eager_cl"):
        if (benchmark.group, base) in baselines:
            benchmark.extra_info[f"speedup_vs_{base}"] = round(baselines[benchmark.group, base] / median, 3)
