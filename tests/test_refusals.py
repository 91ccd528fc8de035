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


# ------------------------------------------------------------------- _small CrAFT without its backbones (item 5)


def test_a_missing_tiny_backbone_names_make_pretrained(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from craft_runner.schema import ConfigError
    from craft_runner.validate import check_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CRAFT_PRETRAINED_DIR", raising=False)
    with pytest.raises(ConfigError) as e:
        check_checkpoint(SimpleNamespace(name="test_vit", checkpoint_path="outputs/pretrained/test_vit.pt"))
    assert "\n" not in str(e.value) and "`make pretrained`" in str(e.value) and "CRAFT_PRETRAINED_DIR" in str(e.value)
    assert f"relative to {tmp_path}" in str(e.value)
    with pytest.raises(ConfigError) as e:  # any other missing file: no advice that does not apply
        check_checkpoint(SimpleNamespace(name="resnet20", checkpoint_path=str(tmp_path / "mine.pt")))
    assert str(e.value) == f"model.checkpoint_path={tmp_path / 'mine.pt'} is not allowed: no such file"
    (tmp_path / "outputs" / "pretrained").mkdir(parents=True)
    (tmp_path / "outputs" / "pretrained" / "test_vit.pt").write_bytes(b"x")
    check_checkpoint(SimpleNamespace(name="test_vit", checkpoint_path="outputs/pretrained/test_vit.pt"))


def test_a_small_craft_sweep_without_its_backbones_is_refused_before_it_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CRAFT_PRETRAINED_DIR", raising=False)
    code = craft_run(monkeypatch, "-m", "experiment=craft_table2_small", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    err = _error(capsys)
    assert code == 2 and len(err) == 1 and "`make pretrained`" in err[0] and "test_vit.pt" in err[0]
    assert not (tmp_path / "sweep").exists()


def test_dry_run_says_so_groups_the_sentence_and_exits_2_when_no_cell_can_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CRAFT_PRETRAINED_DIR", raising=False)
    code = craft_run(monkeypatch, "-m", "+shared=small_craft", "+shared/tiny=test_vit", "seed=0,1", "dry_run=true")
    out = capsys.readouterr().out
    assert code == 2
    assert out.count("`make pretrained`") == 1  # once, under the list; each cell refers to it
    assert out.count("pretrained weights missing: [1]") == 2
    assert "2 without their pretrained weights; no cell can run" in out


def test_a_single_dry_run_that_cannot_run_exits_2_and_leaves_no_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CRAFT_PRETRAINED_DIR", raising=False)
    code = craft_run(monkeypatch, "+shared=small_craft", "+shared/tiny=test_vit", "dry_run=true",
                     f"hydra.run.dir={tmp_path / 'run'}")
    out = capsys.readouterr().out
    assert code == 2 and "pretrained weights missing: model.checkpoint_path=" in out and "no cell can run" in out
    assert not (tmp_path / "run").exists()
