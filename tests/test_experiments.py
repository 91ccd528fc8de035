"""Every experiment (conf/experiment/) composes and its sweep expands to the cells of its paper table or figure.

The expected numbers of cells are counted here from the papers (CrAFT Tables 2-5, Figures 1, 2, 4; SNT Tables 3,
4, Figures 5-7), not read from the configs.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.datasets import load_digits

from craft_runner.data import build_digits, check_dataset
from craft_runner.report.papers import GENERIC, layout_for
from craft_runner.schema import ConfigError, DatasetConfig

CONF = Path(__file__).resolve().parent.parent / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SEEDS = 5  # every _small experiment states claims: 5 seeds (make run's digits_default keeps 3)
DEFAULT_SEEDS = 3
TASKS2, BITS = 7, 5  # CrAFT Table 2: seven tasks, five bit widths

CELLS = {
    "craft_table1": 2 * 4, "craft_table1_small": 2 * 4 * SEEDS,
    # x 4 quantizers (BasePTQ, PTQ4ViT, GPTQ, SmoothQuant + BasePTQ) and W3A16: issue 31's extension
    "craft_table2": TASKS2 * 2 * 4 * (BITS + 1), "craft_table2_small": 2 * 4 * (BITS + 1) * SEEDS,
    "craft_table3": 4 * 2 * 2 * 4, "craft_table3_small": 3 * 2 * 2 * 4 * SEEDS,  # BasePTQ and GPTQ
    "craft_table4": 6 * 2, "craft_table4_small": 2 * SEEDS,
    "craft_table5": 3 * 2, "craft_table5_small": 2 * SEEDS,
    "craft_fig1": 2, "craft_fig1_small": 2 * SEEDS,
    "craft_fig2": 2, "craft_fig2_small": 2 * SEEDS,
    "craft_fig4": 2 * 3 * (7 + 5), "craft_fig4_small": 2 * 3 * (5 + 5) * SEEDS,  # x 3: SparseGPT too
    "snt_table3_ptq": 3 * 3, "snt_table3_ptq_small": 3 * 3 * SEEDS,
    "snt_table3_qat": (2 + 3 + 3) * 2, "snt_table3_qat_small": (2 + 3 + 3) * SEEDS * 2,  # x2: act_quant
    "snt_table4": 3, "snt_table4_small": 3 * SEEDS,
    "snt_fig5": 2 * 2 * 3 * 9, "snt_fig5_small": 2 * 2 * 3 * 4 * SEEDS,
    "snt_fig6": 3 * 6, "snt_fig6_small": 3 * 4 * SEEDS,
    "snt_fig7": 2 * 2 * 9, "snt_fig7_small": 2 * 2 * 4 * SEEDS,
    "cheap_sam": 11 * 4 * 2 * 5, "cheap_sam_small": 11 * 6 * 2 * 5,  # + GPTQ W4A16, SparseGPT 50 %
    "digits_default": 2 * 4 * DEFAULT_SEEDS,
    "craft_pretrain_small": 1,
}


def test_every_experiment_is_counted():
    assert set(EXPERIMENTS) == set(CELLS)
    full = [e for e in EXPERIMENTS if not e.endswith("_small") and e != "digits_default"]
    assert all(f"{e}_small" in EXPERIMENTS for e in full)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_expands_to_its_cells(sweeps, name):
    cfg = sweeps.config(name)
    jobs = sweeps.jobs(name)
    assert len(jobs) == CELLS[name]
    assert len(set(jobs)) == len(jobs)
    for job in (jobs[0], jobs[-1]):  # bad values fail in to_run_config
        rc = sweeps.run_config(name, job)
        assert rc.seed in range(DEFAULT_SEEDS if name == "digits_default" else SEEDS)
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    header = [ln for ln in text.splitlines() if ln.startswith("#")]
    if name != "craft_pretrain_small":
        assert any(f"craft-run -m experiment={name}" in ln for ln in header)
        assert any("craft-report" in ln for ln in header)
        assert cfg.hydra.sweep.dir in (f"outputs/sweeps/{name}", "outputs/default")
    if name.endswith("_small") and name != "craft_pretrain_small":
        seeds = sorted({j.split("=")[1] for job in jobs for j in job if j.startswith("seed=")})
        assert seeds == [str(i) for i in range(SEEDS)]
    if name != "craft_pretrain_small":
        assert layout_for(name) is not GENERIC


def test_fig4_sweeps_both_panels(sweeps):
    """(a) unstructured 10-70 % and (b) every N:M pattern at 50 %, for both criteria and both optimizers."""
    params = sweeps.config("craft_fig4").hydra.sweeper.params
    assert set(params["+shared/pruner"].split(",")) == {"magnitude", "wanda", "sparsegpt"}
    assert set(params["optimizer"].split(",")) == {"adam", "sam"}
    shapes = set()
    for preset in params["+shared/prune_shape"].split(","):
        c = OmegaConf.load(CONF / "shared" / "prune_shape" / f"{preset}.yaml")
        shapes.add(f"{c.n}:{c.m}" if c.pattern == "nm" else f"{round(100 * c.sparsity)}%")
        assert c.pattern == "unstructured" or c.sparsity == 0.5
    assert shapes == {f"{s}%" for s in range(10, 80, 10)} | {"2:4", "4:8", "8:16", "16:32", "32:64"}
    nm = sweeps.run_config("craft_fig4", ["+shared/prune_shape=nm16_32", "compress.criterion=wanda"]).compress
    assert (nm.name, nm.pattern, nm.n, nm.m, nm.criterion, nm.calib_size) == ("prune", "nm", 16, 32, "wanda", 4096)
    assert (nm.wanda_inputs, nm.count) == ("dense", "truncate")  # Wanda's prune_vit


def test_snt_qat_cells_are_the_tables(sweeps):
    """SNT Table 3 (QAT): ResNet-18/ImageNet with ADAM and ARCH; Mixer-S and MobileNet-V1/CIFAR-10 with all three."""
    got = set()
    for job in sweeps.jobs("snt_table3_qat"):
        rc = sweeps.run_config("snt_table3_qat", job)
        approach = "SAM" if rc.optimizer.name == "sam" else "ARCH" if rc.arch.rprelu else "ADAM"
        assert rc.compress.name == "qat" and (rc.compress.w_bits, rc.compress.a_bits) == (4, 4)
        got.add((rc.model.name, rc.dataset.name, approach, rc.compress.act_quant))
    cells = {("resnet18", "imagenet", "ADAM"), ("resnet18", "imagenet", "ARCH")} | {
        (m, "cifar10", a) for m in ("mixer_s_cifar", "mobilenetv1_cifar") for a in ("ADAM", "SAM", "ARCH")}
    # each with distiller's activation coverage (reference) and with every layer input quantized (ours)
    assert got == {c + (q,) for c in cells for q in ("distiller", "layer_inputs")}


@pytest.mark.parametrize("name", ["snt_table3_ptq", "snt_table3_ptq_small", "snt_table4", "snt_fig6_small",
                                  "craft_table2", "craft_table2_small", "digits_default"])
def test_ptq_definition_follows_each_papers_code(sweeps, name):
    """SNT's PTQ cells use distiller's post-training quantizer (one max-based scale per layer: the single
    candidate r = 1); CrAFT's and the default job's PTQ4ViT's BasePTQ/PTQ4ViT search."""
    # the seed, the optimizer (its own package) and the task set no compression key: one of each is enough
    assert not any("compress" in OmegaConf.load(p) for p in (CONF / "shared" / "task").glob("*.yaml"))
    seen = set()
    for job in sweeps.jobs(name, fixed=("seed", "optimizer", "+shared/task")):
        c = sweeps.run_config(name, job).compress
        if c.name == "ptq":
            seen.add((c.search, c.weight_granularity if c.method == "base" else "ptq4vit", c.scale_steps == 1))
    # (the CrAFT _small variants search a coarser grid, 20 candidates, for the CPU)
    want = {("cosine", "tensor", True)} if name.startswith("snt") else {("cosine", "tensor", False),
                                                                        ("cosine", "ptq4vit", False)}
    assert seen and seen <= want, seen


def test_small_craft_is_a_transfer(sweeps):
    rc = sweeps.run_config("craft_table2_small", sweeps.jobs("craft_table2_small")[0])
    pre = sweeps.run_config("craft_pretrain_small", ["+shared/tiny=test_vit"])
    assert rc.model.pretrained and rc.model.checkpoint_path == f"{sweeps.PRETRAINED}/test_vit.pt"
    assert rc.dataset.classes == [5, 6, 7, 8, 9] and pre.dataset.classes == [0, 1, 2, 3, 4]
    assert rc.model.kwargs == pre.model.kwargs and rc.model.name == pre.model.name == "test_vit"


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_job_composes(sweeps, name):
    for job in sweeps.jobs(name):  # the cells composed by the fast tests above are not composed again
        seed = dict(o.split("=", 1) for o in job).get("seed")  # the sweep's own axis reaches the typed config
        assert sweeps.run_config(name, job).seed == (int(seed) if seed is not None else 0)


# --------------------------------------------------------------------------------------------- the small variants' data


def test_digits_class_subset_is_relabelled_in_the_order_given():
    target = load_digits().target
    b = build_digits(DatasetConfig(classes=[7, 5, 9]), 16)
    labels = b.train_y.tolist() + b.test_y.tolist()
    assert b.num_classes == 3 and sorted(set(labels)) == [0, 1, 2]
    assert [labels.count(i) for i in range(3)] == [int((target == c).sum()) for c in (7, 5, 9)]
    assert check_dataset(DatasetConfig(classes=[0, 1, 2, 3, 4])).num_classes == 5
    with pytest.raises(ConfigError, match="dataset.classes"):
        check_dataset(DatasetConfig(classes=[3, 12]))
    with pytest.raises(ConfigError, match="digits only"):
        check_dataset(DatasetConfig(name="synthetic", classes=[0, 1]))
    with pytest.raises(ConfigError, match="dataset.classes"):
        DatasetConfig(classes=[4, 4])


def test_digits_augmentation_shifts_without_flipping():
    assert build_digits(DatasetConfig(), 16).augment is None
    b = build_digits(DatasetConfig(augment=True), 16)
    x = b.train_x[:8]
    out = b.augment(x, torch.Generator().manual_seed(3)).numpy()
    p = 2  # CIFAR's 4 pixels at 32x32, scaled to 16x16
    assert float(x.min()) == -1.0  # the background: what the shifts pad with
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-1.0)
    moved = 0
    for i in range(len(x)):
        shifts = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                  if np.array_equal(padded[i, :, dy:dy + 16, dx:dx + 16], out[i])]
        assert shifts, f"image {i} is not a shifted copy of its input (a flip?)"
        moved += (p, p) not in shifts
    assert moved > 0


def _make_tables():
    spec = importlib.util.spec_from_file_location("make_tables", CONF.parent / "scripts" / "make_tables.py")
    mt = importlib.util.module_from_spec(spec)
    sys.modules["make_tables"] = mt  # its dataclass looks its module up
    spec.loader.exec_module(mt)
    return mt


def test_make_tables_finds_every_small_experiment_in_lanes_that_keep_shared_trainings_together():
    mt = _make_tables()
    found = mt.discover()
    small = [e.name for e in found]
    shipped = sorted(p.stem[:-len("_small")] for p in (CONF / "experiment").glob("*_small.yaml")
                     if p.stem != "craft_pretrain_small")
    assert sorted(small) == shipped
    two = mt.lanes(found, 2)
    assert len(two) == 2 and sorted(two[0] + two[1]) == sorted(small)
    for lane in two:  # each lane keeps the run order
        assert lane == [e for e in small if e in lane]
    # the experiments that reuse craft_table2's / snt_table3_ptq's / snt_fig5's trainings run after them in one lane
    lane_of = {e: i for i, lane in enumerate(two) for e in lane}
    for first, later in (("craft_table2", ("craft_table4", "craft_fig1", "craft_fig2", "craft_fig4")),
                         ("snt_table3_ptq", ("snt_table3_qat",)), ("snt_fig5", ("snt_fig6", "snt_table4"))):
        for e in later:
            assert lane_of[e] == lane_of[first] and small.index(e) > small.index(first)
    assert mt.lanes(found, 1) == [small]


def _experiment(conf, name, header="", sweep=True):
    (conf / "experiment").mkdir(parents=True, exist_ok=True)
    body = "hydra:\n  sweeper:\n    params:\n      seed: 0,1\n" if sweep else "seed: 0\n"
    (conf / "experiment" / f"{name}_small.yaml").write_text(f"# @package _global_\n{header}{body}")


def test_make_tables_order_rule(tmp_path):
    mt = _make_tables()
    for name, header in (("d", "# make tables: after b\n"), ("b", ""), ("a", "# make tables: after c\n"),
                         ("c", ""), ("s", "# make tables: lane scratch\n"),
                         ("t", "# make tables: lane scratch, after s\n")):
        _experiment(tmp_path, name, header)
    _experiment(tmp_path, "single", sweep=False)  # no sweep: not a table (as craft_pretrain_small)
    # after the ones named, otherwise by name: b, c are ready first; a waits for c, d for b
    found = mt.discover(tmp_path)
    assert [e.name for e in found] == ["b", "c", "a", "d", "s", "t"]
    assert mt.lanes(found, 2) == [["b", "c", "a", "d"], ["s", "t"]]
    _experiment(tmp_path, "u", "# make tables: lane other\n")
    with pytest.raises(ValueError, match="3 lanes"):
        mt.lanes(mt.discover(tmp_path), 2)
    for header, msg in (("# make tables: after t\n", "another lane"), ("# make tables: after nothing\n", "unknown"),
                        ("# make tables: first\n", "expected 'lane <name>'")):
        _experiment(tmp_path, "u", header)
        with pytest.raises(ValueError, match=msg):
            mt.discover(tmp_path)
