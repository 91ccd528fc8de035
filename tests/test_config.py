from pathlib import Path

import pytest
import yaml
from helpers import CONF, compose_run
from omegaconf import OmegaConf

from craft_runner.config import ConfigError, to_run_config

GROUPS = ["model", "dataset", "optimizer", "arch", "compress", "export", "logger", "experiment"]


def options(group):
    return sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option):
    cfg = compose_run(f"{group}={option}")
    rc = to_run_config(cfg)
    if group == "experiment":
        return
    node = getattr(rc, group)
    # each plain value the option's file sets reaches the typed config
    own = OmegaConf.load(Path(CONF) / group / f"{option}.yaml")
    for key in own:
        value = own._get_node(key)._value()
        if key != "defaults" and not OmegaConf.is_interpolation(own, key) and isinstance(value, (str, int, float)):
            assert getattr(node, key) == value, (group, option, key)


def test_every_group_has_options():
    for g in GROUPS:
        assert options(g), g


def test_bits_shorthand_sets_both_widths():
    rc = to_run_config(compose_run("compress=ptq", "compress.bits=W6A16"))
    assert (rc.compress.w_bits, rc.compress.a_bits) == (6, 16)


@pytest.mark.parametrize("override,key", [
    ("compress.w_bits=1", "compress.w_bits"),
    ("compress.a_bits=33", "compress.a_bits"),
    ("compress.bits=W8", "compress.bits"),
])
def test_bits_out_of_range(override, key):
    with pytest.raises(ConfigError, match=key):
        to_run_config(compose_run("compress=ptq", override))


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_sparsity_out_of_range(value):
    with pytest.raises(ConfigError, match=r"compress.sparsity=.*\[0, 1\)"):
        to_run_config(compose_run("compress=prune", f"compress.sparsity={value}"))


def test_typo_in_a_key_fails_at_compose():
    with pytest.raises(Exception, match="lrr"):
        compose_run("optimizer.lrr=0.1")


def test_wrong_type_fails_at_compose():
    with pytest.raises(Exception, match="epochs"):
        compose_run("train.epochs=many")


def test_error_message_is_one_line():
    with pytest.raises(ConfigError) as e:
        to_run_config(compose_run("optimizer.lr=-1"))
    assert "\n" not in str(e.value) and "optimizer.lr" in str(e.value)


def test_experiment_overrides_the_defaults():
    rc = to_run_config(compose_run("experiment=digits_default"))
    assert rc.train.epochs == 4 and rc.sharpness.max_iter == 20
    # and a command-line override still wins over the experiment
    assert to_run_config(compose_run("experiment=digits_default", "train.epochs=3")).train.epochs == 3


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_sweeps_compose_at_every_value(sweeps, experiment):
    """Each value of each swept parameter of a paper experiment composes and validates (each experiment composed
    once per session: the conftest's ``sweeps``)."""
    params = sweeps.config(experiment).hydra.sweeper.params or {}
    for key, values in params.items():
        for value in str(values).split(","):
            rc = sweeps.run_config(experiment, [f"{key}={value.strip()}"])
            if "/" in key:  # a preset of shared/: no one key to look at
                continue
            got = rc
            for part in key.split("."):
                got = getattr(got, part)
            want = yaml.safe_load(value.strip())
            if key in GROUPS:  # a group's option: the name its file gives
                got, want = got.name, OmegaConf.load(Path(CONF) / key / f"{value.strip()}.yaml").name
            assert got == want, (key, value, got)


def test_sweep_job_dirnames_are_one_short_path_component():
    from craft_runner.run import job_dirname

    assert job_dirname("optimizer=sam,compress.bits=W8A8") == "optimizer=sam,compress.bits=W8A8"
    assert job_dirname("paths.x=/a/b") == "paths.x=_a_b"
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    assert len(job_dirname(long_a)) == 120 and job_dirname(long_a) != job_dirname(long_b)
