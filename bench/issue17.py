"""Issue 17's table from bench/out/{store,retrieve,find}.json: each DIMSE path with
pacs-edge's figure and Orthanc's side by side (throughput as the ratio to the dcmtk
reference of the same run, times in ms), the goal, and whether pacs-edge met it.
Printed by bench/summary.py at the end of `make bench`; `python bench/issue17.py`
prints it alone."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import OUT, console
from rich.table import Table

EDGE = "pacs-edge workers=1"
EDGE2 = "pacs-edge workers=2"
QUERIES = ("PatientID", "PatientName wildcard", "StudyDate range")
FIND_BOUND_MS = {"PatientID": 10.0, "PatientName wildcard": 20.0, "StudyDate range": 20.0}


@dataclass
class Row:
    path: str
    edge: str
    orthanc: str
    goal: str
    met: bool | None  # None: nothing to judge (not measured, or stated only)


class Results:
    """The figures of one benchmark's JSON, looked up by measure, subject and unit."""

    def __init__(self, name: str) -> None:
        path = OUT / f"{name}.json"
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def figure(self, measure: str, subject: Callable[[str], bool],
               unit: str | None = None) -> dict[str, Any] | None:
        for fig in self.data.get("figures", []):
            if (fig["name"] == measure and subject(fig["subject"])
                    and (unit is None or fig["unit"] == unit) and fig["median"] is not None):
                return fig
        return None

    def ratio(self, measure: str, subject: Callable[[str], bool]) -> float | None:
        fig = self.figure(measure, subject, "MB/s")
        return None if fig is None else fig["ratio"]

    def median(self, measure: str, subject: Callable[[str], bool],
               unit: str | None = None) -> float | None:
        fig = self.figure(measure, subject, unit)
        return None if fig is None else fig["median"]


def is_edge(subject: str) -> bool:
    return subject == EDGE


def is_orthanc(subject: str) -> bool:
    return subject.startswith("Orthanc")


def x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def at_least(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound


def rows() -> list[Row]:
    store, retrieve, find = Results("store"), Results("retrieve"), Results("find")
    out: list[Row] = []
    for assoc in (1, 4):
        measure = f"store x{assoc} assoc"
        mine, theirs = store.ratio(measure, is_edge), store.ratio(measure, is_orthanc)
        edge = x(mine)
        if assoc == 4 and (two := store.ratio(measure, lambda s: s == EDGE2)) is not None:
            edge += f" (workers=2: {two:.2f}x)"
        ahead = None if mine is None or theirs is None else mine > theirs
        out.append(Row(f"C-STORE CT, {assoc} association{'s' * (assoc > 1)} (vs storescp)",
                       edge, x(theirs), ">= 0.40x and ahead of Orthanc",
                       None if mine is None else mine >= 0.40 and ahead is not False))
    cpu = {who: store.median("server CPU per instance x1 assoc", pick, "CPU-ms")
           for who, pick in (("edge", is_edge), ("orthanc", is_orthanc),
                             ("storescp", lambda s: s == "dcmtk storescp"))}
    out.append(Row("server CPU per instance, CT on 1 association", ms(cpu["edge"]),
                   ms(cpu["orthanc"]), f"<= 3 ms (storescp: {ms(cpu['storescp'])})",
                   None if cpu["edge"] is None else cpu["edge"] <= 3.0))
    machine = {who: store.median("machine CPU per instance x4 assoc", pick, "CPU-ms")
               for who, pick in (("edge", is_edge), ("orthanc", is_orthanc),
                                 ("storescp", lambda s: s == "dcmtk storescp"))}
    idle = store.median("idle cores during the send x4 assoc", is_edge, "cores")
    out.append(Row("machine CPU per instance (server, clients, kernel), CT on 4 associations",
                   ms(machine["edge"]) + ("" if idle is None else f", {idle:.2f} cores idle"),
                   ms(machine["orthanc"]), f"stated (storescp: {ms(machine['storescp'])})",
                   None))
    small = store.data.get("small_studies", 0)
    mine = store.ratio("small studies x4 assoc", is_edge)
    out.append(Row(f"{small} one-instance studies, 4 associations (vs storescp)", x(mine),
                   x(store.ratio("small studies x4 assoc", is_orthanc)), ">= 0.60x",
                   at_least(mine, 0.60)))
    for assoc in (1, 4):
        move, get = f"C-MOVE x{assoc} assoc", f"C-GET x{assoc} assoc"
        mine_move, mine_get = retrieve.ratio(move, is_edge), retrieve.ratio(get, is_edge)
        met = None if mine_move is None or mine_get is None else \
            mine_move >= 0.8 and mine_get >= 0.8
        out.append(Row(f"C-MOVE / C-GET, {assoc} association{'s' * (assoc > 1)} "
                       "(vs dcmqrscp)", f"{x(mine_move)} / {x(mine_get)}",
                       f"{x(retrieve.ratio(move, is_orthanc))} / "
                       f"{x(retrieve.ratio(get, is_orthanc))}", ">= 0.80x both", met))
    studies = find.data.get("studies", 10000)

    def edge_at(n: int) -> Callable[[str], bool]:
        return lambda s: s == f"pacs-edge {n}"

    echo_mine = find.median("C-ECHO", edge_at(studies))
    echo_theirs = find.median("C-ECHO", is_orthanc)
    out.append(Row("C-ECHO round trip (echoscu start + association + release)", ms(echo_mine),
                   ms(echo_theirs), "<= 1.5x Orthanc's",
                   None if echo_mine is None or echo_theirs is None
                   else echo_mine <= 1.5 * echo_theirs))
    for q in QUERIES:
        name = f"C-FIND {q} beyond C-ECHO"
        mine_fig = find.figure(name, edge_at(studies))
        theirs_fig = find.figure(name, is_orthanc)
        bound = FIND_BOUND_MS[q]
        out.append(Row(f"C-FIND {q} beyond a C-ECHO, {studies} studies",
                       _find(mine_fig), _find(theirs_fig), f"< {bound:g} ms",
                       None if mine_fig is None else mine_fig["median"] < bound))
    large = find.data.get("large_studies", 0)
    for q in QUERIES if large else ():
        name = f"C-FIND {q} beyond C-ECHO"
        big, base = find.figure(name, edge_at(large)), find.figure(name, edge_at(studies))
        grows = "-"
        if big is not None and base is not None and base["median"] > 0:
            grows = f"{big['median'] / base['median']:.1f}x the time of {studies}"
        same = q == "PatientID"  # the same 10 matches; the others match 10x as many
        out.append(Row(f"C-FIND {q}, {large} studies (pacs-edge only; Orthanc column: "
                       f"growth)", _find(big), grows,
                       f"< {FIND_BOUND_MS[q]:g} ms" if same else "grows with the matches",
                       None if big is None or not same else big["median"] < FIND_BOUND_MS[q]))
    rss = {who: store.median("peak RSS per process x4 assoc", pick, "MB")
           for who, pick in (("edge", is_edge), ("edge2", lambda s: s == EDGE2),
                             ("orthanc", is_orthanc))}
    out.append(Row("peak RSS per process (per worker), CT on 4 associations",
                   f"{_mb(rss['edge'])} (workers=2: {_mb(rss['edge2'])})", _mb(rss["orthanc"]),
                   "stated", None))
    return out


def _find(fig: dict[str, Any] | None) -> str:
    return "-" if fig is None else f"{fig['median']:.1f} ms {fig.get('note', '')}".strip()


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MB"


def main() -> None:
    table = Table(title="Issue 17: DIMSE, pacs-edge and Orthanc side by side (medians; ratios "
                        "to dcmtk in the same run)")
    for col in ("path", "pacs-edge", "Orthanc", "goal", "met"):
        table.add_column(col)
    for row in rows():
        met = "-" if row.met is None else ("met" if row.met else "MISSED")
        table.add_row(row.path, row.edge, row.orthanc, row.goal, met)
    stamps = [f"{name} {Results(name).data.get('time', 'not run')} load "
              f"{Results(name).data.get('load_before', ['?'])[0]}"
              for name in ("store", "retrieve", "find")]
    table.caption = "measured: " + ", ".join(stamps)
    console.print(table)


if __name__ == "__main__":
    main()
