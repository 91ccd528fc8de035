"""The papers' tables and figures as layouts, one per experiment (``conf/experiment/<name>.yaml``).

A ``<name>_small`` experiment uses ``<name>``'s layout; a run of no known experiment gets :data:`GENERIC`.
Labels follow the papers (CrAFT's "ADAM" / "CrAFT", SNT's "ADAM" / "SAM" / "ARCH"); the published numbers
(``paper/<name>.csv``) use the same labels, so ``--paper`` can put them beside the measured ones.
"""

from __future__ import annotations

from typing import Optional

from craft_runner.report import figures, pareto
from craft_runner.report.engine import Col, Layout, Row, is_adam
from craft_runner.report.records import Record

# ------------------------------------------------------------------------------------------------ labels

TASKS = {"flowers102": "Flowers-102", "stanford_cars": "Stanford Cars", "oxford_pets": "Oxford Pets",
         "fgvc_aircraft": "Aircraft", "food101": "Food", "cifar100": "CIFAR-100", "cifar10": "CIFAR-10",
         "imagenet": "ImageNet-1k", "digits": "Digits", "synthetic": "Synthetic"}
TASK_ORDER = ["Flowers-102", "Stanford Cars", "Oxford Pets", "Aircraft", "Food", "CIFAR-100", "CIFAR-10"]
BACKBONES = {
    "vit_base_patch16_224.augreg_in21k": "ViT-B@IMNET-21k", "efficientnet_b0.ra_in1k": "EfficientNet-B0@IMNET-1k",
    "resnet101.tv_in1k": "ResNet101@IMNET-1k", "mobilenetv2_100.ra_in1k": "MobileNet-V2@IMNET-1k",
    "vit_base_patch16_224.augreg_in1k": "ViT-B (AugReg)", "vit_base_patch16_224.sam_in1k": "ViT-B-SAM",
    "resnet20": "ResNet-20", "resnet18": "ResNet-18", "mixer_s_cifar": "Mixer-S", "mobilenetv1_cifar": "MobileNet-V1",
    "test_vit": "tiny ViT", "test_efficientnet": "tiny EfficientNet", "test_resnet": "tiny ResNet",
}
BACKBONE_ORDER = ["ViT-B@IMNET-21k", "EfficientNet-B0@IMNET-1k", "ResNet101@IMNET-1k", "MobileNet-V2@IMNET-1k",
                  "tiny ViT", "tiny EfficientNet", "ResNet-20", "ResNet-18", "Mixer-S", "MobileNet-V1"]
BITS_ORDER = ["W8A8", "W6A6", "W6A16", "W5A16", "W4A16", "W4A8", "W4A4", "W3A16", "W2A16"]
SHAPE_ORDER = [f"{s}%" for s in range(10, 100, 10)] + ["32:64", "16:32", "8:16", "4:8", "2:4"]


def caps(c: dict):
    """The capabilities the compressor of a compress config declares (none for a name this install lacks)."""
    # local: the compressors import torch, which reading results does not need until a label is asked for
    from craft_runner.compress.registry import capabilities

    return capabilities(c.get("name", "none"))


def tagged(c: dict, label: str) -> str:
    """A column label with the compressor's tag in front (GPTQ W4A16, SparseGPT 2:4); the papers' own bare."""
    tag = caps(c).tag
    return f"{tag} {label}" if tag else label


def tagged_order(order: list) -> list:
    return list(order) + [f"GPTQ {x}" for x in order]


def task(name, classes=None) -> str:
    label = TASKS.get(name, str(name))
    if classes:
        cs = list(classes)
        span = f"{cs[0]}-{cs[-1]}" if cs == list(range(cs[0], cs[0] + len(cs))) else ",".join(map(str, cs))
        label += f" {span}"
    return label


def backbone(name) -> str:
    return BACKBONES.get(name, str(name))


def craft_method(opt) -> str:
    """CrAFT's rows: Adam fine-tuning is the baseline, SAM fine-tuning is CrAFT."""
    return {"adam": "ADAM", "sam": "CrAFT"}.get(opt, str(opt).upper())


def approach(opt, preact, rprelu) -> str:
    """SNT's approaches: ADAM (baseline), SAM, ARCH (Adam on the transformed network)."""
    arch = "ARCH" if (preact and rprelu) else "+Preact" if preact else "+RPReLU" if rprelu else ""
    if opt == "adam":
        return arch or "ADAM"
    return str(opt).upper() + (f" {arch}" if arch else "")


def ablation(preact, rprelu) -> str:
    return ("+PReLU/LBias" if (preact and rprelu) else "+Preact" if preact else "RPReLU only" if rprelu
            else "Baseline")


def bits(r: Record) -> Optional[str]:
    """The bit widths of any compressor that declares it quantizes (``Capabilities.quantizes``); its row names it."""
    c = r.config.get("compress") or {}
    if not caps(c).quantizes or "w_bits" not in c:
        return None
    return f"W{c['w_bits']}A{c['a_bits']}"


def tagged_bits(r: Record) -> Optional[str]:
    """:func:`bits` with the compressor's tag in front (GPTQ W4A16), for tables whose rows do not name it."""
    b = bits(r)
    return None if b is None else tagged(r.config.get("compress") or {}, b)


def bitwidth(r: Record) -> Optional[str]:
    """SNT's "Bitwidth (W/A)": 16 or more bits print as fp32."""
    c = r.config.get("compress") or {}
    if "w_bits" not in c:
        return None
    def b(x):
        return "fp32" if x >= 16 else str(x)
    return f"{b(c['w_bits'])}/{b(c['a_bits'])}"


def sparsity(r: Record) -> Optional[str]:
    c = r.config.get("compress") or {}
    if not caps(c).sparse or c.get("pattern") == "nm" or "sparsity" not in c:
        return None
    return f"{100 * c['sparsity']:.0f}%"


def prune_shape(r: Record) -> Optional[str]:
    """Any sparse compressor's (``Capabilities.sparse``) sparsity or N:M; its row names the criterion."""
    c = r.config.get("compress") or {}
    if not caps(c).sparse or "sparsity" not in c:
        return None
    return f"{c['n']}:{c['m']}" if c.get("pattern") == "nm" else f"{100 * c['sparsity']:.0f}%"


def quant_method(name, method, smooth_alpha) -> str:
    """Table 2's Method: BasePTQ / PTQ4ViT, another quantizer by its tag; "+SmoothQuant" when smoothed first."""
    tag = caps({"name": name}).tag
    label = tag or {"base": "BasePTQ", "ptq4vit": "PTQ4ViT"}.get(method, str(method))
    return label + (" +SmoothQuant" if smooth_alpha is not None else "")


def prune_criterion(name, criterion) -> str:
    """Figure 4's Criterion: Magnitude / Wanda, another pruner by its tag."""
    return caps({"name": name}).tag or str(criterion).capitalize()


def compression(r: Record) -> Optional[str]:
    from craft_runner.report.labels import compression_label

    c = r.config.get("compress") or {}
    return None if c.get("name", "none") == "none" else compression_label(c)


# ------------------------------------------------------------------------------------------------ values


def m(name):
    return lambda r: r.metrics.get(name)


fp_acc = m("fp_acc")
acc = m("compressed_acc")
drop = m("drop")
lam = m("lambda_max_after")
lam_before = m("lambda_max_before")


def minutes(r: Record):
    s = r.metrics.get("train_seconds")
    return None if s is None else s / 60


def spectrum_share(kinds):
    def fn(r: Record):
        by = ((r.sharpness.get("after") or {}).get("spectrum") or {}).get("by_kind") or {}
        vals = [by[k]["share"] for k in by if any(k.endswith(x) for x in kinds)]
        return sum(vals) / len(vals) if vals else None
    return fn


def act_stat(name: str, reduce=max):
    def fn(r: Record):
        blocks = (((r.sharpness.get("after") or {}).get("act_ranges") or {}).get("blocks") or {}).values()
        vals = [b[name] for b in blocks if b.get(name) is not None]
        return reduce(vals) if vals else None
    return fn


def where_compress(name=None, **fields):
    def fn(r: Record) -> bool:
        c = r.config.get("compress") or {}
        return (name is None or c.get("name") == name) and all(c.get(k) == v for k, v in fields.items())
    return fn


FP32 = Col("FP32", fp_acc, per="training")
LAMBDA = Col("λmax", lam, per="training", kind="lam")
OPT = Row("Optimizer", ("optimizer.name",), lambda o: str(o).upper(), order=["ADAM"])
APPROACH = Row("Approach", ("optimizer.name", "arch.preact", "arch.rprelu"), approach,
               order=["ADAM", "SAM", "ARCH", "+Preact", "+RPReLU"])
OVERHEAD_CONTEXT = ("optimizer.", "arch.")

# ------------------------------------------------------------------------------------------------ layouts

LAYOUTS: dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
    LAYOUTS[layout.name] = layout
    return layout


register(Layout(
    "craft_table1", "CrAFT Table 1: compressibility of SAM (ViT-B pretrained with Adam+AugReg or SAM)",
    rows=[Row("Model", ("model.name",), lambda n: "SAM" if "sam" in str(n) else "ADAM" if "augreg" in str(n)
              else backbone(n), order=["ADAM", "SAM"]),
          # the small variant trains its stand-ins for the two pretrained ViTs: the row names that optimizer
          Row("Fine-tuning", ("optimizer.name", "train.epochs"), lambda o, e: "none" if not e else str(o).upper())],
    cols=[Col("λmax", lam, per="training", kind="lam"),
          Col("Accuracy", fp_acc, per="training"),
          Col("Weight Pruning (50%)", acc, drop, where=where_compress("prune", sparsity=0.5, pattern="unstructured")),
          Col("Token Pruning", acc, drop, where=where_compress("token_prune")),
          Col("Token Merging", acc, drop, where=where_compress("tome")),
          Col("A8W8", acc, drop, where=where_compress("ptq", w_bits=8, a_bits=8))],
    paper_csv="craft_table1.csv",
    note="token pruning / merging: compress names token_prune and tome",
    # the Adam-pretrained model (the small variant: the stand-in trained with Adam and augmentation)
    baseline=(lambda r: "sam" not in str(r.get("model.name")) and r.get("optimizer.name") == "adam",
              ("model.", "optimizer.", "train.epochs", "dataset.augment")),
    baseline_label="the ADAM model's row"))

register(Layout(
    "craft_table2", "CrAFT Table 2: PTQ after task adaptation (accuracy, drop from FP32 in parentheses)",
    rows=[Row("Downstream Task", ("dataset.name", "dataset.classes"), task, order=TASK_ORDER),
          Row("Method", ("compress.name", "compress.method", "compress.smooth_alpha"), quant_method,
              order=["BasePTQ", "BasePTQ +SmoothQuant", "PTQ4ViT", "PTQ4ViT +SmoothQuant", "GPTQ",
                     "GPTQ +SmoothQuant"]),
          Row("Fine-tuning", ("optimizer.name",), craft_method, order=["ADAM", "CrAFT"])],
    cols=[FP32, Col(None, acc, drop, pivot=bits, order=BITS_ORDER)],
    figures=[figures.drop_bars],
    paper_csv="craft_table2.csv",
    note="GPTQ and +SmoothQuant rows: this runner's extension (issue 31), not the paper's"))

register(Layout(
    "craft_table3", "CrAFT Table 3: various foundation models fine-tuned, BasePTQ",
    rows=[Row("Backbone", ("model.name",), backbone, order=BACKBONE_ORDER),
          Row("Method", ("optimizer.name",), craft_method, order=["ADAM", "CrAFT"])],
    cols=[FP32, Col(None, acc, drop, pivot=tagged_bits, order=tagged_order(BITS_ORDER))],
    figures=[figures.drop_bars],
    paper_csv="craft_table3.csv",
    note="GPTQ columns: this runner's extension (issue 31), not the paper's"))

register(Layout(
    "craft_table4", "CrAFT Table 4: end-to-end fine-tuning time and overhead",
    rows=[Row("Downstream Task", ("dataset.name", "dataset.classes"), task, order=TASK_ORDER),
          Row("Method", ("optimizer.name",), craft_method, order=["ADAM", "CrAFT"])],
    cols=[Col("E2E Time (Min)", minutes, per="training", kind="time"),
          Col("Overhead", minutes, per="training", kind="ratio", relative=("ratio", is_adam, OVERHEAD_CONTEXT))],
    paper_csv="craft_table4.csv"))

register(Layout(
    "craft_table5", "CrAFT Table 5: λmax before fine-tuning, after Adam and after SAM (CrAFT)",
    rows=[Row("Downstream Task", ("dataset.name", "dataset.classes"), task, order=TASK_ORDER)],
    cols=[Col("Before FT", lam_before, per="training", kind="lam", paths=("optimizer.",)),
          Col("ADAM", lam, per="training", kind="lam", where=lambda r: r.get("optimizer.name") == "adam",
              versus="Before FT"),
          Col("CrAFT", lam, per="training", kind="lam", where=lambda r: r.get("optimizer.name") == "sam",
              versus="ADAM")],
    figures=[figures.lambda_bars],
    paper_csv="craft_table5.csv"))

register(Layout(
    "craft_fig1", "CrAFT Figure 1: share of weight variance in the top-k principal components",
    rows=[Row("Model", ("model.name",), backbone), OPT],
    cols=[Col("FFN share", spectrum_share(("mlp.fc1", "mlp.fc2", "mlp_channels.fc1", "mlp_channels.fc2")),
              per="training", kind="share"),
          Col("QKV share", spectrum_share(("attn.qkv",)), per="training", kind="share"),
          Col("k", lambda r: r.config.get("sharpness", {}).get("spectrum_k"), per="training", kind="text")],
    figures=[figures.pca_curves]))

register(Layout(
    "craft_fig2", "CrAFT Figure 2: per-channel ranges of the blocks' inputs",
    rows=[Row("Model", ("model.name",), backbone), OPT],
    cols=[Col("max |x|", act_stat("absmax"), per="training", kind="lam"),
          Col("max outlier ratio", act_stat("outlier_ratio"), per="training", kind="lam"),
          Col("median outlier ratio", act_stat("outlier_ratio", lambda v: sorted(v)[len(v) // 2]), per="training",
              kind="lam")],
    figures=[figures.activation_ranges]))

register(Layout(
    "craft_fig4", "CrAFT Figure 4: one-shot pruning, (a) unstructured and (b) N:M at 50 %",
    rows=[Row("Criterion", ("compress.name", "compress.criterion"), prune_criterion,
              order=["Magnitude", "Wanda", "SparseGPT"]),
          Row("Fine-tuning", ("optimizer.name",), craft_method, order=["ADAM", "CrAFT"])],
    cols=[FP32, Col(None, acc, drop, pivot=prune_shape, order=SHAPE_ORDER)],
    figures=[figures.sparsity_curves_craft, figures.nm_bars],
    note="SparseGPT rows and columns: this runner's extension (issue 31), not the paper's"))

ACT_QUANT = Row("Act. quant", ("compress.act_quant",),
                lambda a: {None: "distiller", "layer_inputs": "layer inputs", "activations": "all activations"}
                .get(a, str(a)), order=["distiller", "layer inputs", "all activations"])


def _snt_table3(kind: str, title: str, backbones: list, extra_rows: tuple = ()) -> Layout:
    """SNT Table 3, either half: the same rows and columns, PTQ and QAT differ in title and backbones; QAT's
    sweeps compare two activation coverages (``extra_rows``: a row field for them, before the approach)."""
    return Layout(
        f"snt_table3_{kind}", title,
        rows=[Row("Backbone", ("model.name",), backbone, order=backbones),
              Row("Dataset", ("dataset.name", "dataset.classes"), task), *extra_rows, APPROACH],
        cols=[Col("λmax (↓)", lam, per="training", kind="lam"), Col("Bitwidth (W/A)", bitwidth, kind="text"),
              Col("Top-1 (%)", acc, drop), Col("FP32", fp_acc, per="training", paper=False)],
        figures=[figures.lambda_bars],
        paper_csv=f"snt_table3_{kind}.csv")


register(_snt_table3("ptq", "SNT Table 3 (PTQ): λmax and top-1 after post-training quantization",
                     ["ResNet-20", "Mixer-S", "MobileNet-V1"]))
register(_snt_table3("qat", "SNT Table 3 (QAT): λmax and top-1 after PACT quantization-aware training",
                     ["ResNet-18", "ResNet-20", "Mixer-S", "MobileNet-V1"], extra_rows=(ACT_QUANT,)))

register(Layout(
    "snt_table4", "SNT Table 4: cumulative ablation of the transformation, static W4 quantization",
    rows=[Row("", ("arch.preact", "arch.rprelu"), ablation, order=["Baseline", "+Preact", "+PReLU/LBias"])],
    cols=[Col("λmax (↓)", lam, per="training", kind="lam"), Col("Top-1 (%)", acc, drop),
          Col("Acc. Boost (%)", acc, kind="diff",
              relative=("diff", lambda r: not r.get("arch.preact") and not r.get("arch.rprelu"), ("arch.",))),
          Col("FP32", fp_acc, per="training", paper=False)],
    figures=[figures.lambda_bars],
    paper_csv="snt_table4.csv"))

register(Layout(
    "snt_fig5", "SNT Figure 5: iterative (IMP) and one-shot magnitude pruning",
    rows=[Row("Backbone", ("model.name",), backbone, order=["ResNet-20", "Mixer-S"]),
          Row("Pruning", ("compress.schedule",), lambda s: "IMP" if s == "iterative" else "one-shot",
              order=["IMP", "one-shot"]),
          APPROACH],
    cols=[FP32, Col(None, acc, drop, pivot=sparsity)],
    figures=[figures.sparsity_curves_snt]))

register(Layout(
    "snt_fig6", "SNT Figure 6: top-1 after W4 PTQ and k epochs of fine-tuning",
    rows=[APPROACH],
    cols=[FP32, Col(None, acc, drop, pivot=lambda r: f"ft {r.get('compress.finetune_epochs')} ep"
                    if r.get("compress.name") == "ptq" else None)],
    figures=[figures.finetune_curves]))

register(Layout(
    "snt_fig7", "SNT Figure 7: effect of augmentation, one-shot magnitude pruning",
    rows=[Row("Augmentation", ("dataset.augment",), lambda a: "with" if a else "without", order=["with", "without"]),
          APPROACH],
    cols=[FP32, Col(None, acc, drop, pivot=sparsity)],
    figures=[figures.sparsity_curves_snt]))

register(Layout(
    "cheap_sam", "Cheap SAM variants: training cost, λmax and compression drops",
    rows=[Row("Optimizer", ("optimizer.name", "arch.preact", "arch.rprelu"), approach,
              order=["ADAM", "SAM", "ASAM", "LOOKSAM", "RANDSAM", "MSAM", "SAF", "MESA", "SWA", "RWP", "ARCH"])],
    cols=[Col("cost vs Adam", m("train_seconds"), per="training", kind="ratio",
              relative=("ratio", is_adam, OVERHEAD_CONTEXT)),
          Col("2nd passes", m("second_pass_fraction"), per="training", kind="share"),
          LAMBDA, FP32,
          Col(None, acc, drop, pivot=compression, order=["W4A16", "W6A6", "magnitude 30%", "magnitude 50%",
                                                         "GPTQ W4A16", "SparseGPT 50%"])],
    figures=[figures.lambda_bars, pareto.figure]))

register(Layout(
    "digits_default", "The default job: ResNet-20 trained on digits, BasePTQ and one-shot pruning",
    rows=[Row("Optimizer", ("optimizer.name",), lambda o: str(o).upper(), order=["ADAM", "SAM"])],
    cols=[FP32, LAMBDA, Col("train (s)", m("train_seconds"), per="training", kind="time"),
          Col("overhead", m("train_seconds"), per="training", kind="ratio",
              relative=("ratio", is_adam, OVERHEAD_CONTEXT)),
          Col(None, acc, drop, pivot=compression, order=["W8A8", "W6A6", "W4A16", "magnitude 50%"])],
    figures=[figures.lambda_bars]))

GENERIC = Layout(
    "generic", "Results",
    rows=[Row("model", ("model.name",)), Row("dataset", ("dataset.name", "dataset.classes"), task),
          Row("optimizer", ("optimizer.name",), order=["adam"]),
          Row("arch", ("arch.preact", "arch.rprelu"),
              lambda p, r: "base" if not (p or r) else "snt" if (p and r) else "preact" if p else "rprelu",
              order=["base"])],
    cols=[FP32, LAMBDA, Col("train (s)", m("train_seconds"), per="training", kind="time"),
          Col("overhead", m("train_seconds"), per="training", kind="ratio",
              relative=("ratio", is_adam, OVERHEAD_CONTEXT)),
          Col(None, acc, drop, pivot=compression)])


def layout_for(experiment: Optional[str]) -> Layout:
    """The layout of an experiment: its own, its full version's for ``<name>_small``, else the generic one."""
    if experiment:
        base = experiment[: -len("_small")] if experiment.endswith("_small") else experiment
        if base in LAYOUTS:
            return LAYOUTS[base]
    return GENERIC
