"""pytest-benchmark suites: providers side by side, one group per (subject, shape, dtype, mode).

`pytest bench/` measures; `pytest bench/ --quick` runs every provider once on tiny shapes so that
CI catches breakage (the numbers mean nothing; torch.compile runs on the models only, each graph
costs seconds). `--device cuda` runs every suite on the GPU, with the providers that exist there
(fastres-triton and fastres-tuned among them) and synchronised steps; `--dtype bf16` sets the
blocks' and models' dtype (the op suite stays fp32). Providers, their setup and the timed step
come from `fastres.benchmark`, the implementation `fastres bench` uses. Timings are reported,
never asserted."""
import pytest
import torch

from fastres.benchmark import DTYPES, Case, providers


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="tiny shapes, one round per provider")
    parser.addoption("--device", default="cpu", choices=["cpu", "cuda"], help="where every suite runs")
    parser.addoption("--dtype", default="fp32", choices=list(DTYPES), help="the blocks' and models' dtype")


def pytest_configure(config):
    if config.getoption("--device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: no CUDA device is available")


def pytest_generate_tests(metafunc):
    """`provider` takes every provider on the chosen device, less a module's EXCLUDED_PROVIDERS."""
    if "provider" in metafunc.fixturenames:
        excluded = getattr(metafunc.module, "EXCLUDED_PROVIDERS", ())
        metafunc.parametrize("provider", [p for p in providers(metafunc.config.getoption("--device"))
                                          if p not in excluded])


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return request.config.getoption("--quick")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def dtype(request) -> torch.dtype:
    return DTYPES[request.config.getoption("--dtype")]


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
