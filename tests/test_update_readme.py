"""scripts/update_readme.py: the README's measured paragraphs are replaced between their markers, nothing else."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "update_readme.py"


def _module():
    spec = importlib.util.spec_from_file_location("update_readme", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_blocks_are_replaced_and_the_rest_kept(tmp_path):
    mod = _module()
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- small-minutes:begin -->\nold minutes\n<!-- small-minutes:end -->\nmiddle\n"
                      "<!-- small-claims:begin -->\nold claims\n<!-- small-claims:end -->\nend\n")
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "timings.json").write_text(json.dumps({
        "jobs": 2, "threads": 1, "cpus": 2, "total_minutes": 100.4,
        "experiments": {"craft_table2": {"minutes": 12.34, "ok": True}, "snt_fig5": {"minutes": 50.0, "ok": False}}}))
    (tables / "claims-summary.md").write_text("- CrAFT Table 1, SAM lowers λmax: **holds**.\n")
    assert mod.main([str(tables), "--readme", str(readme), "--date", "2026-12-06"]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- small-minutes:begin -->\n")
    assert text.endswith("<!-- small-claims:end -->\nend\n")
    assert "old minutes" not in text and "old claims" not in text and "\nmiddle\n" in text
    assert "**100 min**" in text and "craft_table2 12.3" in text and "snt_fig5 50.0 (failed)" in text
    assert "2 lane(s)" in text and "2026-12-06" in text
    assert "- CrAFT Table 1, SAM lowers λmax: **holds**.\n<!-- small-claims:end -->" in text


def test_a_readme_without_its_markers_is_refused(tmp_path):
    mod = _module()
    with pytest.raises(ValueError, match="small-claims:begin"):
        mod.replace_block("no markers here", "small-claims", "x")
    with pytest.raises(ValueError):
        mod.replace_block("<!-- a:end --> <!-- a:begin -->", "a", "x")
