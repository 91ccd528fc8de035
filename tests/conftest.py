import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY, compose_run
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from craft_runner import pipeline
from craft_runner.config import register_configs, to_run_config
from craft_runner.report.records import sweep_jobs

CONF = Path(__file__).resolve().parent.parent / "conf"

# No network, no W&B account, no progress bars in tests.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True)
def _threads():
    # Tiny models run fastest on one thread, and stay fast when other processes share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


class Sweeps:
    """Each experiment (conf/experiment/<name>.yaml) composed once per session, as craft-run composes it: its
    config with Hydra's node, its sweep's jobs, and the run config of each cell asked for (cached by overrides).
    Hydra's global state is held only while composing, so other tests can initialise their own."""

    # the _small CrAFT experiments load tiny pretrained backbones from here: one fixed place, whatever the shell says
    PRETRAINED = "/somewhere"

    def __init__(self):
        register_configs()
        self._cfg: dict = {}
        self._rc: dict = {}

    def _compose(self, overrides: tuple, hydra: bool):
        with initialize_config_dir(str(CONF), version_base="1.3"):
            return compose("run", overrides=list(overrides), return_hydra_config=hydra)

    def config(self, name: str):
        """The experiment's composed config, ``hydra`` node included."""
        if name not in self._cfg:
            self._cfg[name] = self._compose((f"experiment={name}",), True)
        return self._cfg[name]

    def jobs(self, name: str, fixed: tuple = ()) -> list[tuple]:
        """The sweep's cells as override tuples (Hydra's basic sweeper's order); the axes named in ``fixed`` (e.g.
        ``seed``) kept at their first value."""
        params = self.config(name).hydra.sweeper.params
        params = OmegaConf.to_container(params) if params else {}
        jobs = sweep_jobs(params, [])
        firsts = {f"{k}={str(v).split(',')[0].strip()}" for k, v in params.items() if k in fixed}
        return [j for j in jobs if all(o in firsts for o in j if o.split("=", 1)[0] in fixed)]

    def run_config(self, name: str, job=()):
        """The typed run config of one cell (``job``: its overrides)."""
        key = (name, tuple(job))
        if key not in self._rc:
            saved = os.environ.get("CRAFT_PRETRAINED_DIR")
            os.environ["CRAFT_PRETRAINED_DIR"] = self.PRETRAINED
            try:
                self._rc[key] = to_run_config(self._compose((f"experiment={name}", *job), False))
            finally:
                if saved is None:
                    os.environ.pop("CRAFT_PRETRAINED_DIR")
                else:
                    os.environ["CRAFT_PRETRAINED_DIR"] = saved
        return self._rc[key]


@pytest.fixture(scope="session")
def sweeps() -> Sweeps:
    return Sweeps()


# The end-to-end tests' one tiny training (helpers.TINY, Adam), made once per session by a BasePTQ W8A8 cell.
TINY_RUN = (*TINY, "compress=ptq", "compress.bits=W8A8")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> SimpleNamespace:
    """``pipeline.run`` of TINY_RUN in a folder of its own: ``metrics`` (what run returned), ``run_dir``, ``cache``."""
    root = tmp_path_factory.mktemp("tiny_run")
    metrics = pipeline.run(compose_run(*TINY_RUN, tmp_path=root))
    return SimpleNamespace(metrics=metrics, run_dir=root / "run", cache=root / "cache")


@pytest.fixture
def tiny_cache(tiny_run, tmp_path) -> Path:
    """``tmp_path / "cache"`` holding the shared tiny training (a copy: the test may add entries or count them); a
    run of helpers.TINY with ``tmp_path=tmp_path`` (any compression) loads it instead of training."""
    return Path(shutil.copytree(tiny_run.cache, tmp_path / "cache"))
