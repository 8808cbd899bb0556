"""One table of pacs-edge's figures from bench/out/*.json, against the issues' targets
(issue 2: storage, query, retrieve; issue 15: the order workflow; issue 16: the web);
then issue 17's table: pacs-edge and Orthanc side by side on the DIMSE paths, with
the goals and met/missed per line (issue17.py)."""

from __future__ import annotations

import json
from typing import Any

import issue17
from common import OUT, console
from rich.table import Table

# (benchmark file, measure, unit) -> (kind, bound): "ratio" >= bound, or "ms" < bound.
TARGETS: dict[tuple[str, str, str], tuple[str, float]] = {
    ("store", "store x1 assoc", "MB/s"): ("ratio", 0.5),
    ("store", "store x4 assoc", "MB/s"): ("ratio", 0.4),
    ("retrieve", "C-MOVE x1 assoc", "MB/s"): ("ratio", 0.8),
    ("retrieve", "C-GET x1 assoc", "MB/s"): ("ratio", 0.8),
    ("retrieve", "C-MOVE x4 assoc", "MB/s"): ("ratio", 0.8),
    ("retrieve", "C-GET x4 assoc", "MB/s"): ("ratio", 0.8),
    ("web", "WADO-RS study (transfer-syntax=*)", "MB/s"): ("ratio", 0.8),  # to C-GET
    ("migrate", "migrate via C-MOVE x4", "MB/s"): ("ratio", 0.5),  # to storescu (issue 18)
    ("migrate", "migrate via C-GET x4", "MB/s"): ("ratio", 0.5),
}
FIND_TARGET_MS = 10.0  # an exact ID (issue 17)
FIND_WIDE_TARGET_MS = 20.0  # a name wildcard or a date range (issue 17)
# (benchmark file, measure) -> an upper bound in the figure's own unit (issue 15's goals).
BELOW: dict[tuple[str, str], float] = {
    ("workflow", "orders over 1 MLLP connection"): 5.0,  # s, 500 orders
    ("workflow", "worklist C-FIND beyond C-ECHO"): 50.0,  # ms
    ("workflow", "commitment N-ACTION to report"): 2000.0,  # ms, 300 instances
    ("web", "series metadata, cold"): 500.0,  # ms, 300-slice CT (issue 16)
    ("web", "series metadata, cached"): 50.0,  # ms
}


def target(bench: str, fig: dict[str, Any], studies: int) -> str:
    if bench == "find" and fig["name"].startswith("C-FIND") \
            and fig["subject"] == f"pacs-edge {studies}":
        bound = FIND_TARGET_MS if "PatientID" in fig["name"] else FIND_WIDE_TARGET_MS
        ok = fig["median"] is not None and fig["median"] < bound
        return f"< {bound:.0f} ms: {'met' if ok else 'MISSED'}"
    bound = BELOW.get((bench, fig["name"]))
    if bound is not None:
        ok = fig["median"] is not None and fig["median"] < bound
        return f"< {bound:g} {fig['unit']}: {'met' if ok else 'MISSED'}"
    kind_bound = TARGETS.get((bench, fig["name"], fig["unit"]))
    if kind_bound is None:
        return ""
    ratio = fig["ratio"]
    ok = ratio is not None and ratio >= kind_bound[1]
    return f">= {kind_bound[1]}x: {'met' if ok else 'MISSED'}"


def main() -> None:
    table = Table(title="pacs-edge against its references (medians; ratio > 1 is better)")
    for col in ("bench", "measure", "pacs-edge", "median", "reference", "ref. median",
                "ratio", "target"):
        table.add_column(col)
    stamps: list[str] = []
    for path in sorted(OUT.glob("*.json")):
        data = json.loads(path.read_text())
        studies = data.get("studies", 0)
        stamps.append(f"{path.stem} {data.get('time', '?')}")
        for fig in data.get("figures", []):
            if not str(fig.get("subject", "")).startswith("pacs-edge") or "median" not in fig:
                continue  # references, and files of other benchmarks' formats
            unit = fig["unit"]
            ratio = fig.get("ratio")
            table.add_row(path.stem, fig["name"], fig["subject"].removeprefix("pacs-edge "),
                          _fmt(fig["median"], unit), fig.get("reference") or "-",
                          _fmt(fig.get("reference_median"), unit),
                          "-" if ratio is None else f"{ratio:.2f}x",
                          target(path.stem, fig, studies) or fig.get("note", ""))
    table.caption = "measured: " + ", ".join(stamps)
    console.print(table)
    issue17.main()


def _fmt(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:.1f} {unit}"


if __name__ == "__main__":
    main()
