"""The README's "Reading along with the paper" map may only cite names that exist in sftguard.py.

Every code span in that section must be one of:
  `name` or `name()`     a top-level function, class or constant of sftguard.py, or a Config field
  `Config.field`         a Config field
  `--flag [value]`       a command-line flag, i.e. a Config field (the value is not checked)
  `§N` or `§N Title`     a section header "# N. Title..." of sftguard.py (N may be 7b)
  `path/to/file.py`      a file of the repository
so that renaming or deleting a function without updating the map fails this test.
"""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Reading along with the paper"


def map_section(readme: str) -> str:
    """The text from the heading to the next '## ' heading (or the end of the file)."""
    lines = readme.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == HEADING]
    assert starts, f"README.md has no {HEADING!r} section"
    body = []
    for line in lines[starts[0] + 1:]:
        if line.startswith("## "):
            break
        body.append(line)
    return "\n".join(body)


def defined_names(source: str) -> tuple[set[str], set[str], dict[str, str]]:
    """(top-level functions/classes/constants, Config fields, {section number: section title})."""
    tree = ast.parse(source)
    names, fields = set(), set()
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    config = classes.get("Config")  # its fields, and those of the --help groups it is composed of
    for cls in [config] + [classes[b.id] for b in config.bases if isinstance(b, ast.Name) and b.id in classes] if config else []:
        fields.update(s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name))
    sections = dict(re.findall(r"^# (\d+[a-z]?)\. (.+)$", source, flags=re.M))
    return names, fields, sections


def unresolved(section: str, source: str, root: Path = REPO) -> list[str]:
    """The code spans of the map that name nothing in the source or the repository (empty when the map is sound)."""
    names, fields, sections = defined_names(source)
    bad = []
    for span in re.findall(r"`([^`\n]+)`", section):
        span = span.strip()
        if m := re.fullmatch(r"§(\d+[a-z]?)(?: (.+))?", span):
            ok = m[1] in sections and (m[2] is None or sections[m[1]].startswith(m[2]))
        elif m := re.fullmatch(r"--([a-z_0-9]+)(?: \S+)?", span):
            ok = m[1] in fields
        elif re.fullmatch(r"[\w/.-]+\.(py|md|txt|json)", span):
            ok = (root / span).is_file()
        elif m := re.fullmatch(r"Config\.([a-z_0-9]+)", span):
            ok = m[1] in fields
        elif m := re.fullmatch(r"([A-Za-z_][A-Za-z_0-9]*)(?:\(\))?", span):
            ok = m[1] in names or m[1] in fields
        else:
            ok = False  # a span the test cannot check has no place in the map
        if not ok:
            bad.append(span)
    return bad


def test_every_name_the_map_cites_exists():
    section = map_section((REPO / "README.md").read_text(encoding="utf-8"))
    source = (REPO / "sftguard.py").read_text(encoding="utf-8")
    assert unresolved(section, source) == [], "the reading map cites names that sftguard.py does not define; update README.md"


def test_the_map_covers_every_part_of_the_method():
    section = map_section((REPO / "README.md").read_text(encoding="utf-8"))
    cited = set(re.findall(r"`([A-Za-z_][A-Za-z_0-9]*)(?:\(\))?`", section))
    for core in ("split_facts", "slick_category", "learn_task_format", "self_distillation_loss", "set_trainable",
                 "PARAM_GROUPS", "l2_pull", "run_method", "accuracy", "relative_drop"):
        assert core in cited, f"the reading map does not cite {core}"
    assert len(cited) >= 25, f"the reading map cites only {len(cited)} names"


def test_the_checker_catches_a_stale_name(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("")
    source = '# 3. Fact splitting\nclass Config:\n    seed: int = 0\ndef split_facts():\n    pass\nPARAM_GROUPS = {}\n'
    section = ("`split_facts` `split_facts()` `PARAM_GROUPS` `Config.seed` `--seed 3` `§3` `§3 Fact splitting` "
               "`tests/test_x.py` `split_entities` `--no_such_flag` `§9` `§3 Stage 2` `python sftguard.py --seed 1` `tests/test_y.py`")
    assert unresolved(section, source, tmp_path) == ["split_entities", "--no_such_flag", "§9", "§3 Stage 2",
                                                     "python sftguard.py --seed 1", "tests/test_y.py"]
