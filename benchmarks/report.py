"""Renders pytest-benchmark JSON into benchmarks/REPORT.md and a bar chart of the speedups.

    python benchmarks/report.py RESULTS.json [--out benchmarks/REPORT.md]

Conventions the benchmark files follow so that the report can read them:
- ``benchmark.group`` names one comparison (same inputs, same run), e.g. ``adamw P=22M``;
- ``benchmark.extra_info["baseline"] = True`` marks the alternative people use today in that
  group; every other row gets the ratio baseline-median / its-median (> 1 means faster);
- ``extra_info["bytes"]``: bytes one call must move at the least, for effective GB/s;
- ``extra_info["bandwidth_probe"] = True``: a memory-bandwidth probe (STREAM-triad-like, or a
  device-to-device copy) timed in the same run, against which the GB/s of the rows of its group
  are put (of a group without one: the median of all probes);
- ``extra_info["items"]`` and ``extra_info["item_name"]``: work per call (e.g. 96 examples), for a
  throughput column; when two rows of a group both have items, their ratio is one of throughputs
  (rows on different batches, e.g. random and bucketed, then compare by tokens/s);
  ``extra_info["peak_memory_mb"]`` when measured; ``extra_info["phases_ms"]``, {phase: median ms},
  for where a step's time goes;
- ``extra_info["competent"] = True`` marks the competent stack's rows (e.g. eager and compiled):
  every row gets a second ratio against the fastest competent row of its ``precision`` ("fp32",
  "bf16"), and rows of another precision also one against the fastest fp32 competent row;
- ``extra_info["regime"]``, ``["padding_fraction"]``, ``["precision"]``: the batches and dtype of a
  row, shown with it; ``["compile_s"]``: the untimed warm-up that compiled a row;
- ``extra_info["matmul_probe"] = True`` with ``["gemm_flops"]`` and ``["precision"]``: a row of the
  matrix-multiply rate; the best such row per precision is that precision's reference rate, and
  every row with ``gemm_flops`` gets GFLOP/s (TFLOP/s at a GPU's rates) and the fraction of its precision's rate (with the
  formula from ``["gemm_flops_formula"]`` printed under its table); ``["numerics"]``: the errors of
  the numerics check that preceded the row;
- ``extra_info["goals"]``, {"baseline" | "competent" | "probe": target}: the row's goals (its ratio
  against the baseline, against the competent row of its precision, its fraction of the probe's
  GB/s), listed with the measured value and met / not met in the report's goals table.
"""
import argparse
import json
import statistics
from pathlib import Path


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def machine_lines(data, rates):
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {})
    extra = info.get("mtbert", {})
    isa = extra.get("isa")
    lines = [
        f"- CPU: {extra.get('cpu_model') or cpu.get('brand_raw', info.get('processor', 'unknown'))}, "
        f"{extra.get('cores', cpu.get('count', '?'))} cores"
        + ("" if extra.get("torch_threads") is None else f", torch threads: {extra['torch_threads']}")
        + ("" if isa is None else f"; ISA: {', '.join(isa) or 'none of AVX2, AVX-512, AVX-512-BF16, AMX'}"),
        f"- GPU: {extra.get('gpu') or 'none'}",
        f"- Python {info.get('python_version', '?')}, torch {extra.get('torch', '?')}, "
        f"triton {extra.get('triton', '?')}",
        f"- Run: {data.get('datetime', '?')}",
    ]
    if rates:
        lines.append("- Matrix-multiply rate, same run (best of the `matrix multiply rate` rows): " + ", ".join(
            f"{precision} **{rate / flops_unit(rate)[1]:,.0f} {flops_unit(rate)[0]}** ({name})"
            for precision, (rate, name) in rates.items()))
    return lines


def flops_unit(flops_per_s):
    """(name, scale) of the unit a rate reads best in: TFLOP/s from 10 TFLOP/s on (a GPU), else GFLOP/s."""
    return ("TFLOP/s", 1e12) if flops_per_s >= 1e13 else ("GFLOP/s", 1e9)


def matmul_rates(benchmarks):
    """{precision: (best FLOP/s, the row's name)} over the matrix-multiply probe rows."""
    rates = {}
    for bench in benchmarks:
        extra = bench.get("extra_info", {})
        if extra.get("matmul_probe"):
            rate = extra["gemm_flops"] / bench["stats"]["median"]
            if rate > rates.get(extra["precision"], (0, None))[0]:
                rates[extra["precision"]] = (rate, extra.get("impl", bench["name"]))
    return rates


def bandwidth_gbs(benchmarks):
    """Median GB/s of the bandwidth probes among ``benchmarks`` (None when there is none)."""
    probes = [b for b in benchmarks if b.get("extra_info", {}).get("bandwidth_probe")]
    rates = [b["extra_info"]["bytes"] / b["stats"]["median"] / 1e9 for b in probes]
    return statistics.median(rates) if rates else None


def probe_kinds_gbs(benchmarks):
    """{probe name: median GB/s over its rows (all sizes)}."""
    probes = [b for b in benchmarks if b.get("extra_info", {}).get("bandwidth_probe")]
    names = sorted({b["extra_info"].get("impl", b["name"]) for b in probes})
    return {name: bandwidth_gbs([b for b in probes if b["extra_info"].get("impl", b["name"]) == name])
            for name in names}


def readable(value):
    """Three significant digits, thousands separated: 0.0123, 4.56, 789, 12,345."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def speed(bench):
    """Work per second when the row has items, else calls per second."""
    return bench.get("extra_info", {}).get("items", 1) / bench["stats"]["median"]


def ratio(bench, reference):
    """How many times faster ``bench`` is than ``reference``: by throughput when both have items
    (rows on different batches), else by median time."""
    extra, ref_extra = bench.get("extra_info", {}), reference.get("extra_info", {})
    if "items" in extra and "items" in ref_extra:
        return speed(bench) / speed(reference)
    return reference["stats"]["median"] / bench["stats"]["median"]


def fastest_competent(members):
    """{precision: the fastest competent row of that precision}."""
    best = {}
    for bench in members:
        extra = bench.get("extra_info", {})
        if extra.get("competent"):
            precision = extra.get("precision", "fp32")
            if precision not in best or speed(bench) > speed(best[precision]):
                best[precision] = bench
    return best


def row_name(extra, bench):
    name = extra.get("impl", bench["name"])
    if "compile_s" in extra:
        name += f" (compiled in {extra['compile_s']:.0f} s, untimed)"
    return name


def batches_cell(extra):
    if "regime" not in extra:
        return ""
    padding = extra.get("padding_fraction")
    return extra["regime"] + ("" if padding is None else f", {padding:.0%} padding")


def group_rows(benchmarks, probe_gbs, rates=None):
    """{group: [row dicts]} with median, ratios against the group's baseline and its competent
    rows, GB/s, GEMM rate, throughput."""
    rates = rates or {}
    groups, probes = {}, {}
    for bench in benchmarks:
        extra = bench.get("extra_info", {})
        (probes if extra.get("bandwidth_probe") else groups).setdefault(bench.get("group") or bench["name"], []).append(
            bench)
    table = {}
    for group, members in groups.items():
        group_probe_gbs = bandwidth_gbs(probes[group]) if group in probes else probe_gbs
        baseline = next((b for b in members if b.get("extra_info", {}).get("baseline")), None)
        competent = fastest_competent(members)
        rows = []
        for bench in members:
            extra = bench.get("extra_info", {})
            median = bench["stats"]["median"]
            precision = extra.get("precision", "fp32")
            row = {
                "name": row_name(extra, bench),
                "median_ms": median * 1e3,
                "baseline": bench is baseline,
                "ratio": ratio(bench, baseline) if baseline is not None else None,
                "batches": batches_cell(extra),
            }
            if "precision" in extra and not extra.get("matmul_probe"):
                row["precision"] = precision
            if competent:
                cells = []
                if precision in competent:
                    row["competent_ratio"] = ratio(bench, competent[precision])
                    cells.append(f"{row['competent_ratio']:.2f}×")
                if precision != "fp32" and "fp32" in competent:
                    cells.append(f"{ratio(bench, competent['fp32']):.2f}× vs fp32")
                row["vs_competent"] = "; ".join(cells)
            if "bytes" in extra:
                row["gbs"] = extra["bytes"] / median / 1e9
                row["of_probe"] = row["gbs"] / group_probe_gbs if group_probe_gbs else None
            if "gemm_flops" in extra:
                row["gflops"] = extra["gemm_flops"] / median / 1e9
                if precision in rates:
                    row["of_rate"] = row["gflops"] * 1e9 / rates[precision][0]
            if "items" in extra:
                row["throughput"] = f"{readable(extra['items'] / median)} {extra.get('item_name', 'items')}/s"
            if "peak_memory_mb" in extra:
                row["memory"] = f"{extra['peak_memory_mb']:,.0f} MB"
            if "phases_ms" in extra:
                row["phases"] = " / ".join(f"{phase} {ms:,.0f}" for phase, ms in extra["phases_ms"].items())
            measured = {"baseline": row["ratio"], "competent": row.get("competent_ratio"), "probe": row.get("of_probe")}
            row["goals"] = [(kind, target, measured[kind]) for kind, target in extra.get("goals", {}).items()]
            rows.append(row)
        table[group] = rows
    return table


def group_notes(benchmarks, group):
    """Lines printed under a group's table: the GEMM FLOP formula, the numerics checks."""
    notes = []
    for bench in benchmarks:
        extra = bench.get("extra_info", {})
        if (bench.get("group") or bench["name"]) != group:
            continue
        formula = extra.get("gemm_flops_formula")
        if formula and f"- {formula}" not in notes:
            notes.append(f"- {formula}")
        numerics = extra.get("numerics")
        if numerics and not any(note.startswith(f"- Numerics, {extra.get('impl')} ") for note in notes):
            notes.append(f"- Numerics, {extra.get('impl')} against the competent stack before timing (fp32, dropout "
                         f"off, same batches): combined gradients differ by "
                         f"{', '.join(f'{e:.1e}' for e in numerics['gradients'])} (relative, in norm, per step); "
                         f"the parameter change after {len(numerics['gradients'])} steps by {numerics['update']:.1e}.")
    return notes


GOAL_NAMES = {"baseline": "the baseline", "competent": "the competent stack", "probe": "of the probe's GB/s"}


def goal_lines(table):
    """The goals table: one line per goal of a row, its measured value, met or not."""
    lines = []
    for group, rows in table.items():
        for r in rows:
            for kind, target, measured in r["goals"]:
                fmt = (lambda v: f"{v:.0%}") if kind == "probe" else (lambda v: f"{v:.2f}×")
                met = "—" if measured is None else "**met**" if measured >= target else "not met"
                lines.append(f"| {group} | {r['name']} | ≥ {fmt(target)} {GOAL_NAMES[kind]} | "
                             f"{'—' if measured is None else fmt(measured)} | {met} |")
    if not lines:
        return []
    return ["## Goals", "", "| group | row | goal | measured | |", "| --- | --- | --- | ---: | --- |", *lines, ""]


def markdown(data, table, chart_name, rates=None, notes=None, caveat=None, probes=None):
    out = ["# mtbert benchmark report", ""] + ([f"**{caveat}**", ""] if caveat else []) + [
        *machine_lines(data, rates or {}), ""]
    if probes:
        out += ["Memory bandwidth probes (same run, median over their sizes): " + "; ".join(
            f"{name} **{gbs:,.1f} GB/s**" for name, gbs in probes.items()) + ". A row's \"of probe\" is against "
            "the probe of its own table.", ""]
    out += goal_lines(table)
    out += ["Times are medians over the rounds pytest-benchmark ran; the ratio is the baseline's median "
            "divided by the row's (above 1: faster than the baseline measured in the same run), or the "
            "ratio of throughputs where the rows ran on different batches. \"vs competent\": against the "
            "fastest competent-stack row of the same precision (eager or compiled).", ""]
    if chart_name:
        out += [f"![speedups]({chart_name})", ""]
    columns = [("batches", "batches"), ("precision", "precision"), ("vs_competent", "vs competent"),
               ("gbs", "GB/s"), ("gflops", "GEMM GFLOP/s"), ("throughput", "throughput"), ("memory", "peak memory"),
               ("phases", "where the time goes (ms)")]
    for group, rows in table.items():
        has = {key: any(r.get(key) for r in rows) for key, _ in columns}
        header = ["implementation"]
        header += ["batches"] if has["batches"] else []
        header += ["precision"] if has["precision"] else []
        header += ["median (ms)", "vs baseline"]
        header += ["vs competent"] if has["vs_competent"] else []
        header += ["GB/s", "of probe"] if has["gbs"] else []
        unit, scale = flops_unit(1e9 * max((r.get("gflops", 0) for r in rows), default=0))
        header += [f"GEMM {unit}", "of rate"] if has["gflops"] else []
        header += [title for key, title in columns[5:] if has[key]]
        out += [f"## {group}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for r in rows:
            cells = [r["name"] + (" (baseline)" if r["baseline"] else "")]
            cells += [r["batches"]] if has["batches"] else []
            cells += [r.get("precision", "")] if has["precision"] else []
            cells += [f"{r['median_ms']:.3f}", "—" if r["ratio"] is None else f"{r['ratio']:.2f}×"]
            cells += [r.get("vs_competent", "")] if has["vs_competent"] else []
            if has["gbs"]:
                cells += [f"{r['gbs']:.1f}" if "gbs" in r else "",
                          f"{r['of_probe']:.0%}" if r.get("of_probe") else ""]
            if has["gflops"]:
                cells += [f"{r['gflops'] * 1e9 / scale:,.1f}" if "gflops" in r else "",
                          f"{r['of_rate']:.0%}" if r.get("of_rate") else ""]
            cells += [r.get(key, "") for key, _ in columns[5:] if has[key]]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        if notes and notes.get(group):
            out += [*notes[group], ""]
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


def render(json_paths, out_path, caveat=None):
    """Merges one or more pytest-benchmark JSON files into one report; ``caveat``: a line printed
    in bold under the title (e.g. that the machine was shared)."""
    datas = [load(p) for p in json_paths]
    benchmarks = [b for d in datas for b in d["benchmarks"]]
    probe_gbs = bandwidth_gbs(benchmarks)
    rates = matmul_rates(benchmarks)
    table = group_rows(benchmarks, probe_gbs, rates)
    notes = {group: group_notes(benchmarks, group) for group in table}
    out_path = Path(out_path)
    chart = out_path.with_name(out_path.stem.lower() + "_speedups.png")
    chart_name = chart.name if bar_chart(table, chart) else None
    out_path.write_text(markdown(datas[0], table, chart_name, rates, notes, caveat, probe_kinds_gbs(benchmarks)),
                        encoding="utf-8")
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json file(s)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("REPORT.md")))
    parser.add_argument("--caveat", help="a line printed in bold under the title, e.g. 'shared machine, provisional'")
    args = parser.parse_args(argv)
    print(f"wrote {render(args.json, args.out, args.caveat)}")


if __name__ == "__main__":
    main()
