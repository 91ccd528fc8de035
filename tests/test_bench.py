"""craft_runner.bench.speed (make bench): the step rows on a short run, and the step costs craft-report reads."""

import torch
from timm import create_model

from craft_runner.bench import speed

# the optimizers craft_runner.bench.speed times against Adam
OPTIMIZER_ROWS = {"SAM / Adam step", "LookSAM (k=5) / Adam step", "random SAM (p=0.25) / Adam step",
                  *(f"{n} / Adam step" for n in speed.CHEAP)}


def test_step_rows_of_a_short_run():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=g).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), generator=g)
    rows = speed.bench_steps(model, x, y, rounds=4, warmup=1, deadline=0.0)
    assert {r.name for r in rows} == OPTIMIZER_ROWS
    assert all(r.ratio > 0 and r.target == speed.TARGETS["sam" if r.name.startswith("SAM") else "cheap"] for r in rows)
    # SAM's step is two forward-backward passes of Adam's one: well above one Adam step even on a busy machine
    assert next(r for r in rows if r.name == "SAM / Adam step").ratio > 1.3
    costs = speed.step_costs(rows)
    assert set(costs) == {"adam", "sam", "looksam", "randsam", *speed.CHEAP}


def test_step_costs_names_the_optimizers_craft_report_knows():
    rows = [speed.Row("SAM / Adam step", 2.0, 2.05, ""), speed.Row("LookSAM (k=5) / Adam step", 1.2, 1.35, ""),
            speed.Row("random SAM (p=0.25) / Adam step", 1.25, 1.35, ""), speed.Row("msam / Adam step", 1.1, 1.35, ""),
            speed.Row("SNT / base step", 1.05, 1.1, ""), speed.Row("HVP / gradient", 2.0, 2.5, "")]
    assert speed.step_costs(rows) == {"adam": 1.0, "sam": 2.0, "looksam": 1.2, "randsam": 1.25, "msam": 1.1,
                                      "arch": 1.05}
    assert speed.Row("x", 1.2, 1.1, "").ok is False and speed.Row("x", 1.2, 1.1, "", higher=True).ok is True
