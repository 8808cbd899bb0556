"""README.md's "short tour with dcmtk" runs as written on a box set up by `make run`
alone: every tool it calls is in the line that installs them, and every folder a
command writes into (`-od DIR`) is made earlier in the tour, and every `pacs-edge` it
names is `.venv/bin/pacs-edge`. A new user types these lines literally; getscu refuses
an output folder that does not exist, and `make run` puts nothing on PATH.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
TOOLS = ("echoscu", "storescu", "findscu", "movescu", "getscu", "storescp", "curl")


def _tour() -> str:
    text = README.read_text()
    start = text.index("## A short tour with dcmtk")
    return text[start:text.index("\n## ", start + 1)]


def _commands(tour: str) -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", tour, re.DOTALL)
    assert blocks, "the tour has no shell blocks"
    return [line.split("#", 1)[0] for block in blocks for line in block.splitlines()]


def test_readme_tour_names_how_to_install_every_tool_it_calls() -> None:
    tour = _tour()
    install = re.search(r"`apt-get install ([^`]+)`", tour)
    assert install, "the tour does not say how to install its tools"
    packages = install[1].split()
    called = {tool for tool in TOOLS
              for line in _commands(tour) if re.search(rf"(^|&& |\| )\s*{tool}\b", line)}
    wanted = {"curl" if tool == "curl" else "dcmtk" for tool in called}
    assert wanted <= set(packages), (sorted(called), packages)


def test_readme_tour_makes_every_folder_it_writes_into() -> None:
    made: set[str] = set()
    for line in _commands(_tour()):
        for folder in re.findall(r"mkdir -p (\S+)", line):
            made.add(folder)
        for folder in re.findall(r"-od (\S+)", line):
            assert folder in made, f"`-od {folder}` before `mkdir -p {folder}`: {line.strip()}"


def test_readme_tour_calls_pacs_edge_where_make_run_installs_it() -> None:
    # `make run` installs into .venv and puts nothing on PATH: a bare `pacs-edge` is
    # "command not found" for a reader who follows the tour.
    tour = _tour()
    bare = [tour[max(0, m.start() - 30):m.end() + 20].replace("\n", " ")
            for m in re.finditer(r"(?<![\w/.-])pacs-edge (?=[a-z])", tour)]
    assert not bare, bare


def test_readme_tour_leaves_what_it_writes_out_of_git() -> None:
    # The tour runs in the checkout: its key file (ws-certs/), the site key escrow and
    # the retrieved patient data must not be one `git add .` away from a commit.
    tour = _tour()
    written = {path.rstrip("/") for line in _commands(tour)
               for path in re.findall(r"(?:mkdir -p|--out) (\S+)", line)}
    written |= set(re.findall(r"--out (\S+)", tour.replace("`", " ")))
    assert {"received", "site.escrow", "ws-certs"} <= written, written
    tracked = subprocess.run(["git", "check-ignore", "--verbose", "--non-matching",
                              *sorted(written)], cwd=README.parent, capture_output=True,
                             text=True, timeout=30)
    assert tracked.returncode in (0, 1), tracked.stderr
    kept = [line.split("\t")[1] for line in tracked.stdout.splitlines()
            if line.startswith("::")]
    assert not kept, f"not in .gitignore: {kept}"
