"""CrAFT's released recipe as a named option (issue 28 item 15) and the Optuna search on a validation split
(item 16), composed from the real configs."""

import json
import math
import subprocess
import sys

import pytest
from helpers import CONF, compose_run
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from craft_runner.config import to_run_config

# What johnheo/craft's finetune/fine_tune.sh passes (--epochs 10 -b 8 --wd 0.01 --lr 1e-4, no --optimizer: the
# parser's default Adam) and its parser's SAM defaults (--SAM-rho 0.05, --SAM-adaptive off), copied by hand.
CODE = {"epochs": 10, "batch_size": 8, "weight_decay": 0.01, "lr": 1e-4, "rho": 0.05, "adaptive": False}


def _rc(*overrides):
    return to_run_config(compose_run(*overrides))


@pytest.mark.parametrize("optimizer", ["adam", "sam"])
def test_code_recipe_gives_the_released_scripts_values(optimizer):
    # a cell of craft_table2 (Oxford-IIIT Pets, as fine_tune.sh) with the option added last, as documented
    rc = _rc("experiment=craft_table2", "+shared/task=oxford_pets", f"optimizer={optimizer}",
             "+shared=craft_code_recipe")
    assert (rc.train.epochs, rc.train.batch_size) == (CODE["epochs"], CODE["batch_size"])
    assert (rc.optimizer.lr, rc.optimizer.weight_decay) == (CODE["lr"], CODE["weight_decay"])
    assert rc.train.scheduler == "cosine" and rc.train.warmup_epochs == 0 and rc.train.label_smoothing == 0
    assert rc.dataset.name == "oxford_pets" and rc.model.name == "vit_base_patch16_224.augreg_in21k"
    if optimizer == "sam":
        assert rc.optimizer.base == "adam"
        assert (rc.optimizer.rho, rc.optimizer.adaptive) == (CODE["rho"], CODE["adaptive"])


@pytest.mark.parametrize("overrides,name",
                         [(("optimizer=sgd",), "sgd"), (("optimizer=sam", "optimizer.base=sgd"), "sam")])
def test_code_recipe_with_sgd_gives_the_last_revision_that_runs(overrides, name):
    # 7d096f4 (2023-08-19): torch.optim.SGD(lr, momentum=0.9, weight_decay), --SAM wrapping it; documented command
    rc = _rc("experiment=craft_table2", "+shared/task=oxford_pets", *overrides, "optimizer.lr=1e-4",
             "+shared=craft_code_recipe")
    o = rc.optimizer
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay) == (name, 1e-4, 0.9, False, 0.01)
    assert name == "sgd" or (o.base, o.rho, o.adaptive) == ("sgd", 0.05, False)


def test_paper_recipe_stays_the_default():
    rc = _rc("experiment=craft_table2", "+shared/task=oxford_pets", "optimizer=adam")
    assert (rc.train.epochs, rc.optimizer.name, rc.optimizer.weight_decay, rc.optimizer.lr) == (5, "adam", 0.0, 1e-4)


def test_code_recipe_states_only_what_differs_from_the_paper():
    recipe = OmegaConf.load(f"{CONF}/shared/craft_code_recipe.yaml")
    assert OmegaConf.to_container(recipe) == {"optimizer": {"weight_decay": 0.01}, "train": {"epochs": 10}}


def test_hparams_search_composes_an_optuna_search_on_the_validation_split():
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose("run", overrides=["hparams_search=craft_lr_rho", "+shared=small_craft",
                                        "+shared/tiny=test_vit"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
    assert set(cfg.hydra.sweeper.params) == {"optimizer.lr", "optimizer.rho"}
    rc = to_run_config(cfg)
    assert rc.optimized_metric == "val_fp_acc" and rc.dataset.val_fraction > 0
    assert rc.optimizer.name == "sam" and rc.dataset.classes == [5, 6, 7, 8, 9]


@pytest.mark.slow
def test_four_trial_search_on_digits(tmp_path):
    """A real Optuna search: 4 trials of the smallest model on digits; the best value is one trial's val top-1."""
    sweep = tmp_path / "sweep"
    args = ["hparams_search=craft_lr_rho", "model=test_resnet", "dataset.img_size=16", "train.epochs=1",
            "train.progress=false", "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler.n_startup_trials=4",
            f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'cache'}"]
    p = subprocess.run([sys.executable, "-m", "craft_runner.run", *args], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.name == "optuna" and set(best.best_params) == {"optimizer.lr", "optimizer.rho"}
    records = [json.loads(f.read_text()) for f in sweep.rglob("results.json")]
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    assert all(r["splits"]["val"] > 0 and r["config"]["optimized_metric"] == "val_fp_acc" for r in records)
    vals = [r["metrics"]["val_fp_acc"] for r in records]
    assert any(math.isclose(best.best_value, v, rel_tol=1e-12) for v in vals)
    assert best.best_value == pytest.approx(max(vals))
    # the best parameters are those of the trial that recorded the best value
    winner = [r for r in records if r["config"]["optimizer"]["lr"] == best.best_params["optimizer.lr"]]
    assert len(winner) == 1 and winner[0]["config"]["optimizer"]["rho"] == best.best_params["optimizer.rho"]
    assert winner[0]["metrics"]["val_fp_acc"] == pytest.approx(best.best_value, rel=1e-12)
