"""Model factory, CIFAR models registered in timm, conf/model options and checkpoint loading."""

import time
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from timm.data import resolve_data_config

from craft_runner.config import ConfigError, ModelConfig
from craft_runner.models import CIFAR_MODELS, CheckpointError, check_model_name, create_model

CONF_MODEL = Path(__file__).resolve().parent.parent / "conf" / "model"
MODEL_OPTIONS = sorted(p.stem for p in CONF_MODEL.glob("*.yaml"))



def n_params(model):
    return sum(p.numel() for p in model.parameters())


def conv(cin, cout, k, groups=1, bias=False):
    return cout * (cin // groups) * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c


def resnet20_count(num_classes=10):
    """Independent count: stem, 3 stages of 3 BasicBlocks, 1x1 conv+BN projections, linear head."""
    total = conv(3, 16, 3) + bn(16)
    cin = 16
    for w in (16, 32, 64):
        for _ in range(3):
            total += conv(cin, w, 3) + bn(w) + conv(w, w, 3) + bn(w)
            if cin != w:
                total += conv(cin, w, 1) + bn(w)
            cin = w
    return total + 64 * num_classes + num_classes


def mobilenetv1_count(num_classes=10):
    chans = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    total = conv(3, 32, 3) + bn(32)
    for cin, cout in zip(chans[:-1], chans[1:]):
        total += conv(cin, cin, 3, groups=cin) + bn(cin) + conv(cin, cout, 1) + bn(cout)
    return total + 1024 * num_classes + num_classes


def mixer_s_count(num_classes=10):
    c, n, ds, dc = 128, 64, 64, 512
    linear = lambda i, o: i * o + o  # noqa: E731
    block = 2 * c + linear(n, ds) + linear(ds, n) + 2 * c + linear(c, dc) + linear(dc, c)
    return conv(3, c, 4, bias=True) + 8 * block + 2 * c + linear(c, num_classes)


def load_option(name: str) -> ModelConfig:
    """A conf/model option merged over the ModelConfig schema (fails on unknown keys or wrong types)."""
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_MODEL / f"{name}.yaml"))
    return OmegaConf.to_object(merged)


# ------------------------------------------------------------------------------------------ CIFAR models


def test_importing_package_registers_cifar_models():
    for name in CIFAR_MODELS:
        assert timm.is_model(name), name


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_cifar_models_declare_cifar_input(name):
    m = timm.create_model(name, num_classes=10)
    cfg = resolve_data_config({}, model=m)
    assert cfg["input_size"] == (3, 32, 32)
    assert cfg["mean"] == pytest.approx((0.4914, 0.4822, 0.4465))
    assert cfg["std"] == pytest.approx((0.2470, 0.2435, 0.2616))
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    "name, expected",
    [("resnet20", resnet20_count()), ("mobilenetv1_cifar", mobilenetv1_count()), ("mixer_s_cifar", mixer_s_count())],
)
def test_cifar_parameter_counts_match_independent_counts(name, expected):
    assert n_params(timm.create_model(name, num_classes=10)) == expected


def test_documented_parameter_counts():
    assert n_params(timm.create_model("resnet20", num_classes=10)) == 272_474
    assert abs(272_474 / 0.27e6 - 1) < 0.02  # the paper's 0.27 M
    assert n_params(timm.create_model("mobilenetv1_cifar", num_classes=10)) == 3_217_226
    assert n_params(timm.create_model("mixer_s_cifar", num_classes=10)) == 1_132_170
    # timm's ResNet-18 at 1000 classes: the published 11.69 M.
    assert n_params(timm.create_model("resnet18")) == 11_689_512


def test_resnet20_structure():
    m = timm.create_model("resnet20", num_classes=10)
    assert [len(s) for s in (m.layer1, m.layer2, m.layer3)] == [3, 3, 3]
    assert [s[0].conv1.stride for s in (m.layer1, m.layer2, m.layer3)] == [(1, 1), (2, 2), (2, 2)]
    assert isinstance(m.layer2[0].shortcut[0], torch.nn.Conv2d) and m.layer2[0].shortcut[0].kernel_size == (1, 1)
    assert isinstance(m.layer1[0].shortcut, torch.nn.Identity)
    # Activations are modules, so SNT can move and replace them.
    assert sum(isinstance(x, torch.nn.ReLU) for x in m.modules()) == 1 + 9 * 2
    feats = m.forward_features(torch.randn(1, 3, 32, 32))
    assert feats.shape == (1, 64, 8, 8)


def test_mixer_s_structure_follows_the_snt_paper():
    m = timm.create_model("mixer_s_cifar", num_classes=10)
    assert m.stem.num_patches == 64 and m.stem.proj.out_channels == 128
    assert len(m.blocks) == 8
    assert m.blocks[0].mlp_tokens.fc1.out_features == 64 and m.blocks[0].mlp_channels.fc1.out_features == 512
    assert isinstance(m.blocks[0].mlp_tokens.act, torch.nn.GELU)


def test_cifar_models_accept_timm_kwargs():
    m = timm.create_model("resnet20", num_classes=7, in_chans=1, drop_rate=0.3)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert m.head_drop.p == 0.3
    m.reset_classifier(3)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_cifar_pretrained_without_file_is_a_clear_error():
    with pytest.raises(ConfigError, match="checkpoint_path"):
        timm.create_model("resnet20", pretrained=True)


# ------------------------------------------------------------------------------------ conf/model options


def test_conf_model_options_exist():
    expected = {"resnet20", "mobilenetv1", "mixer_s", "resnet18", "vit_b16", "efficientnet_b0", "resnet101",
                "mobilenetv2", "vit_b16_sam", "vit_b16_augreg", "test_vit", "test_resnet"}
    assert expected <= set(MODEL_OPTIONS)


@pytest.mark.parametrize("option", MODEL_OPTIONS)
def test_conf_model_option_header_and_name(option):
    text = (CONF_MODEL / f"{option}.yaml").read_text()
    first = text.splitlines()[0]
    assert first.startswith("# ") and len(first) > 10
    assert "@package" not in text
    cfg = load_option(option)
    check_model_name(cfg.name)  # the timm tag exists
    if cfg.pretrained:
        assert "checkpoint_path" in first
        assert cfg.name in timm.list_pretrained(cfg.name)


@pytest.mark.parametrize("option", MODEL_OPTIONS)
def test_conf_model_option_builds_and_runs(option):
    cfg = load_option(option)
    cfg.pretrained = False  # no weights here; the architecture is what is tested
    if cfg.name.startswith("vit_base"):
        cfg.kwargs["weight_init"] = "skip"  # timm's ViT-B init takes seconds; torch's default init is enough here
    model = create_model(cfg, num_classes=5).eval()
    if cfg.kwargs.get("weight_init") == "skip":  # skip leaves the token parameters uninitialised
        with torch.no_grad():
            for name in ("pos_embed", "cls_token", "reg_token"):
                if getattr(model, name, None) is not None:
                    getattr(model, name).normal_(0, 0.02)
    data_cfg = resolve_data_config({}, model=model)
    # Small input where the model takes any size; ViTs need their own.
    size = data_cfg["input_size"][1:] if model.pretrained_cfg.get("fixed_input_size") else (32, 32)
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 5)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------ factory


def test_unknown_model_name_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as e:
        create_model(ModelConfig(name="resnet_does_not_exist"), num_classes=10)
    msg = str(e.value)
    assert "model.name" in msg and "timm.list_models()" in msg and "resnet20" in msg and "\n" not in msg


def test_unknown_pretrained_tag_is_a_config_error():
    with pytest.raises(ConfigError, match="model.name"):
        check_model_name("resnet18.no_such_tag")


def test_num_classes_from_config_overrides_argument_and_kwargs_pass_through():
    m = create_model(ModelConfig(name="mixer_s_cifar", num_classes=3, kwargs={"depth": 2}), num_classes=10)
    assert len(m.blocks) == 2
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    m = create_model(ModelConfig(name="resnet20", drop_rate=0.2), num_classes=4, in_chans=1)
    assert m(torch.randn(1, 1, 32, 32)).shape == (1, 4) and m.head_drop.p == 0.2


@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict", "module_prefix", "safetensors"])
def test_full_checkpoint_loads_strictly(tmp_path, wrap):
    src = create_model(ModelConfig(name="resnet20"), num_classes=10)
    sd = src.state_dict()
    path = tmp_path / ("ckpt.safetensors" if wrap == "safetensors" else "ckpt.pth")
    if wrap == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif wrap == "bare":
        torch.save(sd, path)
    elif wrap == "module_prefix":
        torch.save({"module." + k: v for k, v in sd.items()}, path)
    else:
        torch.save({wrap: sd, "epoch": 3, "optimizer": {}}, path)
    torch.manual_seed(123)  # a different init, so equality means the file was loaded
    dst = create_model(ModelConfig(name="resnet20", checkpoint_path=str(path)), num_classes=10)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_checkpoint_with_wrong_shape_names_path_and_key(tmp_path):
    path = tmp_path / "r20_10cls.pth"
    torch.save(create_model(ModelConfig(name="resnet20"), num_classes=10).state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        create_model(ModelConfig(name="resnet20", checkpoint_path=str(path)), num_classes=100)
    msg = str(e.value)
    assert str(path) in msg and "fc.weight" in msg and "\n" not in msg


def test_checkpoint_of_another_architecture_fails(tmp_path):
    path = tmp_path / "mixer.pth"
    torch.save(create_model(ModelConfig(name="mixer_s_cifar"), num_classes=10).state_dict(), path)
    with pytest.raises(CheckpointError, match="missing key 'conv1.weight'"):
        create_model(ModelConfig(name="resnet20", checkpoint_path=str(path)), num_classes=10)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", None])
def test_non_checkpoint_file_fails(tmp_path, content):
    path = tmp_path / "junk.pth"
    if content is None:
        torch.save({"epoch": 3, "lr": 0.1}, path)  # a readable dict, but no state_dict in it
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        create_model(ModelConfig(name="resnet20", checkpoint_path=str(path)), num_classes=10)
    assert str(path) in str(e.value)
    assert isinstance(e.value, ConfigError)


def test_missing_checkpoint_file_fails(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        create_model(ModelConfig(name="resnet20", checkpoint_path=str(tmp_path / "nope.pth")), num_classes=10)


@pytest.mark.parametrize("name, head", [("resnet20", "fc"), ("test_vit", "head")])
def test_pretrained_from_local_file_gets_a_new_head(tmp_path, name, head):
    src = timm.create_model(name, num_classes=10)
    path = tmp_path / "pretrained.pth"
    torch.save(src.state_dict(), path)
    torch.manual_seed(99)
    m = create_model(ModelConfig(name=name, pretrained=True, checkpoint_path=str(path)), num_classes=4)
    assert getattr(m, head).out_features == 4
    backbone = {k: v for k, v in src.state_dict().items() if not k.startswith(head + ".")}
    own = m.state_dict()
    for k, v in backbone.items():
        assert torch.equal(own[k], v), k


def test_pretrained_from_wrong_file_fails(tmp_path):
    path = tmp_path / "r20.pth"
    torch.save(timm.create_model("resnet20", num_classes=10).state_dict(), path)
    # Same layer names, wrong shapes.
    with pytest.raises(CheckpointError, match=r"key 'bn1.weight' has shape \[16\]"):
        create_model(ModelConfig(name="test_resnet", pretrained=True, checkpoint_path=str(path)), num_classes=4)
    # Layers that the file lacks: timm loads non-strictly for a new head, the factory still refuses.
    path2 = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit", num_classes=10).state_dict(), path2)
    with pytest.raises(CheckpointError, match="missing key"):
        create_model(ModelConfig(name="resnet20", pretrained=True, checkpoint_path=str(path2)), num_classes=4)


def _empty_hub_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_pretrained_offline_fails_fast_naming_checkpoint_path(monkeypatch, tmp_path):
    from huggingface_hub import constants

    _empty_hub_cache(monkeypatch, tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        create_model(ModelConfig(name="test_resnet.r160_in1k", pretrained=True), num_classes=4)
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert "model.checkpoint_path=" in msg and "\n" not in msg


def test_pretrained_with_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    """Without offline mode set, the probe finds the hub unreachable and skips huggingface_hub's retries."""
    from huggingface_hub import constants

    from craft_runner.models import factory

    _empty_hub_cache(monkeypatch, tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert factory._hub_reachable() is False
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="checkpoint_path"):
        create_model(ModelConfig(name="test_resnet.r160_in1k", pretrained=True), num_classes=4)
    assert time.monotonic() - t0 < 10
    assert constants.HF_HUB_OFFLINE is False  # restored


def test_arch_is_applied_before_a_full_checkpoint_and_after_pretrained_weights(tmp_path):
    from craft_runner.config import ArchConfig
    from craft_runner.models.snt import PreActBasicBlock, RPReLU

    snt = ArchConfig(name="snt", preact=True, rprelu=True)
    src = create_model(ModelConfig(name="resnet20"), num_classes=10, arch=snt)
    with torch.no_grad():
        src.final_act.gamma.fill_(0.3)  # an SNT-only parameter, to see it round-trip
    path = tmp_path / "snt.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = create_model(ModelConfig(name="resnet20", checkpoint_path=str(path)), num_classes=10, arch=snt)
    assert isinstance(dst.layer1[0], PreActBasicBlock) and isinstance(dst.final_act, RPReLU)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    # The same file does not fit the plain network.
    with pytest.raises(CheckpointError, match="unexpected key"):
        create_model(ModelConfig(name="resnet20", checkpoint_path=str(path)), num_classes=10)
    # Pretrained weights of the plain network, then the transform, then a new head.
    base_path = tmp_path / "base.pth"
    base = create_model(ModelConfig(name="resnet20"), num_classes=10)
    torch.save(base.state_dict(), base_path)
    ft = create_model(ModelConfig(name="resnet20", pretrained=True, checkpoint_path=str(base_path)), num_classes=4,
                      arch=snt)
    assert isinstance(ft.layer3[2], PreActBasicBlock) and ft.fc.out_features == 4
    assert torch.equal(ft.layer3[2].conv2.weight, base.layer3[2].conv2.weight)
