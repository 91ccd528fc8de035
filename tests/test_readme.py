"""The README stays short and every command, link and name in it (and in docs/) stays true."""
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
from helpers import compose_run
from omegaconf import OmegaConf

from craft_runner.config import to_run_config
from craft_runner.report import cli as report_cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_LINES = 150


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _make_targets() -> set:
    targets = set()
    for line in _text(ROOT / "Makefile").splitlines():
        m = re.match(r"^([A-Za-z0-9][\w.-]*)\s*:(?!=)", line)  # a rule, not a `VAR := value`
        if m:
            targets.add(m.group(1))
    return targets


def _block_lines(text: str) -> list:
    """The lines of the fenced code blocks."""
    return [line for b in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S) for line in b.splitlines()]


def _code(text: str) -> list:
    """Inline code spans and the lines of fenced blocks: where commands are written."""
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    return _block_lines(text) + re.findall(r"`([^`\n]+)`", prose)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set:
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", _text(path), flags=re.M)}


def test_the_readme_is_short():
    n = len(_text(README).splitlines())
    assert n < MAX_LINES, f"README.md has {n} lines; the limit is {MAX_LINES}: move detail to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_make_target_named_exists(page):
    named = set()
    for code in _code(_text(page)):
        named |= set(re.findall(r"(?:^|\s|\()make ([a-z][\w-]*)", code))
    assert page != README or {"run", "test", "tables", "claims", "pretrained", "bench", "smoke-paper"} <= named
    missing = named - _make_targets()
    assert not missing, f"{page.name} names make targets the Makefile lacks: {sorted(missing)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_points_to_an_existing_file(page):
    bad = []
    links = re.findall(r"\]\(([^)\s]+)\)", _text(page))
    for link in links:
        if re.match(r"^[a-z]+:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            bad.append(f"{link} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            bad.append(f"{link} (no heading #{anchor} in {path.name})")
    assert not bad, f"{page.name}: broken links: {bad}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_experiment_named_exists(page):
    names = set()
    for value in re.findall(r"\bexperiment=([\w,]+)", _text(page)):
        names |= set(filter(None, value.split(",")))
    known = {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    assert page != README or names, "the README names no experiment= at all: the check would be empty"
    assert not names - known, f"{page.name} names experiments conf/experiment/ lacks: {sorted(names - known)}"


def test_every_craft_report_flag_named_exists():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        report_cli.main(["--help"])
    known = set(re.findall(r"--[a-z][\w-]*", out.getvalue()))
    assert {"--paper", "--claims", "--format", "--out"} <= known
    bad = {}
    for page in PAGES:
        for code in _code(_text(page)):
            if re.search(r"craft-(report|table)\b", code):
                flags = set(re.findall(r"(?:^|\s)(--[a-z][\w-]*)", code)) - known
                if flags:
                    bad.setdefault(page.name, set()).update(flags)
    assert not bad, f"craft-report has no such options: {bad}"


def _runs(pages) -> list:
    """The craft-run command lines of the pages' code blocks, as override lists (a sweep's first values); a line
    with an elision (``...``), a continuation or a word that is no override is not a command to compose."""
    runs = []
    for page in pages:
        for code in _block_lines(_text(page)):
            if "craft-run" not in code or "..." in code or code.rstrip().endswith("\\"):
                continue
            words = shlex.split(code.split("#")[0])
            if not words or not words[0].endswith("craft-run"):
                continue
            words = [w for w in words[1:] if w != "-m"]
            if words and all("=" in w for w in words):
                runs.append((page.name, [w.split(",")[0] for w in words]))
    return runs


def test_the_readme_has_its_five_commands():
    assert len(_runs([README])) >= 4  # a cell, a sweep, a paper table, a dry run (and the report)
    assert any("craft-report" in c and "--paper" in c for c in _code(_text(README)))


@pytest.mark.parametrize("page,overrides", _runs(PAGES), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_every_craft_run_in_a_code_block_composes(page, overrides):
    cfg = compose_run(*overrides)  # an unknown group, option or key raises here
    to_run_config(cfg)  # and a bad value here, as craft-run would refuse it
    for o in overrides:
        key, value = o.lstrip("+").split("=", 1)
        if "/" not in key and key not in ("experiment", "hparams_search") and "." in key:
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert str(node) == value, f"{o} did not reach the config ({node})"


def _walk() -> str:
    text = _text(ROOT / "docs" / "architecture.md")
    start = text.index("## One run, from `craft-run` to `results.json`")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _resolve(dotted: str):
    """``craft_runner.<module path>.<attribute path>`` → the object; None when the first name is no module of
    the package (a variable such as ``p.cache_dir``)."""
    import importlib

    parts = dotted.split(".")
    module, i = None, 0
    for i in range(len(parts), 0, -1):
        try:
            module = importlib.import_module("craft_runner." + ".".join(parts[:i]))
            break
        except ModuleNotFoundError:
            continue
    if module is None:
        return None
    obj = module
    for name in parts[i:]:
        obj = getattr(obj, name)  # AttributeError: the walk names a function the code no longer has
    return obj


def test_the_walk_of_one_run_names_functions_that_exist():
    named = []
    defaults = compose_run()  # a config key (`compress.bn_recalib`) is no function
    for span in re.findall(r"`([^`\n]+)`", _walk()):
        span = span.replace("craft_runner.run:", "run.")
        m = re.fullmatch(r"([a-z_][\w.]*)(?:\(.*\))?", span)
        if not m or "." not in m.group(1) or re.search(r"\.(json|yaml|pt|py|log)$", m.group(1)):
            continue
        if OmegaConf.select(defaults, m.group(1), default="<absent>") != "<absent>":
            continue
        obj = _resolve(m.group(1))
        if obj is not None:
            assert callable(obj) or isinstance(obj, type), f"`{span}` in the walk is not a function or class"
            named.append(m.group(1))
    # the walk's spine, in the order the code calls it
    spine = ["run.main", "run.job", "config.to_run_config", "results.done", "pipeline.prepare",
             "validate.validate", "pipeline.execute", "results.write", "pipeline.train_or_load", "train.fit",
             "pipeline.compress", "compress.apply_compression", "pipeline.record", "pipeline.optimized_value"]
    missing = [s for s in spine if s not in named]
    assert not missing, f"the walk does not name {missing}"
    positions = [named.index(s) for s in spine]
    assert positions == sorted(positions), "the walk names the spine out of call order"
