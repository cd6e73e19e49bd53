"""Renders pytest-benchmark JSON into benchmarks/REPORT.md and a bar chart of the speedups.

    python benchmarks/report.py RESULTS.json [--out benchmarks/REPORT.md]

Conventions the benchmark files follow so that the report can read them:
- ``benchmark.group`` names one comparison (same inputs, same run), e.g. ``adamw P=22M``;
- ``benchmark.extra_info["baseline"] = True`` marks the alternative people use today in that
  group; every other row gets the ratio baseline-median / its-median (> 1 means faster);
- ``extra_info["bytes"]``: bytes one call must move at the least, for effective GB/s;
- ``extra_info["bandwidth_probe"] = True``: a memory-bandwidth probe (STREAM-triad-like) timed in
  the same run, against which the GB/s of the other rows of the report are put;
- ``extra_info["items"]`` and ``extra_info["item_name"]``: work per call (e.g. 96 examples), for a
  throughput column; ``extra_info["peak_memory_mb"]`` when measured; ``extra_info["phases_ms"]``,
  {phase: median ms}, for where a step's time goes.
"""
import argparse
import json
import statistics
from pathlib import Path


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def machine_lines(data):
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {})
    extra = info.get("mtbert", {})
    lines = [
        f"- CPU: {cpu.get('brand_raw', info.get('processor', 'unknown'))}, "
        f"{extra.get('cores', cpu.get('count', '?'))} cores",
        f"- GPU: {extra.get('gpu') or 'none'}",
        f"- Python {info.get('python_version', '?')}, torch {extra.get('torch', '?')}, "
        f"triton {extra.get('triton', '?')}",
        f"- Run: {data.get('datetime', '?')}",
    ]
    return lines


def bandwidth_gbs(benchmarks):
    """Median GB/s of the bandwidth probes in the run (None when there is none)."""
    probes = [b for b in benchmarks if b.get("extra_info", {}).get("bandwidth_probe")]
    rates = [b["extra_info"]["bytes"] / b["stats"]["median"] / 1e9 for b in probes]
    return statistics.median(rates) if rates else None


def readable(value):
    """Three significant digits, thousands separated: 0.0123, 4.56, 789, 12,345."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def group_rows(benchmarks, probe_gbs):
    """{group: [row dicts]} with median, ratio against the group's baseline, GB/s, throughput."""
    groups = {}
    for bench in benchmarks:
        extra = bench.get("extra_info", {})
        if extra.get("bandwidth_probe"):
            continue
        groups.setdefault(bench.get("group") or bench["name"], []).append(bench)
    table = {}
    for group, members in groups.items():
        baseline = next((b for b in members if b.get("extra_info", {}).get("baseline")), None)
        rows = []
        for bench in members:
            extra = bench.get("extra_info", {})
            median = bench["stats"]["median"]
            row = {
                "name": extra.get("impl", bench["name"]),
                "median_ms": median * 1e3,
                "baseline": bench is baseline,
                "ratio": baseline["stats"]["median"] / median if baseline is not None else None,
            }
            if "bytes" in extra:
                row["gbs"] = extra["bytes"] / median / 1e9
                row["of_probe"] = row["gbs"] / probe_gbs if probe_gbs else None
            if "items" in extra:
                row["throughput"] = f"{readable(extra['items'] / median)} {extra.get('item_name', 'items')}/s"
            if "peak_memory_mb" in extra:
                row["memory"] = f"{extra['peak_memory_mb']:,.0f} MB"
            if "phases_ms" in extra:
                row["phases"] = " / ".join(f"{phase} {ms:,.0f}" for phase, ms in extra["phases_ms"].items())
            rows.append(row)
        table[group] = rows
    return table


def markdown(data, table, probe_gbs, chart_name):
    out = ["# mtbert benchmark report", "", *machine_lines(data), ""]
    if probe_gbs:
        out += [f"Memory bandwidth probe (triad, same run): **{probe_gbs:.1f} GB/s**.", ""]
    out += ["Times are medians over the rounds pytest-benchmark ran; the ratio is the baseline's median "
            "divided by the row's (above 1: faster than the baseline measured in the same run).", ""]
    if chart_name:
        out += [f"![speedups]({chart_name})", ""]
    for group, rows in table.items():
        has = {key: any(key in r for r in rows) for key in ("gbs", "throughput", "memory", "phases")}
        header = ["implementation", "median (ms)", "vs baseline"]
        header += ["GB/s", "of probe"] if has["gbs"] else []
        header += ["throughput"] if has["throughput"] else []
        header += ["peak memory"] if has["memory"] else []
        header += ["where the time goes (ms)"] if has["phases"] else []
        out += [f"## {group}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for r in rows:
            cells = [r["name"] + (" (baseline)" if r["baseline"] else ""), f"{r['median_ms']:.3f}",
                     "—" if r["ratio"] is None else f"{r['ratio']:.2f}×"]
            if has["gbs"]:
                cells += [f"{r['gbs']:.1f}" if "gbs" in r else "",
                          f"{r['of_probe']:.0%}" if r.get("of_probe") else ""]
            if has["throughput"]:
                cells.append(r.get("throughput", ""))
            if has["memory"]:
                cells.append(r.get("memory", ""))
            if has["phases"]:
                cells.append(r.get("phases", ""))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def bar_chart(table, path):
    """One bar per non-baseline row: its speedup over its group's baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{group}\n{r['name']}", r["ratio"]) for group, rows in table.items()
            for r in rows if r["ratio"] is not None and not r["baseline"]]
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(bars) + 1.5))
    labels, ratios = zip(*bars)
    colors = ["tab:green" if r >= 1 else "tab:red" for r in ratios]
    # Ratios span orders of magnitude: a log axis, each bar drawn from 1× to its ratio.
    ax.barh(range(len(bars)), [r - 1 for r in ratios], left=1, color=colors)
    ax.set_xscale("log")
    for y, r in enumerate(ratios):
        ax.annotate(f"{r:,.0f}×" if r >= 10 else f"{r:.2g}×", (r, y), xytext=(3 if r >= 1 else -3, 0), textcoords="offset points",
                    ha="left" if r >= 1 else "right", va="center", fontsize=7)
    ax.set_yticks(range(len(bars)), labels, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speedup over the baseline measured in the same run (×, log scale)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def render(json_paths, out_path):
    """Merges one or more pytest-benchmark JSON files into one report."""
    datas = [load(p) for p in json_paths]
    benchmarks = [b for d in datas for b in d["benchmarks"]]
    probe_gbs = bandwidth_gbs(benchmarks)
    table = group_rows(benchmarks, probe_gbs)
    out_path = Path(out_path)
    chart = out_path.with_name(out_path.stem.lower() + "_speedups.png")
    chart_name = chart.name if bar_chart(table, chart) else None
    out_path.write_text(markdown(datas[0], table, probe_gbs, chart_name), encoding="utf-8")
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json file(s)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("REPORT.md")))
    args = parser.parse_args(argv)
    print(f"wrote {render(args.json, args.out)}")


if __name__ == "__main__":
    main()
