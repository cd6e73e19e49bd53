"""Loads a script of benchmarks/ as a module for the tests of that script, without putting
benchmarks/ on sys.path (where its conftest.py and module names would shadow the tests' own)."""
import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark_script(name):
    """``benchmarks/<name>.py``, imported under the name ``benchmarks_<name>``."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
