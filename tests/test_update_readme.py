"""scripts/update_readme.py: docs/results.md's measured paragraphs are replaced between their markers, nothing else."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "update_readme.py"


def _module():
    spec = importlib.util.spec_from_file_location("update_readme", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tables(tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "timings.json").write_text(json.dumps({
        "jobs": 2, "threads": 1, "cpus": 2, "total_minutes": 100.4,
        "experiments": {"craft_table2": {"minutes": 12.34, "ok": True}, "snt_fig5": {"minutes": 50.0, "ok": False}}}))
    (tables / "claims-summary.md").write_text("- CrAFT Table 1, SAM lowers λmax: **holds**.\n")
    return tables


def test_blocks_are_replaced_and_the_rest_kept(tmp_path):
    mod = _module()
    doc = tmp_path / "results.md"
    doc.write_text("intro\n<!-- small-minutes:begin -->\nold minutes\n<!-- small-minutes:end -->\nmiddle\n"
                   "<!-- small-claims:begin -->\nold claims\n<!-- small-claims:end -->\nend\n")
    assert mod.main([str(_tables(tmp_path)), "--doc", str(doc), "--date", "2026-12-06"]) == 0
    text = doc.read_text()
    assert text.startswith("intro\n<!-- small-minutes:begin -->\n")
    assert "old minutes" not in text and "\nmiddle\n" in text
    assert "**100 min**" in text and "craft_table2 12.3" in text and "snt_fig5 50.0 (failed)" in text
    assert "2 lane(s)" in text and "2026-12-06" in text
    # make tables' claims list is exploratory: the claims block is make claims' alone
    assert text.endswith("<!-- small-claims:begin -->\nold claims\n<!-- small-claims:end -->\nend\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md", "tables"]  # no temporary file left


def test_the_claims_run_paragraphs(tmp_path):
    mod = _module()
    claims = tmp_path / "claims"
    claims.mkdir()
    (claims / "timings.json").write_text(json.dumps({
        "jobs": 2, "cpus": 2, "total_minutes": 150.2,
        "runs": [{"sweep": "craft_table1", "round": 1, "seeds": 10, "minutes": 20.0, "rc": 0},
                 {"sweep": "craft_table1", "round": 2, "seeds": 10, "minutes": 5.5, "rc": 0},
                 {"sweep": "snt_fig5-2", "round": 1, "seeds": 10, "minutes": 3.0, "rc": 1}],
        "work": {"a": {"train_s": 5400.0, "diagnostics_s": 1800.0, "compress_eval_s": 3600.0},
                 "b": {"train_s": 0.0, "diagnostics_s": 0.0, "compress_eval_s": 0.0}}}))
    (claims / "claims-summary.md").write_text("- SNT Table 4, x: **undecided**.\n")
    doc = tmp_path / "results.md"
    doc.write_text("<!-- claims-run:begin -->\n<!-- claims-run:end -->\n<!-- small-minutes:begin -->\nkept\n"
                   "<!-- small-minutes:end -->\n<!-- small-claims:begin -->\n<!-- small-claims:end -->\n")
    assert mod.main([str(claims), "--claims", "--doc", str(doc), "--date", "2026-12-07"]) == 0
    text = doc.read_text()
    assert "**150 min**" in text and "craft_table1 25.5," in text and "snt_fig5-2 3.0 (stopped once)" in text
    assert "3.0 thread-hours" in text and "training 50 %" in text and "diagnostics 17 %" in text
    assert "- SNT Table 4, x: **undecided**." in text and "\nkept\n" in text
    assert "budget" not in text  # a run without one says nothing of it
    t = json.loads((claims / "timings.json").read_text())
    t.update(budget_hours=2.5, skipped=[{"sweep": "snt_table3_qat", "seeds": 5, "estimate_minutes": 61.4}])
    (claims / "timings.json").write_text(json.dumps(t))
    assert mod.main([str(claims), "--claims", "--doc", str(doc), "--date", "2026-12-07"]) == 0
    assert "Its budget, 2.5 h:" in doc.read_text() and "snt_table3_qat (5 seeds, about 61 min)" in doc.read_text()


def test_it_writes_docs_results_by_default_and_keeps_the_old_option_name(tmp_path):
    mod = _module()
    assert mod.DOC == ROOT / "docs" / "results.md"
    doc = tmp_path / "r.md"
    doc.write_text("<!-- small-minutes:begin -->\n<!-- small-minutes:end -->\n"
                   "<!-- small-claims:begin -->\n<!-- small-claims:end -->\n")
    assert mod.main([str(_tables(tmp_path)), "--readme", str(doc), "--date", "2026-12-06"]) == 0
    assert "**100 min**" in doc.read_text()


def test_a_document_without_its_markers_is_refused_and_left_as_it_was(tmp_path):
    mod = _module()
    with pytest.raises(ValueError, match="small-claims:begin"):
        mod.replace_block("no markers here", "small-claims", "x")
    with pytest.raises(ValueError):
        mod.replace_block("<!-- a:end --> <!-- a:begin -->", "a", "x")
    doc = tmp_path / "r.md"
    before = "<!-- small-claims:begin -->\nold\n<!-- small-claims:end -->\nno minutes block\n"
    doc.write_text(before)
    with pytest.raises(ValueError, match="small-minutes"):
        mod.main([str(_tables(tmp_path)), "--doc", str(doc)])
    assert doc.read_text() == before


def test_docs_results_has_both_blocks_filled_and_the_readme_none():
    text = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    for name in ("small-minutes", "claims-run", "small-claims"):
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        assert text.count(begin) == 1 and text.count(end) == 1
        body = text.split(begin)[1].split(end)[0]
        assert "regenerated by scripts/update_readme.py" not in body and len(body.strip()) > 100
    assert "<!--" not in (ROOT / "README.md").read_text(encoding="utf-8")
