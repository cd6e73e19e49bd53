"""The benchmark report renderer reads pytest-benchmark JSON the way the suites write it."""
import json

from benchmark_scripts import load_benchmark_script

report = load_benchmark_script("report")


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


def test_report_competent_ratios_regimes_and_matmul_rate(tmp_path):
    group = "encoder step"
    data = {
        "datetime": "2026-11-28T12:00:00",
        "machine_info": {"cpu": {"brand_raw": "ignored"}, "python_version": "3.11",
                         "mtbert": {"cpu_model": "Test EPYC", "isa": ["AVX2", "AVX-512", "AVX-512-BF16"], "cores": 2,
                                    "gpu": None, "torch": "2.13.0", "triton": "3.9.0"}},
        "benchmarks": [
            # 2e9 FLOP in 0.02 s: 100 GFLOP/s fp32; 0.005 s: 400 GFLOP/s bf16 (the slower 2nd row is not the rate).
            entry("mm32", "matrix multiply rate fp32", 0.02, impl="2048 square", matmul_probe=True, precision="fp32",
                  gemm_flops=2e9),
            entry("mm16", "matrix multiply rate bf16", 0.005, impl="2048 square", matmul_probe=True, precision="bf16",
                  gemm_flops=2e9),
            entry("mm16b", "matrix multiply rate bf16", 0.01, impl="ffn", matmul_probe=True, precision="bf16",
                  gemm_flops=2e9),
            # 1000 tokens in 2 s on random batches vs 800 tokens in 1 s bucketed: 0.8 / 0.5 = 1.6x by throughput.
            entry("usual", group, 2.0, impl="transformers", regime="random", padding_fraction=0.46, precision="fp32",
                  baseline=True, items=1000, item_name="tokens", gemm_flops=50e9, gemm_flops_formula="F = 3 x forward"),
            entry("eager", group, 1.0, impl="transformers eager", regime="bucketed", precision="fp32", competent=True,
                  items=800, item_name="tokens", gemm_flops=40e9, gemm_flops_formula="F = 3 x forward"),
            entry("compiled", group, 0.8, impl="transformers compiled", regime="bucketed", precision="fp32",
                  competent=True, items=800, item_name="tokens", compile_s=58.2),
            entry("ours", group, 0.5, impl="mtbert", regime="bucketed", precision="fp32", items=800,
                  item_name="tokens", gemm_flops=40e9, numerics={"gradients": [1e-7, 2e-7, 3e-7], "update": 4e-5}),
            entry("eager16", group, 0.4, impl="transformers eager bf16", regime="bucketed", precision="bf16",
                  competent=True, items=800, item_name="tokens"),
            entry("ours16", group, 0.25, impl="mtbert bf16", regime="bucketed", precision="bf16", items=800,
                  item_name="tokens", gemm_flops=40e9),
        ],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    text = report.render([path], tmp_path / "REPORT.md", caveat="shared machine, provisional").read_text()
    assert "**shared machine, provisional**" in text
    assert "Test EPYC, 2 cores; ISA: AVX2, AVX-512, AVX-512-BF16" in text
    assert "fp32 **100 GFLOP/s** (2048 square), bf16 **400 GFLOP/s** (2048 square)" in text
    # Usual baseline by throughput: 500 vs 1600 tokens/s; competent: the compiled row (1000 tokens/s).
    assert ("| transformers (baseline) | random, 46% padding | fp32 | 2000.000 | 1.00× | 0.50× | 25.0 | 25% |"
            in text)
    assert "| transformers compiled (compiled in 58 s, untimed) | bucketed | fp32 | 800.000 | 2.00× | 1.00× |" in text
    assert "| mtbert | bucketed | fp32 | 500.000 | 3.20× | 1.60× | 80.0 | 80% |" in text
    # bf16: against the bf16 competent row (2000 tokens/s) and the fp32 one (1000 tokens/s); 160 of 400 GFLOP/s.
    assert "| mtbert bf16 | bucketed | bf16 | 250.000 | 6.40× | 1.60×; 3.20× vs fp32 | 160.0 | 40% |" in text
    assert "| ffn | 10.000 | — | 200.0 | 50% |" in text  # the slower probe row: half the bf16 rate
    assert "- F = 3 x forward" in text and text.count("- F = 3 x forward") == 1
    assert "combined gradients differ by 1.0e-07, 2.0e-07, 3.0e-07" in text and "after 3 steps by 4.0e-05" in text


def test_report_goals_table_and_per_group_probe(tmp_path):
    """A row's goals are listed with the measured value, met or not; a group with its own bandwidth
    probe (a GPU copy) puts its rows against that probe, other groups against the median of all."""
    data = {
        "datetime": "2026-11-29T12:00:00",
        "machine_info": {"cpu": {"brand_raw": "Test CPU"}, "python_version": "3.12",
                         "mtbert": {"cores": 16, "gpu": "Test GPU", "torch": "2.11.0", "triton": "3.6.0"}},
        "benchmarks": [
            entry("triad", "bandwidth", 0.5, impl="triad", bandwidth_probe=True, bytes=10e9),       # 20 GB/s
            entry("copy", "layer norm", 0.001, impl="copy", bandwidth_probe=True, bytes=4e9),       # 4,000 GB/s
            entry("torch ln", "layer norm", 0.004, impl="F.layer_norm", baseline=True, bytes=8e9),
            # 1.6x the baseline (goal 1.2x: met); 8e9 B in 2.5 ms = 3,200 GB/s = 80% of its copy (goal 75%: met).
            entry("ours ln", "layer norm", 0.0025, impl="mtbert", bytes=8e9, goals={"baseline": 1.2, "probe": 0.75}),
            entry("torch adamw", "adamw", 0.004, impl="torch", baseline=True, bytes=40e6),
            # 2.0x the baseline against a goal of 3x: not met.
            entry("ours adamw", "adamw", 0.002, impl="FusedAdamW", bytes=40e6, goals={"baseline": 3.0}),
        ],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    text = report.render([path], tmp_path / "REPORT.md").read_text()
    assert "| layer norm | mtbert | ≥ 1.20× the baseline | 1.60× | **met** |" in text
    assert "| layer norm | mtbert | ≥ 75% of the probe's GB/s | 80% | **met** |" in text
    assert "| adamw | FusedAdamW | ≥ 3.00× the baseline | 2.00× | not met |" in text
    assert "| mtbert | 2.500 | 1.60× | 3200.0 | 80% |" in text
    assert "copy **4,000.0 GB/s**" in text and "triad **20.0 GB/s**" in text
