"""Loads a module of benchmarks/ by its file path, for the tests that check benchmark code.

benchmarks/ is not a package and is not on sys.path; loading by path keeps its module names
(``conftest``, ``report``, ...) from shadowing or being shadowed by the tests' own."""
import importlib.util
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark_module(name):
    """benchmarks/<name>.py as a fresh module named ``benchmarks_<name>``."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
