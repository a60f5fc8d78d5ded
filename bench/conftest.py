"""pytest-benchmark suites: providers side by side, one group per (subject, shape, dtype, mode).

`pytest bench/` measures; `pytest bench/ --quick` runs every provider once on tiny shapes (CI
catches breakage, the numbers mean nothing). Timings are reported, never asserted."""
import copy
import time

import pytest
import torch

import fastres


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="tiny shapes, one round per provider")


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return request.config.getoption("--quick")


def providers(device: str = "cpu") -> list[str]:
    return ["eager", "eager_cl", "compile"] + [f"fastres-{b}" for b in fastres.available_backends(device)
                                                if b != "triton" or device == "cuda"]


def prepare(provider: str, model: torch.nn.Module, x: torch.Tensor, *, train: bool):
    """(callable model, input) for a provider; setup cost (convert/compile) stays outside timing."""
    model = copy.deepcopy(model).train(train)
    if provider != "eager":
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    if provider == "compile":
        model = torch.compile(model)
    elif provider.startswith("fastres-"):
        model = fastres.convert(model, backend=provider.split("-", 1)[1])
    return model, x


def step_fn(model, x, *, train: bool):
    """One inference forward, or one training step (forward + backward + SGD update)."""
    if not train:
        def infer():
            with torch.no_grad():
                return model(x)
        return infer
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
        opt.step()
    return step


def run(benchmark, fn, *, quick: bool, batch: int, extra: dict) -> None:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed():
        fn()
        sync()
    t0 = time.perf_counter()
    timed()  # warm-up (compile happens here)
    benchmark.extra_info.update(extra, warmup_s=round(time.perf_counter() - t0, 3),
                                threads=torch.get_num_threads())
    if quick:
        benchmark.pedantic(timed, rounds=1, iterations=1)
    else:
        benchmark.pedantic(timed, rounds=5, iterations=1, warmup_rounds=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["img_per_s"] = round(batch / mean, 2)
