"""RULES.md and the code agree: every rule is marked where the code applies it, every marker names a
rule, and every test and function that RULES.md cites exists. Quick: it reads files, runs nothing.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_rules.py
"""
import ast
import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A marker is a comment that starts with "RULE n:" (after optional dashes): `# RULE 3: ...`.
MARKER = re.compile(r"#[ \-]*RULE (\d+):")
# `module.function` or `module.Class.method` in backquotes, e.g. `train.seed_everything`.
CODE_NAME = re.compile(r"`(\w+(?:\.\w+)+)`")
# A test's name, but not the `test_loss` of a file name such as tests/test_loss.py.
TEST_NAME = re.compile(r"(?<![/\w])(test_\w+)\b(?!\.py)")
TEST_FILE = re.compile(r"tests/(test_\w+\.py)")


def read(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def rule_sections():
    """{rule number: the text of its section} from the `## n. title` headings of RULES.md."""
    parts = re.split(r"^## (\d+)\. ", read("RULES.md"), flags=re.MULTILINE)
    return {int(number): text for number, text in zip(parts[1::2], parts[2::2])}


def field(section, name):
    """The text of a `**Name.**` field, up to the next field or the end of the section."""
    match = re.search(rf"\*\*{name}\.\*\*(.*?)(?=\*\*\w+\.\*\*|\Z)", section, flags=re.DOTALL)
    return match.group(1) if match else None


def python_files():
    """The project's modules, the lessons and commands on top and the parts in support/: the
    files RULE markers belong in."""
    return sorted(glob.glob(os.path.join(REPO, "*.py")) +
                  glob.glob(os.path.join(REPO, "support", "*.py")))


def module_name(path):
    """'train' for REPO/train.py, 'support.run_folder' for REPO/support/run_folder.py."""
    return os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")


def definitions(path):
    """Every name a module defines, as 'function', 'Class' and 'Class.method'."""
    tree = ast.parse(read(path))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    names.add(f"{node.name}.{item.name}")
    return names


def innermost_definition(tree, line):
    """The name of the innermost function or class around `line` ('Class.method' for methods)."""
    best = None
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        if node.lineno <= line <= node.end_lineno:
            if best is None or node.lineno >= best.lineno:
                best = node
    if best is None:
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and best in node.body:
            return f"{node.name}.{best.name}"
    return best.name


def markers():
    """[(module, line number, rule number, enclosing definition or None)] of every RULE marker."""
    found = []
    for path in python_files():
        text = read(path)
        tree = ast.parse(text)
        module = module_name(path)
        for number, line in enumerate(text.splitlines(), start=1):
            for match in MARKER.finditer(line):
                where = innermost_definition(tree, number)
                found.append((module, number, int(match.group(1)), where))
    return found


def code_names(section):
    """The (module, name) pairs a **Code.** line cites, e.g. ('train', 'seed_everything') or
    ('support.run_folder', 'rng_states')."""
    modules = {module_name(path) for path in python_files()}
    cited = []
    for dotted in CODE_NAME.findall(field(section, "Code") or ""):
        parts = dotted.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # the longest module the name starts with
            module = ".".join(parts[:cut])
            if module in modules:
                cited.append((module, ".".join(parts[cut:])))
                break
    return cited


def test_rules_are_numbered_one_to_n():
    assert sorted(rule_sections()) == list(range(1, len(rule_sections()) + 1))


def test_every_rule_has_a_marker_in_the_code():
    marked = {rule for _, _, rule, _ in markers()}
    missing = sorted(set(rule_sections()) - marked)
    assert not missing, f"rules with no '# RULE n:' comment in the project's .py files: {missing}"


def test_every_marker_names_an_existing_rule():
    rules = set(rule_sections())
    stray = []
    for module, line, rule, _ in markers():
        if rule not in rules:
            stray.append(f"{module}:{line} RULE {rule}")
    assert not stray, f"markers naming no rule of RULES.md: {stray}"


def test_every_rule_has_a_proof_or_says_it_is_advice():
    lacking = [n for n, section in rule_sections().items() if field(section, "Proof") is None]
    assert not lacking, f"rules with no **Proof.** line: {lacking}"
    for number, section in rule_sections().items():
        proof = field(section, "Proof")
        names_a_test = TEST_NAME.search(proof) or TEST_FILE.search(proof)
        assert names_a_test or "advice" in proof.lower(), f"rule {number}: proof names no test"


def test_every_test_named_as_proof_exists():
    tests = "".join(read(path) for path in glob.glob(os.path.join(REPO, "tests", "test_*.py")))
    for number, section in rule_sections().items():
        proof = field(section, "Proof") or ""
        for name in TEST_NAME.findall(proof):
            assert f"def {name}(" in tests, f"rule {number}: no test named {name}"
        for name in TEST_FILE.findall(proof):
            path = os.path.join(REPO, "tests", name)
            assert os.path.exists(path), f"rule {number}: no tests/{name}"


def test_every_function_named_on_a_code_line_exists():
    for number, section in rule_sections().items():
        assert code_names(section), f"rule {number}: its **Code.** line names no module.function"
        for module, name in code_names(section):
            defined = definitions(module.replace(".", os.sep) + ".py")
            assert name in defined, f"rule {number}: {module}.{name} does not exist"


def test_every_marker_sits_in_a_function_its_rule_names():
    sections = rule_sections()
    unnamed = []
    for module, line, rule, where in markers():
        if rule not in sections:
            continue  # reported by test_every_marker_names_an_existing_rule
        cited = {f"{m}.{name}" for m, name in code_names(sections[rule])}
        if where is None:
            unnamed.append(f"{module}:{line} RULE {rule} at module level")
            continue
        # A class named on the Code line covers the markers in its methods.
        places = {f"{module}.{where}", f"{module}.{where.split('.')[0]}"}
        if not places & cited:
            unnamed.append(f"{module}:{line} RULE {rule} in {module}.{where}")
    assert not unnamed, f"markers whose place is not on their rule's **Code.** line: {unnamed}"


# ----------------------------------------------------------------------------- RULE 6

@pytest.mark.parametrize("lr, warned", [("1e-5", True), ("5e-4", False)])
def test_a_learning_rate_below_5e_5_prints_the_rule_6_warning(lr, warned, capsys):
    import train
    train.parse_args(["--lr", lr])
    output = capsys.readouterr()
    warning = "RULE 6" in output.out + output.err
    assert warning == warned
