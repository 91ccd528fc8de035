"""Where a run's results go: results.json always (craft_runner.pipeline), W&B when asked for.

W&B never decides whether results.json is written: every W&B call is guarded, a failure is logged once and the
tracker goes quiet. Mode (``logger.mode=auto``): online only when there is a credential for the W&B host itself
(``WANDB_API_KEY``, or a ``~/.netrc`` machine entry for api.wandb.ai or the host of ``WANDB_BASE_URL``) and the
host answers a short socket probe; otherwise offline (``wandb sync`` uploads later). ``WANDB_MODE`` wins over auto.

A run's W&B record: group = the experiment (else the sweep directory), one tag per choice (model, dataset,
optimizer, arch, compression, seed), a readable name unique per cell (``adam-base-W4A16-s0-1a2b``), per-epoch
training curves logged as training goes (``train/loss``, ``train/lr``, ``train/epoch_seconds``,
``train/second_pass_share`` against ``epoch``), the metrics in the summary (with ``export/*``, the real
artifact's scalars, when the cell exports), the diagnostics' figures as images.
Its id is kept in the run directory (``wandb_id``, and results.json) and in the training state, so a requeued or
resumed run continues the same W&B run.
"""

from __future__ import annotations

import dataclasses
import logging
import netrc
import os
import urllib.parse
from pathlib import Path
from typing import Optional, Protocol

from craft_runner import identity
from craft_runner.atomic import atomic_write_json  # noqa: F401  (re-exported)
from craft_runner.schema import LoggerConfig

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
ID_FILE = "wandb_id"


class Tracker(Protocol):
    run_id: Optional[str]
    resumed: bool
    next_step: int  # the first step (epoch) the W&B run still takes: 0, or a resumed online run's next step

    def start(self, state_id: Optional[str] = None) -> None: ...

    def log_epoch(self, record: dict) -> None: ...

    def log(self, metrics: dict) -> None: ...

    def log_images(self, images: dict) -> None: ...

    def info(self) -> dict: ...

    def finish(self, status: str) -> None: ...


class NullTracker:
    run_id: Optional[str] = None
    resumed = False
    next_step = 0

    def start(self, state_id: Optional[str] = None) -> None:
        pass

    def log_epoch(self, record: dict) -> None:
        pass

    def log(self, metrics: dict) -> None:
        pass

    def log_images(self, images: dict) -> None:
        pass

    def info(self) -> dict:
        return {}

    def finish(self, status: str) -> None:
        pass


# --------------------------------------------------------------------------------------------- mode


def wandb_base_url() -> str:
    base = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    return base if "://" in base else f"https://{base}"


def wandb_host() -> str:
    """The W&B server's host (``WANDB_BASE_URL``, else api.wandb.ai)."""
    return urllib.parse.urlparse(wandb_base_url()).hostname or "api.wandb.ai"


def has_credential(host: str) -> bool:
    """A W&B key for ``host``: WANDB_API_KEY, or a netrc ``machine`` entry for that very host (an entry for
    another host, or netrc's ``default``, is not one)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        entry = netrc.netrc(str(path)).hosts.get(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[-1])


def answers(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the server at ``url`` gives any HTTP answer within ``timeout`` (an HTTP error is an answer).
    An HTTP request, not a bare TCP connect: a proxy or firewall may accept connections and never answer."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # URLError, refused, timeout, TLS failure, a malformed URL
        return False


def wandb_mode(cfg: LoggerConfig) -> tuple[str, str]:
    """(mode, why): online only with a credential for the W&B host that answers within a few seconds."""
    if cfg.mode in ("offline", "disabled"):
        return cfg.mode, f"logger.mode={cfg.mode}"
    env = os.environ.get("WANDB_MODE")
    if cfg.mode == "auto" and env in ("offline", "disabled", "dryrun"):
        return ("offline" if env == "dryrun" else env), f"WANDB_MODE={env}"
    host, url = wandb_host(), wandb_base_url()
    if cfg.mode == "auto" and env != "online" and not has_credential(host):
        return "offline", f"no W&B credential for {host} (WANDB_API_KEY or a ~/.netrc entry)"
    if not answers(url):
        return "offline", f"{url} does not answer within {PROBE_TIMEOUT_S:.0f} s"
    return "online", f"credential for {host}"


# --------------------------------------------------------------------------------------------- names


def arch_label(arch: dict) -> str:
    if arch["name"] != "snt" or (arch.get("preact") and arch.get("rprelu")):
        return arch["name"]
    return "snt_preact" if arch.get("preact") else "snt_rprelu" if arch.get("rprelu") else "snt_none"


def _compression(config: dict) -> str:
    from craft_runner.compress import compression_label

    try:
        return compression_label(config["compress"])
    except Exception:  # a label is a convenience; never fail a run on it
        return str(config["compress"].get("name", "none"))


# What the readable part of a name shows (the digest covers the rest of the cell).
_SHOWN = ("optimizer", "arch", "compress", "seed")


def run_name(config: dict) -> str:
    """``<optimizer>-<arch>-<compression>-s<seed>-<4 hex>``: readable, and unique per cell — the digest covers
    every other setting of the cell (craft_runner.identity: model, data set, schedule, learning rate, ...), so
    cells that differ elsewhere differ."""
    label = _compression(config).replace(" ", "").replace("/", "_")
    rest = {k: v for k, v in identity.inputs(config, identity.CELL).items() if k not in _SHOWN}
    rest["optimizer"] = {k: v for k, v in config["optimizer"].items() if k != "name"}
    return (f"{config['optimizer']['name']}-{arch_label(config['arch'])}-{label}-s{config['seed']}-"
            f"{identity.digest(rest, 4)}")


def run_tags(config: dict, extra=()) -> list[str]:
    """One tag per choice, ``group:value`` (W&B allows 64 characters)."""
    tags = [f"model:{config['model']['name']}", f"dataset:{config['dataset']['name']}",
            f"optimizer:{config['optimizer']['name']}", f"arch:{arch_label(config['arch'])}",
            f"compress:{_compression(config)}", f"seed:{config['seed']}", *extra]
    if (export := (config.get("export") or {}).get("name", "none")) != "none":
        tags.append(f"export:{export}")
    return [t[:64] for t in tags]


def cell_digest(config) -> str:
    """What makes two runs the same cell wherever their run directory is (a resumed run in a new directory):
    the cell's identity (craft_runner.identity), of a RunConfig or a recorded config."""
    return identity.digest(identity.inputs(config, identity.CELL))


def start_training(tracker: Tracker, state: Optional[dict], config: dict) -> dict:
    """Start ``tracker`` for a training: it continues the W&B run the training ``state`` names when that run is
    this cell's, and logs the epochs trained before; returns what the training state keeps of the W&B run."""
    cell = cell_digest(config)
    previous = (state or {}).get("wandb") or {}
    tracker.start(previous.get("id") if previous.get("cell") == cell else None)
    # The epochs trained before: a new W&B run has none of them; a continued one may lack some (SIGTERM of a
    # requeue ends the W&B service of the job before the job itself) and drops the steps it already has.
    for record in (state or {}).get("history", []):
        if record["epoch"] >= tracker.next_step:
            tracker.log_epoch(record)
    return {"wandb": {"id": tracker.run_id, "cell": cell}} if tracker.run_id else {}


def replay_cached(tracker: Tracker, history: list) -> None:
    """Start ``tracker`` for cached weights: the curves of the training that made them, unless the W&B run
    continued has them already."""
    tracker.start()
    if not tracker.resumed:
        for record in history:
            tracker.log_epoch(record)


# The export record's scalars a run logs beside its metrics, as ``export/<name>``.
EXPORT_SCALARS = ("accuracy", "bytes_ratio", "latency_ratio_b1", "latency_ratio_b64", "max_logit_diff")


def export_scalars(record: Optional[dict]) -> dict:
    """``export/<name>`` of an ``export`` record with status ok (nothing for none or simulated only)."""
    if not record or record.get("status") != "ok":
        return {}
    return {f"export/{k}": record[k] for k in EXPORT_SCALARS if k in record}


# --------------------------------------------------------------------------------------------- W&B run


def new_run_id() -> str:
    """8 characters of [a-z0-9], as W&B makes them."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbTracker:
    """One W&B run per craft-run run, started lazily by :meth:`start` (after a job got its training lock)."""

    def __init__(self, cfg: LoggerConfig, config: dict, run_dir: Path, reuse_run_dir_id: bool = True):
        self.cfg, self.config, self.run_dir = cfg, config, Path(run_dir)
        self.run, self.run_id, self.resumed, self.mode, self._wandb = None, None, False, None, None
        self._broken = False
        self._reuse = reuse_run_dir_id
        self.name = run_name(config)
        self.group = cfg.group
        self.tags = run_tags(config, list(cfg.tags))

    def _guard(self, what: str, fn, *args, **kwargs):
        if self._broken or self.run is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # results.json must not depend on W&B
            log.warning("W&B %s failed, W&B logging stops for this run (results.json is unaffected): %s", what, e)
            self._broken = True
            return None

    def _previous_id(self, state_id: Optional[str]) -> Optional[str]:
        """The id to continue: the run directory's (a requeued or rerun job whose last attempt did not finish
        ok), else the one in the training state this run resumes from (same cell)."""
        f = self.run_dir / ID_FILE
        if self._reuse and f.exists():
            return f.read_text().strip() or None
        return state_id

    def start(self, state_id: Optional[str] = None) -> None:
        if self.run is not None or self._broken:
            return
        try:
            import wandb

            self._wandb = wandb
            run_id = self._previous_id(state_id)
            self.resumed = run_id is not None
            run_id = run_id or new_run_id()
            mode, why = wandb_mode(self.cfg)
            self.run = self._init(run_id, mode)
            if self.run is None and mode == "online":
                mode, why = "offline", "online start failed"
                self.run = self._init(run_id, mode)
            if self.run is None:
                raise RuntimeError("wandb.init returned no run")
            self.mode, self.run_id = mode, self.run.id
            (self.run_dir / ID_FILE).write_text(self.run_id + "\n")
            self.run.define_metric("epoch")
            self.run.define_metric("train/*", step_metric="epoch")
            log.info("W&B run %s %r in group %r (%s: %s)%s", self.run_id, self.name, self.group, mode, why,
                     ", resumed" if self.resumed else "")
        except Exception as e:
            log.warning("W&B unavailable, results.json only: %s", e)
            self._broken = True

    def _init(self, run_id: str, mode: str):
        wandb = self._wandb
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            return wandb.init(
                project=self.cfg.project, entity=self.cfg.entity, group=self.group, tags=self.tags, name=self.name,
                job_type="train" if self.config["compress"]["name"] == "none" else "compress", config=self.config,
                dir=str(self.run_dir), mode=mode, id=run_id, resume="allow", reinit="finish_previous",
                settings=wandb.Settings(init_timeout=20 if mode == "online" else 60, silent=True, console="off",
                                        disable_git=True, x_disable_stats=True))
        except Exception as e:
            if mode != "online":
                raise
            log.warning("W&B online start failed, falling back to offline: %s", e)
            return None

    def log_epoch(self, record: dict) -> None:
        """One training epoch, as it ends: W&B step = the epoch."""
        steps = record.get("steps") or 0
        row = {"epoch": record["epoch"], "train/loss": record.get("loss"), "train/lr": record.get("lr"),
               "train/epoch_seconds": record.get("seconds"),
               "train/second_pass_share": (record.get("second_passes", 0) / steps) if steps else None}
        row = {k: v for k, v in row.items() if v is not None}
        self._guard("log", lambda: self.run.log(row, step=int(record["epoch"])))

    @property
    def next_step(self) -> int:
        """A resumed online run knows the steps it has (it would drop lower ones); an offline run does not."""
        try:
            return int(getattr(self.run, "step", 0) or 0) if self.mode == "online" else 0
        except Exception:
            return 0

    def log(self, metrics: dict) -> None:
        """The run's results, in the summary (no history step)."""
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        self._guard("summary", lambda: self.run.summary.update(flat))

    def log_images(self, images: dict) -> None:
        """``{name: png path}`` as W&B images, in one history step after the last epoch."""
        if not images or self.run is None:
            return
        wandb = self._wandb
        self._guard("images", lambda: self.run.log({k: wandb.Image(str(p)) for k, p in images.items()}))

    def info(self) -> dict:
        if self.run is None:
            return {}
        return {"id": self.run_id, "name": self.name, "group": self.group, "mode": self.mode,
                "project": self.cfg.project, "resumed": self.resumed}

    def finish(self, status: str) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=0 if status == "ok" else 1)
        except Exception as e:
            log.warning("W&B finish failed (results.json is unaffected): %s", e)
        self.run = None


def make_tracker(cfg: LoggerConfig, config: dict, run_dir: Path, reuse_run_dir_id: bool = True) -> Tracker:
    """A tracker for ``cfg`` (not started). ``reuse_run_dir_id``: continue the W&B run whose id the run
    directory holds (false when its last attempt finished ok and the run is done again)."""
    if cfg.name == "wandb":
        return WandbTracker(cfg, config, run_dir, reuse_run_dir_id)
    return NullTracker()


# --------------------------------------------------------------------------------------------- reports


def log_report(group: str, tables: dict, images: list, logger_cfg: Optional[LoggerConfig] = None,
               directory: Optional[Path] = None) -> Optional[str]:
    """One W&B run (job_type ``report``) in ``group`` holding ``tables`` (name → pandas DataFrame, logged as
    W&B tables) and ``images`` (PNG paths); same mode rules as the runs. Returns the run id, or None when W&B
    failed (a warning says why). ``directory``: where the W&B files go (default: the current directory)."""
    import wandb

    cfg = logger_cfg or LoggerConfig(name="wandb")
    if isinstance(cfg, dict):
        cfg = LoggerConfig(**{k: v for k, v in cfg.items() if k in {f.name for f in dataclasses.fields(LoggerConfig)}})
    mode, _ = wandb_mode(cfg)
    try:
        run = wandb.init(project=cfg.project, entity=cfg.entity, group=group, job_type="report",
                         name=f"report-{Path(str(group)).name}"[:128], dir=str(directory or Path.cwd()), mode=mode,
                         tags=list(cfg.tags) or None, reinit="finish_previous",
                         settings=wandb.Settings(silent=True, console="off", disable_git=True, x_disable_stats=True))
        run.log({**{name: wandb.Table(dataframe=df.reset_index(drop=True)) for name, df in tables.items()},
                 **{Path(p).stem: wandb.Image(str(p)) for p in images}})
        run_id = run.id
        run.finish()
        return run_id
    except Exception as e:
        log.warning("W&B report failed: %s", e)
        return None
