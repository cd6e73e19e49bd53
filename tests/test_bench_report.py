"""The benchmark report renderer reads pytest-benchmark JSON the way the suites write it."""
import json

from benchmark_modules import load_benchmark_module

report = load_benchmark_module("report")


def entry(name, group, median, **extra):
    return {"name": name, "group": group, "stats": {"median": median}, "extra_info": extra}


def test_report_ratios_bandwidth_and_chart(tmp_path):
    data = {
        "datetime": "2026-11-28T12:00:00",
        "machine_info": {"cpu": {"brand_raw": "Test CPU"}, "python_version": "3.11",
                         "mtbert": {"cores": 2, "gpu": None, "torch": "2.13.0", "triton": "3.9.0"}},
        "benchmarks": [
            entry("triad", "bandwidth", 0.5, bandwidth_probe=True, bytes=10e9),  # 20 GB/s
            entry("torch", "adamw P=1M", 0.004, impl="torch.optim.AdamW", baseline=True, bytes=40e6),
            entry("ours", "adamw P=1M", 0.002, impl="FusedAdamW", bytes=40e6),
            entry("step", "multitask step", 1.0, impl="mtbert", items=96, item_name="examples"),
        ],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    out = report.render([path], tmp_path / "REPORT.md")
    text = out.read_text()
    assert "Test CPU, 2 cores" in text and "torch 2.13.0" in text
    assert "20.0 GB/s" in text
    assert "| FusedAdamW | 2.000 | 2.00× | 20.0 | 100% |" in text          # 40 MB in 2 ms = 20 GB/s
    assert "| torch.optim.AdamW (baseline) | 4.000 | 1.00× | 10.0 | 50% |" in text
    assert "96 examples/s" in text
    assert (tmp_path / "report_speedups.png").stat().st_size > 1000
