#!/usr/bin/env python3
"""Per-kernel table from an `ncu --csv` log (ci/gpu_bench.sh, suite `ncu`).

Groups rows by (kernel name, grid size) and prints, per metric, the mean over the calls;
gpu__time_duration is also summed to give each kernel's share of the profiled time.
Usage: ncu_summary.py NCU_CSV
"""
import collections
import csv
import sys


def main(path: str) -> None:
    # ncu interleaves the application's own output with the CSV: keep the quoted lines.
    rows = list(csv.reader(line for line in open(path) if line.startswith('"')))
    if not rows:
        sys.exit(f"{path}: no ncu CSV rows")
    head = rows[0]
    k, g = head.index("Kernel Name"), head.index("Grid Size")
    name, unit, value = head.index("Metric Name"), head.index("Metric Unit"), head.index("Metric Value")
    metrics: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in rows[1:]:
        v = float(r[value].replace(",", ""))
        if r[name] == "gpu__time_duration.sum":
            v *= {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3}.get(r[unit], 1.0)
        metrics[(r[k], r[g])][r[name]].append(v)
    total_us = sum(sum(m.get("gpu__time_duration.sum", [])) for m in metrics.values())
    print(f"{path}: {sum(len(next(iter(m.values()))) for m in metrics.values())} kernel calls, "
          f"{total_us:.0f} us profiled")
    order = sorted(metrics.items(), key=lambda kv: -sum(kv[1].get("gpu__time_duration.sum", [0])))
    for (kernel, grid), m in order:
        t = m.get("gpu__time_duration.sum", [])
        share = f"{100 * sum(t) / total_us:5.1f}%" if total_us and t else "     "
        calls = len(next(iter(m.values())))
        rest = ", ".join(f"{n.split('.')[0] if n.startswith('gpu__time') else n} {sum(v) / len(v):.1f}"
                         for n, v in sorted(m.items()))
        print(f"  {kernel:<34} {grid:<14} {calls:>5} calls {share}  {rest}")


if __name__ == "__main__":
    main(sys.argv[1])
