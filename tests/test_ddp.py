"""The SAM family under DistributedDataParallel: two CPU processes, gloo, a tiny model.

The rule (craft_runner.train.train_step): on a two-pass step the first backward is not all-reduced, so
rank r perturbs with its local gradient g_r (e_r = ρ g_r/‖g_r‖); the second backward is all-reduced, so
every rank steps with g_s = mean_r ∇L_r(w + e_r). LookSAM stores g_v = mean_r (g_s − (⟨g_r, g_s⟩/‖g_r‖²) g_r)
(an all-reduce every k steps); its plain steps all-reduce as usual: g = mean_r g_r.
"""

import json
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from craft_runner.optim import RandomSAM

STEPS = 4
CONFIGS = {
    "sam": dict(name="sam", base="sgd", lr=0.1, momentum=0.9, rho=0.1),
    "looksam": dict(name="looksam", base="sgd", lr=0.1, momentum=0.9, rho=0.1, k=2, alpha=0.7),
    "randsam": dict(name="randsam", base="adam", lr=0.01, rho=0.1, sam_prob=0.5, seed=1),
}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def shards(world):
    """STEPS global batches of 12 samples; rank r gets rows r::world."""
    g = torch.Generator().manual_seed(7)
    data = [(torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g))
            for _ in range(STEPS)]
    return [[(x[r::world], y[r::world]) for x, y in data] for r in range(world)]


def worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from craft_runner.config import OptimizerConfig, TrainConfig
    from craft_runner.optim import build_optimizer
    from craft_runner.train import train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = TrainConfig(channels_last=False, progress=False)
        for name, kw in CONFIGS.items():
            model = DDP(make_model())
            opt = build_optimizer(model, OptimizerConfig(**kw))
            for x, y in shards(world)[rank]:
                train_step(model, x, y, nn.functional.cross_entropy, opt, cfg, torch.device("cpu"))
            flat = torch.cat([p.detach().flatten() for p in model.module.parameters()])
            torch.save(flat, os.path.join(out_dir, f"{name}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def hand_rule(name, world):
    from test_optim import HandAdam, HandSGD, Ref

    kw = CONFIGS[name]
    ref = Ref(make_model())
    data = list(zip(*shards(world)))  # per step: the ranks' shards
    w, gv = ref.w, None
    hand = HandSGD(kw["lr"], kw["momentum"]) if kw["base"] == "sgd" else HandAdam(kw["lr"])
    for t, per_rank in enumerate(data):
        sam = t % kw["k"] == 0 if name == "looksam" else True
        if name == "randsam":
            sam = RandomSAM.draw(kw["seed"], t) < kw["sam_prob"]
        if sam:
            pairs = [ref.sam_grad(w, x, y, kw["rho"]) for x, y in per_rank]
            gs = torch.stack([p[1] for p in pairs]).mean(0)
            if name == "looksam":
                gv = torch.stack([gs - (g @ gs) / (g @ g) * g for g, _ in pairs]).mean(0)
            update = gs
        else:
            g = torch.stack([ref.grad(w, x, y) for x, y in per_rank]).mean(0)
            update = g + kw["alpha"] * g.norm() / gv.norm() * gv if name == "looksam" else g
        w = hand(w, update)
    return w


def test_sam_family_under_ddp_two_processes():
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world, join=True)
        got = {name: [torch.load(os.path.join(tmp, f"{name}-{r}.pt")) for r in range(world)] for name in CONFIGS}
    for name, (w0, w1) in got.items():
        assert torch.equal(w0, w1), f"{name}: ranks disagree"
    draws = [RandomSAM.draw(CONFIGS["randsam"]["seed"], t) < 0.5 for t in range(STEPS)]
    assert 0 < sum(draws) < STEPS  # both kinds of step are exercised
    for name in CONFIGS:
        expected = hand_rule(name, world)
        assert torch.allclose(got[name][0], expected, atol=1e-10, rtol=0), name
    # the local perturbation matters: with the global gradient the result is different
    assert not torch.allclose(got["sam"][0], _global_perturbation_sam(world), atol=1e-8)


def _global_perturbation_sam(world):
    from test_optim import HandSGD, Ref

    kw = CONFIGS["sam"]
    ref = Ref(make_model())
    w, hand = ref.w, HandSGD(kw["lr"], kw["momentum"])
    for per_rank in zip(*shards(world)):
        x = torch.cat([b[0] for b in per_rank])
        y = torch.cat([b[1] for b in per_rank])
        w = hand(w, ref.sam_grad(w, x, y, kw["rho"])[1])
    return w



# ------------------------------------------------------------------------------------- craft-run under torchrun


def test_sharded_tensor_loader_gives_each_rank_its_share_of_the_one_process_batch():
    from craft_runner.data.core import TensorLoader

    x, y = torch.arange(22.0).view(11, 2), torch.arange(11)
    whole = [b for _, b in TensorLoader(x, y, 4, shuffle=True, seed=3)]
    shards = [[b for _, b in TensorLoader(x, y, 4, shuffle=True, seed=3, rank=r, world=2)] for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3  # the last batch of 3 is cut to 2 (one row per rank)
    for i, (a, b) in enumerate(zip(*shards)):
        assert len(a) == len(b)
        expected = whole[i][:len(a) + len(b)]
        assert torch.equal(torch.stack([a, b], 1).flatten(), expected)
    assert len(TensorLoader(x[:9], y[:9], 4, world=2)) == 2  # a last batch of 1 row is dropped
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        TensorLoader(x, y, 4, rank=2, world=2)


def _craft_run(args, cwd, nproc=1):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_BASE_URL")}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(repo), env.get("PYTHONPATH", "")]))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([*launch, "-m", "craft_runner.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1200)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_write_one_run_and_match_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m craft_runner.run ...` (gloo on CPU): one run directory, one results.json
    with world_size 2, one W&B run; Adam's weights equal one process's with the same global batch (a ViT:
    LayerNorm only, so sharding changes no statistic). SAM runs too (its perturbation is per process)."""
    from helpers import TINY

    from craft_runner.train import load_checkpoint

    cache = tmp_path / "cache"
    args = [*TINY, "model=test_vit", "dataset.img_size=32", "train.epochs=2", "device=cpu", "logger=wandb",
            "sharpness.enabled=false", "compress=ptq", "compress.bits=W8A8", f"paths.cache_dir={cache}"]
    one = _craft_run([*args, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _craft_run(args, tmp_path / "two", nproc=2)  # default run dir: outputs/runs/<date>/<time> on each rank
    assert two.returncode == 0, two.stderr[-3000:]
    run_dirs = [d for d in (tmp_path / "two" / "outputs" / "runs").glob("*/*")]
    assert len(run_dirs) == 1, run_dirs
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((run_dirs[0] / "results.json").read_text())
    assert r1["status"] == r2["status"] == "ok" and (r1["world_size"], r2["world_size"]) == (1, 2)
    assert r2["train"]["world_size"] == 2 and r2["cache_key"] != r1["cache_key"]
    assert len(list((run_dirs[0] / "wandb").glob("offline-run-*"))) == 1
    w1 = load_checkpoint(cache / r1["cache_key"] / "model.pt", "cpu", ("model",))["model"]
    w2 = load_checkpoint(cache / r2["cache_key"] / "model.pt", "cpu", ("model",))["model"]
    assert w1.keys() == w2.keys()
    diff = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1 if w1[k].is_floating_point()])
    # Equal up to float summation order: Adam turns the rounding noise of gradients that are zero in exact
    # arithmetic (the attention's key bias) into steps of up to lr; 99.9 % of the weights agree to 1e-6 (a wrong
    # share of the batch on a process moves most weights by about lr).
    assert diff.max() < 1e-4 and diff.kthvalue(int(0.999 * len(diff))).values < 1e-6, diff.max()
    # the epoch loss is the mean over both processes' shares
    assert [h["loss"] for h in r2["train"]["history"]] == pytest.approx([h["loss"] for h in r1["train"]["history"]],
                                                                        rel=1e-5)

    sam = _craft_run([*args, "optimizer=sam", f"hydra.run.dir={tmp_path / 'sam'}"], tmp_path / "sam-cwd", nproc=2)
    assert sam.returncode == 0, sam.stderr[-3000:]
    r = json.loads((tmp_path / "sam" / "results.json").read_text())
    assert r["status"] == "ok" and r["world_size"] == 2 and r["train"]["second_pass_fraction"] == 1.0


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
