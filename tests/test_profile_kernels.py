"""benchmarks/profile_kernels.py's summary of an Nsight Compute CSV: kernels are attributed to the workload whose
marker launched before them, and the figures come from the right rows and units."""

from __future__ import annotations

import csv
import io
import json
import math
import pathlib
import random
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_kernels  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


def write_ncu_csv(path, kernels_per_workload, rng):
    """An ncu ``--csv --page raw`` file: notes, header, units row, then a marker (grid = index + 1) before each
    workload's kernels. Returns the expected (total us, longest kernel's dram bytes) per workload."""
    metrics = list(profile_kernels.COLUMNS.values())
    units = {metric: "" for metric in metrics} | {"gpu__time_duration.sum": "ns", "dram__bytes_read.sum": "byte"}
    rows, expected = [], []
    for index, count in enumerate(kernels_per_workload):
        rows.append({"Kernel Name": "_profile_marker", **{m: "1" for m in metrics}, "launch__grid_size": str(index + 1)})
        times = [rng.uniform(1e3, 9e4) for _ in range(count)]
        dram = [rng.uniform(1e6, 1e9) for _ in range(count)]
        for k, (ns, read) in enumerate(zip(times, dram)):
            rows.append({"Kernel Name": f"kernel_{index}_{k}", **{m: f"{rng.uniform(0, 99):.2f}" for m in metrics},
                         "gpu__time_duration.sum": f"{ns:,.0f}", "dram__bytes_read.sum": f"{read:,.0f}"})
        longest = max(range(count), key=lambda k: round(times[k]))
        expected.append((sum(round(t) for t in times) / 1e3, round(dram[longest]) / 1e9))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["Kernel Name", *metrics], quoting=csv.QUOTE_ALL)
    writer.writeheader()
    writer.writerow({"Kernel Name": "", **units})
    writer.writerows(rows)
    path.write_text("==PROF== Connected to process 1\n" + buffer.getvalue())
    return expected


def test_summary_attributes_kernels_to_workloads_by_marker(tmp_path, generator):
    rng = random.Random(generator.initial_seed())
    counts = [rng.randint(1, 3) for _ in range(5)]
    expected = write_ncu_csv(tmp_path / "ncu.csv", counts, rng)
    labels = [f"workload {i}" for i in range(len(counts))]
    (tmp_path / "manifest.json").write_text(json.dumps({"device": "test card", "workloads": labels}))
    lines = profile_kernels.summarize(str(tmp_path / "ncu.csv"), str(tmp_path / "manifest.json")).splitlines()
    assert lines[0] == "device: test card"
    body = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lines[3:]}
    assert list(body) == labels
    for label, count, (total_us, dram_gb) in zip(labels, counts, expected):
        cells = body[label]
        assert int(cells[1]) == count
        assert abs(float(cells[2]) - total_us) < 0.06  # printed to 0.1 us
        half_digit = 0.5 * 10 ** (math.floor(math.log10(dram_gb)) - 2)  # printed to 3 significant digits
        assert abs(float(cells[3]) - dram_gb) <= half_digit * 1.001


def test_summary_refuses_a_time_unit_it_does_not_know(tmp_path, generator):
    rng = random.Random(generator.initial_seed())
    write_ncu_csv(tmp_path / "ncu.csv", [1, 2], rng)
    text = (tmp_path / "ncu.csv").read_text()
    (tmp_path / "ncu.csv").write_text(text.replace('"ns"', '"msecond"', 1))
    (tmp_path / "manifest.json").write_text(json.dumps({"device": "test card", "workloads": ["a", "b"]}))
    with pytest.raises(ValueError, match="gpu__time_duration.sum is in 'msecond'"):
        profile_kernels.summarize(str(tmp_path / "ncu.csv"), str(tmp_path / "manifest.json"))
