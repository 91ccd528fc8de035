"""Token merging (ToMe) and token pruning (EViT) against hand-written computations from the papers."""

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from craft_runner.compress import CompressContext
from craft_runner.compress.tokens import (
    TokenPruneConfig,
    ToMeConfig,
    bipartite_soft_matching,
    measure_throughput,
    merge_tokens,
    token_prune,
    token_prune_label,
    tome,
    tome_label,
)
from craft_runner.config import ConfigError

CONF = Path(__file__).resolve().parent.parent / "conf" / "compress"
CPU = torch.device("cpu")


def _vit(**kw):
    """test_vit at 32x32 with 8x8 patches: 16 patches + prefix tokens, 6 blocks, 2 heads of 32."""
    torch.manual_seed(0)
    m = timm.create_model("test_vit", num_classes=5, img_size=32, patch_size=8, **kw).eval()
    with torch.no_grad():  # move off timm's init (zero biases, tiny class token) so every part matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _x(n=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _ctx(x):
    return CompressContext(device=CPU, calib_batches=[(x, torch.zeros(len(x), dtype=torch.long))])


def _no_timing(cfg_cls, **kw):
    return cfg_cls(speed_reps=0, **kw)


# ------------------------------------------------------------------- reference computations (from the equations)


def ref_match(metric, r, p):
    """ToMe matching of one image, by loops: {source position: destination position} over the original
    positions; A = even, B = odd positions, the first p positions excluded."""
    n = metric.shape[0]
    r = min(r, (n - p) // 2)

    def cos(i, j):
        return float(metric[i] @ metric[j] / (metric[i].norm() * metric[j].norm()))

    best = {}
    for i in range(0, n, 2):
        if i >= p:
            best[i] = max((cos(i, j), j) for j in range(1, n, 2) if j >= p)
    sources = sorted(best, key=lambda i: -best[i][0])[:r]
    return {i: best[i][1] for i in sources}


def ref_merge(x, size, pairs, p):
    """Tokens [prefix, unmerged A in order, B in order], each B the size-weighted mean of itself and
    the A tokens merged into it; sizes add."""
    n = x.shape[0]
    toks, sizes = [x[i] for i in range(p)], [size[i] for i in range(p)]
    for i in range(0, n, 2):
        if i >= p and i not in pairs:
            toks.append(x[i])
            sizes.append(size[i])
    for j in range(1, n, 2):
        if j >= p:
            group = [j] + [i for i, d in pairs.items() if d == j]
            s = sum(size[k] for k in group)
            toks.append(sum(size[k] * x[k] for k in group) / s)
            sizes.append(s)
    return torch.stack(toks), torch.stack(sizes)


def ref_attention(attn, x, size, prop):
    """softmax(q kᵀ/√d + log s) v per head, from the module's weights; also returns k and the weights."""
    b, n, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(b, n, 3, h, d)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    logits = q @ k.transpose(-2, -1) / math.sqrt(d)
    if prop and size is not None:
        logits = logits + size.log()[:, None, None, :]
    w = logits.softmax(dim=-1)
    out = (w @ v).transpose(1, 2).reshape(b, n, h * d)
    return F.linear(out, attn.proj.weight, attn.proj.bias), k, w


def _ln(norm, x):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _mlp(mlp, x):
    return F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)


@torch.no_grad()
def ref_forward(model, x, reduce):
    """The ViT forward written out; ``reduce(i, x, size, k, w)`` returns (x, size) between attention and MLP.
    Patch embedding, positions and the head are timm's own; pooling weights tokens by size."""
    p = model.num_prefix_tokens
    t = model._pos_embed(model.patch_embed(x))
    size = None
    for i, blk in enumerate(model.blocks):
        a, k, w = ref_attention(blk.attn, _ln(blk.norm1, t), size, reduce.prop)
        t = t + a
        t, size = reduce(i, t, size, k, w)
        t = t + _mlp(blk.mlp, _ln(blk.norm2, t))
    t = model.norm(t)
    if model.global_pool == "token":
        pooled = t[:, 0]
    else:
        s = torch.ones(t.shape[:2]) if size is None else size
        pooled = (t[:, p:] * s[:, p:, None]).sum(1) / s[:, p:].sum(1, keepdim=True)
    return model.head(model.fc_norm(pooled))


class RefToMe:
    def __init__(self, plan, p, prop):
        self.plan, self.p, self.prop = plan, p, prop

    def __call__(self, i, t, size, k, w):
        if self.plan[i] == 0:
            return t, size
        size = torch.ones(t.shape[:2]) if size is None else size
        metric = k.mean(dim=1)
        outs = [ref_merge(t[b], size[b], ref_match(metric[b], self.plan[i], self.p), self.p) for b in range(len(t))]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])


class RefEViT:
    prop = False

    def __init__(self, plan, p, fuse, mode="sum"):
        self.plan, self.p, self.fuse, self.mode = plan, p, fuse, mode

    def __call__(self, i, t, size, k, w):
        rate = self.plan[i]
        n = t.shape[1] - self.p
        left = math.ceil(rate * n)
        if left >= n:
            return t, size
        cls_attn = w[:, :, 0, self.p:].mean(dim=1)  # (B, n)
        rows = []
        for b in range(len(t)):
            ranked = sorted(range(n), key=lambda j: -float(cls_attn[b, j]))
            kept, dropped = sorted(ranked[:left]), ranked[left:]
            row = [t[b, :self.p]] + [t[b, self.p + j][None] for j in kept]
            if self.fuse:
                a = cls_attn[b, dropped]
                fused = sum(a[m] * t[b, self.p + j] for m, j in enumerate(dropped))
                row.append((fused / (a.sum() if self.mode == "mean" else 1.0))[None])
            rows.append(torch.cat(row))
        return torch.stack(rows), size


# ------------------------------------------------------------------- one block: matching and merging


def test_matching_on_a_hand_made_example():
    # 7 tokens, 0 is the class token. A = 0, 2, 4, 6; B = 1, 3, 5. Token 2 points where 5 does,
    # token 6 nearly where 3 does, token 4 nearly orthogonal to 3 and opposite 1; the class token equals
    # token 1 but is protected.
    m = torch.tensor([[1., 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0.01], [0, 1, 0], [0, 0.1, 1]])[None]
    src, dst, keep = bipartite_soft_matching(m, 2, protected=1)
    assert dict(zip((2 * src[0]).tolist(), (2 * dst[0] + 1).tolist())) == {2: 5, 6: 3}
    assert (2 * keep[0]).tolist() == [0, 4]
    x = torch.arange(7.0)[None, :, None].repeat(1, 1, 2)
    size = torch.tensor([1., 1, 3, 1, 1, 1, 2])[None, :, None]
    xo, so = merge_tokens(x, size, src, dst, keep, protected=1)
    # [cls, A4, B1, B3 ← A6, B5 ← A2]: (3·1 + 2·6)/(1 + 2) = 5, (1·5 + 3·2)/(1 + 3) = 2.75
    assert xo[0, :, 0].tolist() == [0, 4, 1, 5, 2.75]
    assert so[0, :, 0].tolist() == [1, 1, 1, 3, 4]
    # r beyond ⌊(N − 1)/2⌋ = 3 merges only 3, and the class token never
    src, _, keep = bipartite_soft_matching(m, 10, protected=1)
    assert src.shape[1] == 3 and (2 * keep[0]).tolist() == [0]


@pytest.mark.parametrize("p, n, r", [(1, 17, 5), (2, 18, 6), (0, 16, 8), (1, 9, 3)])
def test_matching_and_merge_match_the_loops(p, n, r):
    g = torch.Generator().manual_seed(n + p)
    metric, x = torch.randn(2, n, 6, generator=g), torch.randn(2, n, 4, generator=g)
    size = torch.randint(1, 5, (2, n, 1), generator=g).float()
    src, dst, keep = bipartite_soft_matching(metric, r, protected=p)
    xo, so = merge_tokens(x, size, src, dst, keep, protected=p)
    for b in range(2):
        pairs = ref_match(metric[b], r, p)
        assert dict(zip((2 * src[b]).tolist(), (2 * dst[b] + 1).tolist())) == pairs
        rx, rs = ref_merge(x[b], size[b, :, 0], pairs, p)
        torch.testing.assert_close(xo[b], rx)
        assert so[b, :, 0].tolist() == rs.tolist()
        assert xo.shape[1] == n - min(r, (n - p) // 2)


# ------------------------------------------------------------------- whole models against the written-out forward


@pytest.mark.parametrize("kw, prop", [({}, True), ({}, False), ({"reg_tokens": 1}, True),
                                      ({"class_token": False, "global_pool": "avg"}, True)])
def test_tome_model_matches_the_reference_forward(kw, prop):
    model, x = _vit(**kw), _x()
    plan = [3, 0, 2, 4, 3, 2]
    info = tome(model, None, _no_timing(ToMeConfig, r_schedule=plan, proportional_attn=prop), _ctx(x))
    ref = ref_forward(model, x, RefToMe(plan, model.num_prefix_tokens, prop))
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert info["r_per_block"] == plan


def test_proportional_attention_changes_the_output():
    x = _x()
    outs = []
    for prop in (True, False):
        model = _vit()
        tome(model, None, _no_timing(ToMeConfig, r=3, proportional_attn=prop), _ctx(x))
        with torch.no_grad():
            outs.append(model(x))
    assert (outs[0] - outs[1]).abs().max() > 1e-4


@pytest.mark.parametrize("fuse, mode", [(True, "sum"), (True, "mean"), (False, "sum")])
def test_token_prune_model_matches_the_reference_forward(fuse, mode):
    model, x = _vit(reg_tokens=1), _x()
    plan = [1.0, 0.5, 1.0, 0.7, 1.0, 0.6]
    cfg = _no_timing(TokenPruneConfig, keep_rate_schedule=plan, fuse=fuse, fuse_mode=mode)
    token_prune(model, None, cfg, _ctx(x))
    ref = ref_forward(model, x, RefEViT(plan, model.num_prefix_tokens, fuse, mode))
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_r0_and_keep_rate_1_give_exactly_the_uncompressed_logits():
    x = _x(4)
    ref = _vit()(x)
    assert ref.std(dim=0).min() > 1e-3  # the logits depend on the image
    for fn, cfg in ((tome, ToMeConfig(r=0, speed_reps=1, speed_warmup=0)),
                    (token_prune, TokenPruneConfig(keep_rate=1.0, speed_reps=1, speed_warmup=0))):
        model = _vit()
        fn(model, None, cfg, _ctx(x))
        assert torch.equal(model(x), ref)
    model = _vit(class_token=False, global_pool="avg")
    ref = model(x)
    tome(model, None, _no_timing(ToMeConfig, r=0), _ctx(x))
    assert torch.equal(model(x), ref)


# ------------------------------------------------------------------- token counts, records, evaluation


def _mlp_tokens(model, x):
    seen = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: seen.append(o.shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("fn, cfg, expected", [
    # 17 tokens; at most ⌊(N − 1)/2⌋ merge per block
    (tome, dict(r=3), [14, 11, 8, 5, 3, 2]),
    (tome, dict(r_schedule=[4, 0, 2]), [13, 13, 11, 11, 11, 11]),
    # default blocks for depth 6: 1, 3, 4; 16 patches → 12 (+1 fused) → 10 (+1) → 8 (+1)
    (token_prune, dict(keep_rate=0.7), [17, 14, 14, 12, 10, 10]),
    (token_prune, dict(keep_rate=0.5, blocks=[0, 2], fuse=False), [9, 9, 5, 5, 5, 5]),
    (token_prune, dict(keep_rate_schedule=[1.0, 0.25]), [17, 6, 6, 6, 6, 6]),
])
def test_tokens_per_block_as_configured(fn, cfg, expected):
    model, x = _vit(), _x(2)
    cls = ToMeConfig if fn is tome else TokenPruneConfig
    info = fn(model, None, _no_timing(cls, **cfg), _ctx(x))
    assert _mlp_tokens(model, x) == expected
    assert info["tokens_per_block"] == expected and info["tokens_in"] == 17


def test_speed_is_recorded():
    model, x = _vit(), _x(4)
    info = tome(model, None, ToMeConfig(r=4, speed_batch=2, speed_warmup=1, speed_reps=3), _ctx(x))
    assert info["batch_size"] == 2 and info["device"] == "cpu"
    assert info["throughput_before"] > 0 and info["throughput_after"] > 0
    assert info["speedup"] == pytest.approx(info["throughput_after"] / info["throughput_before"])
    assert measure_throughput(model, x, warmup=0, reps=2) > 0
    assert info["tokens_per_block"] == _mlp_tokens(model, x) == [13, 9, 5, 3, 2, 2]
    assert model._tok_state.active  # timing toggles the compression off and back on


def test_compressed_models_train_and_evaluate():
    from craft_runner.train import evaluate

    x = _x(6)
    y = torch.arange(6) % 5
    for fn, cfg in ((tome, _no_timing(ToMeConfig, r=4)), (token_prune, _no_timing(TokenPruneConfig, keep_rate=0.5))):
        model = _vit()
        fn(model, None, cfg, _ctx(x))
        acc = evaluate(model, [(x, y)], 5, CPU)
        with torch.no_grad():
            expected = 100.0 * float((model(x).argmax(1) == y).float().mean())
        assert acc == pytest.approx(expected)
        model.train()
        F.cross_entropy(model(x), y).backward()  # merged / pruned tokens pass gradients
        assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_non_vit_is_refused():
    model = timm.create_model("test_resnet", num_classes=5)
    for fn, cfg in ((tome, ToMeConfig()), (token_prune, TokenPruneConfig())):
        with pytest.raises(ValueError, match="needs a timm VisionTransformer.*got ResNet"):
            fn(model, None, cfg, _ctx(_x()))
    with pytest.raises(ValueError, match="no class token"):
        token_prune(_vit(class_token=False, global_pool="avg"), None, TokenPruneConfig(), _ctx(_x()))
    with pytest.raises(ValueError, match="r_schedule has 7 entries"):
        tome(_vit(), None, ToMeConfig(r_schedule=[1] * 7), _ctx(_x()))
    with pytest.raises(ValueError, match="beyond the model's 6 blocks"):
        token_prune(_vit(), None, TokenPruneConfig(blocks=[6]), _ctx(_x()))


# ------------------------------------------------------------------- configs and labels


@pytest.mark.parametrize("cls, kw, key", [
    (ToMeConfig, dict(r=-1), "compress.r"),
    (ToMeConfig, dict(r_schedule=[2, -1]), "compress.r_schedule"),
    (ToMeConfig, dict(speed_reps=-1), "compress.speed_reps"),
    (TokenPruneConfig, dict(keep_rate=0.0), "compress.keep_rate"),
    (TokenPruneConfig, dict(keep_rate=1.5), "compress.keep_rate"),
    (TokenPruneConfig, dict(blocks=[3, 3]), "compress.blocks"),
    (TokenPruneConfig, dict(keep_rate_schedule=[1.0, 0.0]), "compress.keep_rate_schedule"),
    (TokenPruneConfig, dict(fuse_mode="max"), "compress.fuse_mode"),
])
def test_bad_values_are_refused(cls, kw, key):
    with pytest.raises(ConfigError, match=f"^{key}="):
        cls(**kw)


@pytest.mark.parametrize("name, cls", [("tome", ToMeConfig), ("token_prune", TokenPruneConfig)])
def test_yaml_fits_its_schema(name, cls):
    raw = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    assert raw.pop("defaults") == [f"{name}_schema", "_self_"]
    assert cls(**raw).name == name


def test_labels():
    assert tome_label({"name": "tome", "r": 8}) == "ToMe r=8"
    assert tome_label({"name": "tome", "r": 8, "r_schedule": [4, 2]}) == "ToMe r=4,2"
    assert token_prune_label({"name": "token_prune", "keep_rate": 0.7}) == "token prune 0.7"
    assert token_prune_label({"name": "token_prune", "keep_rate": 0.7, "fuse": False}) == "token prune 0.7 no-fuse"


def test_a_deep_copy_is_compressed_on_its_own():
    import copy

    model, x = _vit(), _x(2)
    tome(model, None, _no_timing(ToMeConfig, r=3), _ctx(x))
    with torch.no_grad():
        ref = model(x)
        twin = copy.deepcopy(model)
        twin._tok_state.active = False  # the copy back to uncompressed: the original stays compressed
        assert _mlp_tokens(twin, x)[-1] == 17
        assert torch.equal(model(x), ref) and _mlp_tokens(model, x)[-1] == 2
        twin._tok_state.active = True
        assert torch.equal(twin(x), ref)
