"""Run identity has one home (issue 30 item 3): each schema field declares its role and every key, digest,
name and done-check is derived from it (craft_runner.identity); results.json records the key's inputs and the
report reads them."""

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from helpers import TINY, compose_run

from craft_runner import identity, schema
from craft_runner.cache import cache_key, diagnostics_key, digest, weights_key
from craft_runner.config import to_run_config
from craft_runner.identity import CELL, DIAGNOSTICS, NOTHING, WEIGHTS
from craft_runner.report import records
from craft_runner.results import previous_result
from craft_runner.schema import RunConfig, SharpnessConfig, TrainConfig
from craft_runner.tracking import cell_digest, run_name

ROOT = Path(__file__).resolve().parent.parent

# Representative cells and their training key, diagnostics key and cell digest, computed by the code before the
# roles existed (commit 7ac4633, cache.weights_key / diagnostics_key, tracking.cell_digest): the trainings cached
# and the W&B runs of existing sweeps are found by these, so they must not move.
PINNED = {
    "default": ((), "212bb006bcfd23a2", "e449bc06cc711b89", "21413ac429bbcfe7"),
    "sam_ptq": (("optimizer=sam", "compress=ptq", "compress.bits=W6A6", "sharpness.max_iter=20",
                 "sharpness.plots=false", "train.progress=false"),
                "4a43cbcdb29bad45", "73a47dbfbf44ec94", "974f774b2a7d9d1c"),
    "snt_arch": (("arch=snt", "compress=ptq", "compress.bits=W4A4"),
                 "f8c25ab1fbe7d7ea", "e449bc06cc711b89", "db2a62a1ae65ffa2"),
    "val_fraction": (("dataset.val_fraction=0.2", "optimizer=sgd"),
                     "157775168d6dbf12", "e449bc06cc711b89", "41c0a9c1358054ae"),
    "randsam_export": (("optimizer=randsam", "compress=ptq", "compress.bits=W8A8", "export=onnx_int8", "seed=3"),
                       "adbf713ad48a0718", "e449bc06cc711b89", "a92d6af49ce23cfd"),
}
# The readable names these cells get since the roles (the 4 hex digits now cover every field of the cell,
# name and optimized_metric included; before they left those two out).
NAMES = {"default": "adam-base-none-s0-aecb", "sam_ptq": "sam-base-W6A6-s0-b4e6", "snt_arch": "adam-snt-W4A4-s0-41ce",
         "val_fraction": "sgd-base-none-s0-55c2", "randsam_export": "randsam-base-W8A8-s3-44c3"}


@pytest.fixture(scope="module")
def cells() -> dict:
    return {k: to_run_config(compose_run(*v[0])) for k, v in PINNED.items()}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_keys_and_cell_digest_are_those_from_before_the_roles(cells, name):
    rc = cells[name]
    _, weights, diagnostics, cell = PINNED[name]
    assert (cache_key(rc), digest(diagnostics_key(rc)), cell_digest(dataclasses.asdict(rc))) == \
        (weights, diagnostics, cell)
    assert run_name(dataclasses.asdict(rc)) == NAMES[name]


def test_every_field_declares_a_known_role():
    roles = identity.leaves()
    assert roles["seed"] == WEIGHTS and roles["model.name"] == WEIGHTS and roles["optimizer"] == WEIGHTS
    assert roles["train.progress"] == CELL and roles["dataset.num_workers"] == CELL  # speed, not the weights
    assert roles["sharpness.max_iter"] == DIAGNOSTICS and roles["sharpness.plots"] == CELL
    assert roles["compress"] == CELL and roles["export"] == CELL
    hooks = [f.metadata["key"] for f in dataclasses.fields(RunConfig) if "key" in f.metadata]
    assert hooks and all(callable(identity._hook(h)) for h in hooks)  # a family's key part still resolves
    assert {p for p, r in roles.items() if r == NOTHING} == {
        "paths.data_dir", "paths.cache_dir", "paths.run_dir", "logger.name", "logger.project", "logger.entity",
        "logger.group", "logger.tags", "logger.mode", "rerun", "dry_run"}


def _change(rc: RunConfig, path: str, value) -> RunConfig:
    section, _, name = path.rpartition(".")
    if not section:
        return dataclasses.replace(rc, **{name: value})
    return dataclasses.replace(rc, **{section: dataclasses.replace(getattr(rc, section), **{name: value})})


def _identities(rc: RunConfig) -> tuple:
    return cache_key(rc), digest(diagnostics_key(rc)), cell_digest(dataclasses.asdict(rc))


@pytest.mark.parametrize("path, value, changes", [
    ("train.epochs", 3, "weights, cell"),
    ("optimizer.lr", 0.5, "weights, cell"),
    ("seed", 7, "weights, cell"),
    ("train.eval_batch_size", 7, "cell"),
    ("device", "cpu", "cell"),
    ("sharpness.max_iter", 7, "diagnostics, cell"),
    ("sharpness.before", False, "cell"),
    ("paths.cache_dir", "/elsewhere", ""),
    ("logger.group", "g", ""),
    ("rerun", True, ""),
])
def test_each_identity_changes_with_the_fields_of_its_roles(cells, path, value, changes):
    rc = cells["default"]
    before, after = _identities(rc), _identities(_change(rc, path, value))
    moved = ", ".join(n for n, a, b in zip(("weights", "diagnostics", "cell"), before, after) if a != b)
    assert moved == changes
    recorded = json.loads(json.dumps(dataclasses.asdict(rc), default=str))
    assert identity.same_cell(recorded, dataclasses.asdict(_change(rc, path, value))) == (changes == "")


# A new field needs its role and nothing else: added to a section's class (here a subclass put in its place in
# craft_runner.schema, as an edit of the class would), it enters the keys of its role and stays out of the others,
# whether they are computed from a RunConfig or from a recorded config.
@dataclass
class _Train(TrainConfig):
    new_schedule_knob: float = 1.0  # no metadata: the train section's role, weights
    new_speed_knob: int = field(default=1, metadata={"role": "cell"})
    new_log_knob: str = field(default="a", metadata={"role": "nothing"})
    added_late: float = field(default=0.0, metadata={"role": "weights", "absent_when": 0.0})


@dataclass
class _Sharpness(SharpnessConfig):
    new_probe_count: int = 3  # the sharpness section's role, diagnostics


@dataclass
class _Run(RunConfig):
    new_top_level: int = field(default=0, metadata={"role": "cell"})


@pytest.fixture
def extended(cells, monkeypatch) -> RunConfig:
    for name, cls in (("TrainConfig", _Train), ("SharpnessConfig", _Sharpness), ("RunConfig", _Run)):
        monkeypatch.setattr(schema, name, cls)
    base = cells["default"]
    return _Run(**{**{f.name: getattr(base, f.name) for f in dataclasses.fields(RunConfig)},
                   "train": _Train(**dataclasses.asdict(base.train)),
                   "sharpness": _Sharpness(**dataclasses.asdict(base.sharpness))})


def _all(rc: RunConfig) -> tuple:
    """The three identities, and the cell digest and done-check from the recorded config too."""
    recorded = json.loads(json.dumps(dataclasses.asdict(rc), default=str))
    return (*_identities(rc), cell_digest(recorded))


@pytest.mark.parametrize("path, value, changes", [
    ("train.new_schedule_knob", 2.0, "weights, cell"),
    ("train.added_late", 0.5, "weights, cell"),
    ("train.new_speed_knob", 2, "cell"),
    ("train.new_log_knob", "b", ""),
    ("sharpness.new_probe_count", 4, "diagnostics, cell"),
    ("new_top_level", 1, "cell"),
])
def test_a_new_field_needs_only_its_role(extended, path, value, changes):
    before, after = _all(extended), _all(_change(extended, path, value))
    assert before[2] == before[3]  # the cell digest of a RunConfig and of its record agree
    moved = ", ".join(n for n, a, b in zip(("weights", "diagnostics", "cell"), before, after) if a != b)
    assert moved == changes and (before[3] != after[3]) == ("cell" in changes)
    recorded = json.loads(json.dumps(dataclasses.asdict(extended), default=str))
    assert identity.same_cell(recorded, dataclasses.asdict(_change(extended, path, value))) == (changes == "")


def test_new_fields_at_their_defaults(cells, extended):
    key = weights_key(extended)["train"]
    assert key["new_schedule_knob"] == 1.0  # entered the training key
    assert not {"added_late", "new_speed_knob", "new_log_knob"} & set(key)  # absent at 0.0; not weights
    assert diagnostics_key(extended)["new_probe_count"] == 3 and "new_probe_count" not in weights_key(extended)
    assert identity.inputs(extended, CELL)["new_top_level"] == 0 and "new_top_level" not in weights_key(extended)
    assert identity.leaves()["train.new_log_knob"] == NOTHING


def test_a_top_level_field_without_a_role_is_refused(cells, monkeypatch):
    @dataclass
    class Undeclared(RunConfig):
        knob: int = 0

    monkeypatch.setattr(schema, "RunConfig", Undeclared)
    with pytest.raises(TypeError, match="'knob' declares no role"):
        identity.inputs(cells["default"], CELL)


def test_an_export_of_none_is_the_cell_without_an_export(cells):
    rc = cells["default"]
    assert rc.export.name == "none"
    without = {k: v for k, v in dataclasses.asdict(rc).items() if k != "export"}
    assert cell_digest(rc) == cell_digest(without) == cell_digest(dataclasses.replace(rc, export=None))
    onnx = cells["randsam_export"]
    assert cell_digest(onnx) != cell_digest(dataclasses.replace(onnx, export=None))


def test_hydra_leaves_out_of_job_folder_names_only_what_names_no_cell():
    """conf/run.yaml's exclude_keys against the roles: each listed field is of role nothing, or names the sweep's
    own folder (experiment), or is no field (hparams_search picks a sweeper); each field of role nothing that
    says where files go or controls the run is listed. The logger's are not: sweeps run with logger=wandb keep
    the folders they have (a new entry would rename the folders of finished cells)."""
    run = yaml.safe_load((ROOT / "conf" / "run.yaml").read_text())
    listed = run["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]
    roles = identity.leaves()
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    for key in listed:
        if key in roles:
            assert roles[key] == NOTHING or key == "experiment", key
        else:
            assert key.split(".")[0] not in fields and (ROOT / "conf" / key).is_dir(), key
    nothing = {p for p, r in roles.items() if r == NOTHING and not p.startswith("logger.")}
    assert nothing <= set(listed)
    # experiment may stay out because each experiment sweeps into a folder of its own
    dirs = {}
    for f in sorted((ROOT / "conf" / "experiment").glob("*.yaml")):
        sweep_dir = ((yaml.safe_load(f.read_text()) or {}).get("hydra") or {}).get("sweep", {}).get("dir")
        if sweep_dir is None:  # run.yaml's: a new dated folder each time
            continue
        assert sweep_dir not in dirs, f"{f.name} and {dirs.get(sweep_dir)} sweep into {sweep_dir}"
        dirs[sweep_dir] = f.name
    assert len(dirs) > 20


def test_results_json_records_the_key_inputs_and_the_report_reads_them(tiny_run, tmp_path, monkeypatch):
    rec = json.loads((tiny_run.run_dir / "results.json").read_text())
    entry = tiny_run.cache / rec["cache_key"]
    assert rec["identity"][WEIGHTS] == json.loads((entry / "key.json").read_text())
    assert digest(rec["identity"][WEIGHTS]) == rec["cache_key"]
    assert digest(rec["identity"][CELL]) == cell_digest(rec["config"])
    expected = records.training_fields(rec["config"])  # rebuilt, as for an older record

    def no_rebuild(config):
        raise AssertionError("a record with its identity must not be rebuilt")

    with monkeypatch.context() as m:
        m.setattr(records, "legacy_training_inputs", no_rebuild)
        new = records.load_results(tiny_run.run_dir / "results.json")
    assert new.fields["optimizer.lr"] == 1e-3 and "train.progress" not in new.fields and "version" not in new.fields
    assert {k: v for k, v in new.fields.items() if not k.startswith("compress.")} == expected

    old_dir = tmp_path / "old"
    shutil.copytree(tiny_run.run_dir, old_dir)
    del rec["identity"]
    (old_dir / "results.json").write_text(json.dumps(rec))
    old = records.load_results(old_dir / "results.json")
    assert old.fields == new.fields and old.train_fields == new.train_fields


def test_a_finished_cell_is_skipped_whatever_its_nothing_fields(tiny_run):
    rc = to_run_config(compose_run(*TINY, "compress=ptq", "compress.bits=W8A8", tmp_path=tiny_run.run_dir.parent))
    assert previous_result(rc) is not None  # the session's tiny run (conftest.TINY_RUN)
    assert previous_result(_change(_change(rc, "logger.group", "g"), "dry_run", True)) is not None
    assert previous_result(_change(rc, "paths.cache_dir", "/elsewhere")) is not None
    assert previous_result(_change(rc, "train.progress", True)) is None  # a field of the cell, as before
    assert previous_result(_change(rc, "compress.calib_size", 8)) is None
