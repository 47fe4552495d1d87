"""The shape of the project (README's map): four lessons and the commands on top, every other
module in support/, each within its line budget, no line over 100 columns, no import circle
(imports inside functions counted), and no part of support/ importing a command. Quick: it reads
files, runs nothing.

    python -m pytest -q tests/test_layout.py
"""
import ast
import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LESSONS = {"model": 400, "data": 500, "train": 650, "evaluate": 450}
COMMANDS = {"bench", "verify", "grid"}  # what people type besides the lessons (at most three)
OTHER_BUDGET = 400
COLUMNS = 100


def modules():
    """{module name: path} of every project module: 'train', 'support.run_folder', ..."""
    paths = glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "support", "*.py"))
    return {os.path.relpath(path, REPO)[:-3].replace(os.sep, "."): path for path in paths}


def imported_modules(path, known):
    """The project modules that the file at `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from support import files` imports support.files; `from data import X`, data.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(name for name in names if name in known)
    return found


def import_graph():
    known = modules()
    return {name: imported_modules(path, known) for name, path in known.items()}


def test_the_top_level_holds_the_lessons_and_the_commands_alone():
    top = {name for name in modules() if "." not in name}
    assert top <= set(LESSONS) | COMMANDS, f"modules on top that belong in support/: {top}"
    assert len(COMMANDS) <= 3


@pytest.mark.parametrize("name", sorted(modules()))
def test_each_module_is_within_its_budget(name):
    lines = open(modules()[name]).read().splitlines()
    budget = LESSONS.get(name, OTHER_BUDGET)
    assert len(lines) <= budget, f"{name}: {len(lines)} lines, over its budget of {budget}"
    wide = [number for number, line in enumerate(lines, 1) if len(line) > COLUMNS]
    assert not wide, f"{name}: lines over {COLUMNS} columns: {wide}"


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()

    def reaches(start, goal, seen):
        for name in graph[start]:
            if name == goal or (name not in seen and reaches(name, goal, seen | {name})):
                return True
        return False

    circles = sorted(name for name in graph if reaches(name, name, {name}))
    assert not circles, f"modules on an import circle: {circles}"


def test_no_part_imports_a_command():
    commands = {"train", "evaluate"} | COMMANDS
    graph = import_graph()
    wrong = {name: graph[name] & commands for name in graph if name.startswith("support.")}
    assert not any(wrong.values()), f"support/ importing a command: {wrong}"
