"""Pruning: magnitude and Wanda scores, unstructured and N:M masks, one-shot and iterative schedules."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as tprune

from craft_runner.compress import CompressContext, apply_compression, target_layers
from craft_runner.compress.config import PruneConfig
from craft_runner.compress.prune import (
    input_feature_norms,
    magnitude_prune,
    nm_mask,
    prune_model,
    schedule_sparsity,
    unstructured_mask,
    wanda_scores,
)
from craft_runner.config import ConfigError

CPU = torch.device("cpu")



def tiny_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def batches(n=2, bs=4, shape=(3, 8, 8)):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(bs, *shape, generator=g), torch.randint(0, 4, (bs,), generator=g)) for _ in range(n)]


# --------------------------------------------------------------------------- scores


def test_magnitude_mask_equals_topk():
    w = torch.randn(8, 5, 3, 3)
    for s in (0.1, 0.5, 0.9):
        mask = unstructured_mask(w.abs(), s, "layer")
        keep = w.numel() - int(s * w.numel())
        expected = torch.zeros(w.numel())
        expected[torch.topk(w.abs().flatten(), keep).indices] = 1
        assert torch.equal(mask.flatten(), expected)
        # per row: every output channel keeps its own largest |w|
        rows = unstructured_mask(w.abs(), s, "row").flatten(1)
        keep_row = 45 - int(s * 45)
        for i in range(8):
            exp = torch.zeros(45)
            exp[torch.topk(w[i].abs().flatten(), keep_row).indices] = 1
            assert torch.equal(rows[i], exp)


def test_wanda_scores_linear_by_hand():
    lin = nn.Linear(6, 4)
    model = nn.Sequential(lin)
    xs = [torch.randn(2, 5, 6), torch.randn(3, 5, 6)]
    norms = input_feature_norms(model, [lin], [(x, None) for x in xs])[lin]
    tokens = torch.cat([x.reshape(-1, 6) for x in xs])  # 25 tokens
    by_hand = torch.sqrt((tokens ** 2).sum(0))
    assert torch.allclose(norms.flatten(), by_hand, atol=1e-6)
    scores = wanda_scores(lin.weight, norms)
    for i in range(4):
        for j in range(6):
            assert torch.isclose(scores[i, j], lin.weight[i, j].abs() * by_hand[j])


@pytest.mark.parametrize("groups", [1, 2])
def test_wanda_scores_conv_by_hand(groups):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups)
    x = torch.randn(2, 4, 7, 7)
    norms = input_feature_norms(nn.Sequential(conv), [conv], [(x, None)])[conv]
    # Patch elements by explicit slicing of the zero-padded input, one output position at a time.
    xp = F.pad(x, (1, 1, 1, 1))
    cin = 4 // groups
    sq = torch.zeros(groups, cin * 9)
    for i in range(4):
        for j in range(4):
            patch = xp[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]  # (B, 4, 3, 3)
            for g in range(groups):
                sq[g] += (patch[:, g * cin:(g + 1) * cin].reshape(2, -1) ** 2).sum(0)
    assert torch.allclose(norms, sq.sqrt(), atol=1e-5)
    scores = wanda_scores(conv.weight, norms)
    out_per_group = 6 // groups
    for o in range(6):
        g = o // out_per_group
        assert torch.allclose(scores[o].flatten(), conv.weight[o].abs().flatten() * sq[g].sqrt(), atol=1e-5)


def test_wanda_prunes_differently_from_magnitude_when_inputs_are_skewed():
    lin = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(1, 33, dtype=torch.float).view(4, 8))
    x = torch.ones(16, 8)
    x[:, :4] *= 100.0  # the small weights see large inputs
    model = nn.Sequential(lin)
    cfg = PruneConfig(criterion="wanda", sparsity=0.5)
    prune_model(model, [("0", lin)], cfg, CompressContext(CPU, [(x, None)]))
    assert cfg.resolved_scope == "row"
    assert (lin.weight[:, :4] != 0).all() and (lin.weight[:, 4:] == 0).all()


# --------------------------------------------------------------------------- masks and sparsity


@pytest.mark.parametrize("n,m", [(2, 4), (16, 32), (1, 8), (3, 4)])
def test_nm_mask_prunes_exactly_n_of_every_m(n, m):
    w = torch.randn(6, 8, 2, 2) if m <= 32 else torch.randn(6, 64)
    mask = nm_mask(w.abs(), n, m)
    groups = mask.flatten(1).reshape(6, -1, m)
    assert ((groups == 0).sum(-1) == n).all()
    # the zeroed ones are the smallest of their group
    wg = w.abs().flatten(1).reshape(6, -1, m)
    pruned_max = torch.where(groups == 0, wg, torch.zeros(())).amax(-1)
    kept_min = torch.where(groups == 1, wg, torch.full((), float("inf"))).amin(-1)
    assert (pruned_max <= kept_min).all()


def test_nm_on_a_model_and_indivisible_layers():
    torch.manual_seed(0)
    model = tiny_cnn()
    cfg = PruneConfig(pattern="nm", n=2, m=4, criterion="wanda")
    assert cfg.sparsity == 0.5
    info = apply_compression(model, cfg, CompressContext(CPU, batches()))
    for name, mod in target_layers(model, True):
        nz = (mod.weight.flatten(1).reshape(mod.weight.shape[0], -1, 4) != 0).sum(-1)
        assert (nz == 2).all(), name
        assert info["layer_sparsity"][name] == 0.5
    assert info["n"] == 2 and info["m"] == 4 and info["pattern"] == "nm"
    # m=16 does not divide the 8·9 = 72 inputs of the two inner convs, but divides the 16 of the Linear
    with pytest.raises(ConfigError, match=r"compress\.m=16.*72") as e:
        apply_compression(tiny_cnn(), PruneConfig(pattern="nm", n=8, m=16), CompressContext(CPU, batches()))
    assert "\n" not in str(e.value)
    model = tiny_cnn()
    dense = copy.deepcopy(model)
    info = apply_compression(model, PruneConfig(pattern="nm", n=8, m=16, nm_indivisible="skip"),
                             CompressContext(CPU, batches()))
    assert info["skipped_layers"] == ["2", "4"] and list(info["layer_sparsity"]) == ["8"]
    assert torch.equal(model[2].weight, dense[2].weight) and info["layer_sparsity"]["8"] == 0.5


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
@pytest.mark.parametrize("scope", ["layer", "row"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_achieved_sparsity_equals_target(criterion, scope, sparsity):
    torch.manual_seed(0)
    model = tiny_cnn()
    info = apply_compression(model, PruneConfig(criterion=criterion, scope=scope, sparsity=sparsity),
                             CompressContext(CPU, batches()))
    layers = target_layers(model, True)
    assert [n for n, _ in layers] == list(info["layer_sparsity"])
    assert "0" not in info["layer_sparsity"] and "11" not in info["layer_sparsity"]  # stem, head dense
    for name, mod in layers:
        w = mod.weight.flatten(1)
        assert not tprune.is_pruned(mod)
        if scope == "row":
            assert ((w == 0).sum(1) == int(sparsity * w.shape[1])).all()
        assert info["layer_sparsity"][name] == (w == 0).sum().item() / w.numel()
        if scope == "layer":
            assert (w == 0).sum().item() == int(sparsity * w.numel())
    assert abs(info["sparsity"] - sparsity) < 0.02


def test_magnitude_prune_kept_working():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    info = magnitude_prune(target_layers(model, False), 0.4)
    assert info["layer_sparsity"] == {"0": 0.4, "1": 0.4}


def test_prune_config_errors_are_one_line():
    cases = [
        (dict(pattern="nm", n=4, m=4), "compress.n"),
        (dict(pattern="nm", n=0, m=4), "compress.n"),
        (dict(pattern="nm", m=1, n=1), "compress.m"),
        (dict(pattern="nm", schedule="iterative"), "compress.schedule"),
        (dict(criterion="snip"), "compress.criterion"),
        (dict(scope="global"), "compress.scope"),
        (dict(schedule_kind="linear"), "compress.schedule_kind"),
        (dict(steps=0), "compress.steps"),
        (dict(sparsity=0.5, initial_sparsity=0.6), "compress.initial_sparsity"),
    ]
    for kwargs, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
            PruneConfig(**kwargs)
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- iterative


def test_schedules_by_hand():
    # cubic (AGP): s_t = s_f + (s_i - s_f)(1 - t/T)^3
    assert schedule_sparsity(1, 4, 0.8, 0.0, "cubic") == pytest.approx(0.8 - 0.8 * 0.75 ** 3)
    assert schedule_sparsity(2, 4, 0.8, 0.2, "cubic") == pytest.approx(0.8 - 0.6 * 0.5 ** 3)
    # exponential: density multiplied by the same factor every step
    d = [1 - schedule_sparsity(t, 4, 0.8, 0.0, "exponential") for t in range(0, 5)]
    ratios = [d[t + 1] / d[t] for t in range(4)]
    assert ratios == pytest.approx([0.2 ** 0.25] * 4)
    for kind in ("cubic", "exponential"):
        assert schedule_sparsity(4, 4, 0.8, 0.1, kind) == pytest.approx(0.8)
        assert schedule_sparsity(0, 4, 0.8, 0.1, kind) == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["cubic", "exponential"])
def test_iterative_pruning_holds_masks_while_fine_tuning(kind):
    torch.manual_seed(0)
    model = tiny_cnn()
    data = batches()
    seen = []

    def fine_tune(m, epochs):
        assert epochs == 2
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        layers = target_layers(m, True)
        before = {n: mod.weight_orig.detach().clone() for n, mod in layers}
        for x, y in data:
            F.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad()
        m(data[0][0])  # refresh module.weight from the reparametrisation
        step = {}
        for n, mod in layers:
            assert tprune.is_pruned(mod)
            mask = mod.weight_mask
            assert (mod.weight[mask == 0] == 0).all()
            assert not torch.equal(mod.weight_orig, before[n])  # it trained
            step[n] = mask.clone()
        seen.append(step)

    cfg = PruneConfig(schedule="iterative", schedule_kind=kind, steps=3, sparsity=0.7, finetune_epochs=2)
    info = apply_compression(model, cfg, CompressContext(CPU, data, fine_tune))
    assert len(seen) == 3
    targets = [schedule_sparsity(t, 3, 0.7, 0.0, kind) for t in (1, 2, 3)]
    assert [h["target"] for h in info["history"]] == pytest.approx(targets)
    for name, mod in target_layers(model, True):
        assert not tprune.is_pruned(mod) and not hasattr(mod, "weight_orig")
        # masks only grow, and each step's mask has that step's sparsity
        for step, target in zip(seen, targets):
            assert (step[name] == 0).sum().item() == int(target * mod.weight.numel())
        for a, b in zip(seen, seen[1:]):
            assert ((a[name] == 0) <= (b[name] == 0)).all()
        assert torch.equal(mod.weight == 0, seen[-1][name] == 0)
        assert info["layer_sparsity"][name] == pytest.approx(int(0.7 * mod.weight.numel()) / mod.weight.numel())
    assert info["schedule_kind"] == kind and info["steps"] == 3


def test_fine_tuning_without_a_fine_tune_function_fails():
    with pytest.raises(ValueError, match="fine_tune"):
        apply_compression(tiny_cnn(), PruneConfig(schedule="iterative", steps=2, finetune_epochs=1),
                          CompressContext(CPU, batches()))


def test_wanda_on_vit_prunes_attention_and_mlp():
    import timm

    model = timm.create_model("test_vit", num_classes=4, img_size=32, patch_size=8)
    x = torch.randn(4, 3, 32, 32)
    ref = copy.deepcopy(model)
    info = apply_compression(model, PruneConfig(criterion="wanda", sparsity=0.5), CompressContext(CPU, [(x, None)]))
    assert "blocks.0.attn.qkv" in info["layer_sparsity"] and "head" not in info["layer_sparsity"]
    assert all(v == 0.5 for v in info["layer_sparsity"].values())
    assert torch.equal(model.head.weight, ref.head.weight)
    model(x)


# --------------------------------------------------------------------------- Wanda's input order


class _MlpBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class _BlockNet(nn.Module):
    """stem -> two residual MLP blocks (in ``blocks``, a Sequential) -> head, on (batch, tokens, d)."""

    def __init__(self, d=8, h=12):
        super().__init__()
        self.stem = nn.Linear(6, d)
        self.blocks = nn.Sequential(_MlpBlock(d, h), _MlpBlock(d, h))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def _wanda_reference(model, x, sparsity, inputs):
    """Masks of Wanda per output row, written out: ‖X_j‖ over all tokens, |W|·‖X‖, the k lowest of each row
    zeroed; each layer's input computed on the model as locuslab/wanda would have it at that point."""
    W = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    b = {n: m.bias.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    masks = {}

    def row_mask(w, inp):
        score = w.abs() * inp.reshape(-1, inp.shape[-1]).pow(2).sum(0).sqrt()
        k = int(sparsity * w.shape[1])  # Wanda's int(W.shape[1]*sparsity)
        mask = torch.ones_like(w)
        mask.scatter_(1, score.argsort(dim=1)[:, :k], 0.0)
        return mask

    def lin(n, inp, pruned):
        w = W[n] * masks[n] if pruned else W[n]
        return inp @ w.T + b[n]

    seq = inputs != "dense"
    masks["stem"] = row_mask(W["stem"], x)
    h = lin("stem", x, seq)
    for i in range(2):
        p = f"blocks.{i}"
        masks[f"{p}.fc1"] = row_mask(W[f"{p}.fc1"], h)
        # block: fc2 sees the dense fc1 of its own block; layer: the pruned one
        z = torch.relu(lin(f"{p}.fc1", h, inputs == "layer"))
        masks[f"{p}.fc2"] = row_mask(W[f"{p}.fc2"], z)
        h = h + lin(f"{p}.fc2", torch.relu(lin(f"{p}.fc1", h, seq)), seq)
    masks["head"] = row_mask(W["head"], h)
    return masks


def test_wanda_blocks_follow_the_module_tree():
    import timm

    import craft_runner.models  # noqa: F401  (registers resnet20)
    from craft_runner.compress.prune import block_of, wanda_groups

    net = _BlockNet()
    layers = target_layers(net, False)
    assert [block_of(net, n) for n, _ in layers] == ["stem", "blocks.0", "blocks.0", "blocks.1", "blocks.1", "head"]
    assert [len(g) for g in wanda_groups(net, layers, "block")] == [1, 2, 2, 1]
    assert [len(g) for g in wanda_groups(net, layers, "layer")] == [1] * 6
    assert [len(g) for g in wanda_groups(net, layers, "dense")] == [6]
    r20 = timm.create_model("resnet20", num_classes=10)
    assert block_of(r20, "layer2.0.shortcut.0") == "layer2.0" and block_of(r20, "layer3.2.conv1") == "layer3.2"
    assert block_of(r20, "conv1") == "conv1" and block_of(r20, "fc") == "fc"
    vit = timm.create_model("test_vit", num_classes=4, img_size=32, patch_size=8)
    assert block_of(vit, "blocks.1.attn.proj") == "blocks.1" and block_of(vit, "blocks.0.mlp.fc2") == "blocks.0"
    assert block_of(tiny_cnn(), "4") == "4"  # a plain chain of layers: every layer is its own block


@pytest.mark.parametrize("inputs", ["block", "layer", "dense"])
def test_wanda_input_order_against_a_written_out_reference(inputs):
    torch.manual_seed(0)
    net = _BlockNet()
    x = torch.randn(4, 5, 6)
    refs = {o: _wanda_reference(net, x, 0.5, o) for o in ("block", "layer", "dense")}
    # the three orders give different masks here, so the comparison below tells them apart
    for o in refs:
        if o != inputs:
            assert any(not torch.equal(refs[o][n], refs[inputs][n]) for n in refs[o]), o
    cfg = PruneConfig(criterion="wanda", sparsity=0.5, wanda_inputs=inputs, skip_first_last=False)
    info = apply_compression(net, cfg, CompressContext(CPU, [(x[:2], None), (x[2:], None)]))
    assert info["wanda_inputs"] == inputs
    for n, m in target_layers(net, False):
        assert torch.equal((m.weight != 0).float(), refs[inputs][n]), n


# --------------------------------------------------------------------------- N:M layouts


def test_nm_nvidia_layout_groups_input_channels_like_asp():
    torch.manual_seed(0)
    w = torch.randn(8, 16, 3, 3)
    mask = nm_mask(w.abs(), 2, 4, layout="nvidia")
    # ASP's create_mask for a 4-D weight (K, C, R, S): permute to (R, S, K, C), rows of C, keep the best 2 of
    # every 4 consecutive entries (the 2 largest |w|), permute back
    t = w.abs().permute(2, 3, 0, 1).reshape(-1, 16).reshape(-1, 4)
    keep = torch.zeros_like(t).scatter_(1, t.topk(2, dim=1).indices, 1.0)
    expected = keep.reshape(3, 3, 8, 16).permute(2, 3, 0, 1)
    assert torch.equal(mask, expected)
    assert not torch.equal(mask, nm_mask(w.abs(), 2, 4, layout="pytorch"))  # different groups for 3x3 kernels
    one = torch.randn(8, 16, 1, 1)
    assert torch.equal(nm_mask(one, 2, 4, layout="nvidia"), nm_mask(one, 2, 4))  # 1x1: the same groups
    lin = torch.randn(8, 16)
    assert torch.equal(nm_mask(lin, 2, 4, layout="nvidia"), nm_mask(lin, 2, 4))
    with pytest.raises(ValueError, match="input channels 6"):
        nm_mask(torch.randn(4, 6, 3, 3), 2, 4, layout="nvidia")  # 6·9 = 54 is no multiple of 4 either way


def test_nm_nvidia_layout_on_a_model():
    torch.manual_seed(0)
    model = tiny_cnn()
    # the two inner convs have 8 and 16/2 = 8 input channels per group: 4 divides them
    info = apply_compression(model, PruneConfig(pattern="nm", n=2, m=4, nm_layout="nvidia"),
                             CompressContext(CPU, batches()))
    assert info["nm_layout"] == "nvidia"
    for name, mod in target_layers(model, True):
        w = mod.weight if mod.weight.dim() == 4 else mod.weight[:, :, None, None]
        nz = (w.permute(0, 2, 3, 1) != 0).reshape(-1, 4).sum(-1)
        assert (nz == 2).all(), name
    with pytest.raises(ConfigError, match=r"compress\.m=16.*input size 8.*nvidia"):
        apply_compression(tiny_cnn(), PruneConfig(pattern="nm", n=8, m=16, nm_layout="nvidia"),
                          CompressContext(CPU, batches()))


# --------------------------------------------------------------------------- counts as the reference codes


def test_per_row_count_truncates_as_wanda_and_rounds_as_an_option():
    from craft_runner.compress.prune import prune_count

    torch.manual_seed(0)
    w = torch.randn(6, 768)  # 0.7 · 768 = 537.6: Wanda prunes 537 per row, rounding would prune 538
    scores = w.abs()
    for s, count, k in [(0.7, "truncate", 537), (0.7, "round", 538), (0.9, "truncate", 691), (0.9, "round", 691)]:
        mask = unstructured_mask(scores, s, "row", count)
        # Wanda's compute_mask("row"), written out: stable sort of each row, the first int(cols · s) pruned
        idx = torch.sort(scores, dim=-1, stable=True)[1][:, :k]
        expected = torch.ones_like(w).scatter_(1, idx, 0.0)
        assert torch.equal(mask, expected), (s, count)
    # the float product, as int(W.shape[1]*sparsity) sees it: 0.29 · 100 = 28.999999999999996
    assert prune_count(0.29, 100) == 28 and prune_count(0.29, 100, "round") == 29
    # per layer, distiller's int(desired_sparsity · numel): 0.3 · 45 = 13.5 -> 13 (round: 14)
    layer = unstructured_mask(torch.randn(5, 9).abs(), 0.3, "layer")
    assert (layer == 0).sum().item() == 13
    assert (unstructured_mask(torch.randn(5, 9).abs(), 0.3, "layer", "round") == 0).sum().item() == 14


def test_prune_defaults_are_the_reference_codes():
    cfg = PruneConfig(criterion="wanda")
    assert (cfg.wanda_inputs, cfg.count, cfg.resolved_scope) == ("dense", "truncate", "row")
    with pytest.raises(ConfigError, match="compress.count") as e:
        PruneConfig(count="ceil")
    assert "\n" not in str(e.value)
    torch.manual_seed(0)
    model = tiny_cnn()
    info = apply_compression(model, PruneConfig(criterion="wanda", sparsity=0.3, count="round"),
                             CompressContext(CPU, batches()))
    assert info["count"] == "round" and info["wanda_inputs"] == "dense"
    w = model[2].weight.flatten(1)  # 8 · 3 · 3 = 72 columns: 0.3 · 72 = 21.6, rounded 22 (truncated 21)
    assert ((w == 0).sum(1) == 22).all()


def test_paper_scale_wanda_follows_wandas_vit_code():
    from helpers import compose_run

    from craft_runner.config import to_run_config

    c = to_run_config(compose_run("compress=wanda")).compress
    assert (c.criterion, c.wanda_inputs, c.count, c.calib_size) == ("wanda", "dense", "truncate", 4096)
