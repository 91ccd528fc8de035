"""One-line refusals that keep their reason (issue 28, item 4): a wrong type in a user's own config file, an
override the shell split at a space or that Hydra's grammar cannot read."""

import pytest
from test_faults import craft_run


def _error(capsys) -> list:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("craft-run: error")]


@pytest.mark.parametrize("group,text", [
    ("experiment", "# @package _global_\noptimizer:\n  lr: fast\n"),
    ("optimizer", "defaults:\n  - adam\nlr: fast\n"),
])
def test_a_wrong_type_in_a_users_config_file_keeps_its_reason(tmp_path, monkeypatch, capsys, group, text):
    (tmp_path / "conf" / group).mkdir(parents=True)
    (tmp_path / "conf" / group / "mine.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    code = craft_run(monkeypatch, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"{group}=mine", "dry_run=true")
    err = _error(capsys)
    assert code == 2 and len(err) == 1
    assert "Value 'fast' of type 'str' could not be converted to Float" in err[0] and "lr" in err[0]
    assert not err[0].endswith(":")


def test_a_value_split_at_a_space_gets_a_hint_to_quote_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = craft_run(monkeypatch, "paths.data_dir=/tmp/my", "data", "dry_run=true")
    err = _error(capsys)
    assert code == 2 and len(err) == 1
    assert err[0].endswith('must be quoted in the shell, e.g. "paths.data_dir=/tmp/my data")')


def test_a_value_hydra_cannot_parse_gets_a_hint_to_quote_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = craft_run(monkeypatch, "paths.data_dir=/tmp/my data (2)", "dry_run=true")
    err = _error(capsys)
    assert code == 2 and len(err) == 1 and "quote a value with spaces" in err[0]
    assert "\"paths.data_dir='/tmp/my data (2)'\"" in err[0]
    # the quoting it suggests is accepted
    assert craft_run(monkeypatch, "paths.data_dir='/tmp/my data (2)'", "dry_run=true") == 0
