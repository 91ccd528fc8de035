import json

from craft_runner.report.table import compression_label, load_results, main, paper_table


def write(path, optimizer, compress, fp, acc, lam, secs, status="ok", arch="base", seed=0):
    path.mkdir(parents=True)
    snt = arch != "base"
    cfg = {"model": {"name": "resnet20"}, "dataset": {"name": "digits"}, "optimizer": {"name": optimizer},
           "arch": {"name": arch, "preact": snt, "rprelu": snt}, "seed": seed, "compress": compress}
    metrics = {"fp_acc": fp, "lambda_max_after": lam, "train_seconds": secs}
    if acc is not None:
        metrics.update(compressed_acc=acc, drop=acc - fp)
    (path / "results.json").write_text(json.dumps({"config": cfg, "metrics": metrics, "status": status}))


def test_table_cells_overhead_and_failed_runs(tmp_path, capsys):
    ptq = {"name": "ptq", "method": "base", "w_bits": 8, "a_bits": 8}
    prune = {"name": "prune", "criterion": "magnitude", "pattern": "unstructured", "sparsity": 0.5}
    write(tmp_path / "a1", "adam", ptq, 98.0, 97.5, 40.0, 10.0)
    write(tmp_path / "a2", "adam", prune, 98.0, 90.25, 40.0, 10.0)
    write(tmp_path / "s1", "sam", ptq, 98.5, 98.25, 12.0, 21.0)
    write(tmp_path / "s2", "sam", prune, 98.5, 95.0, 12.0, 21.0, status="failed")
    df = load_results(tmp_path)
    assert len(df) == 3
    t = paper_table(df).set_index("optimizer")
    assert t.loc["adam", "W8A8"] == "97.50 (-0.50)" and t.loc["sam", "W8A8"] == "98.25 (-0.25)"
    assert t.loc["adam", "magnitude 50%"] == "90.25 (-7.75)"
    assert t.loc["sam", "overhead"] == "2.10x" and t.loc["adam", "overhead"] == "1.00x"
    assert t.loc["sam", "lambda_max"] == "12"
    assert main([str(tmp_path)]) == 0
    assert "97.50 (-0.50)" in capsys.readouterr().out


def test_labels():
    assert compression_label({"name": "ptq", "method": "base", "w_bits": 6, "a_bits": 16}) == "W6A16"
    assert compression_label({"name": "prune", "criterion": "wanda", "pattern": "nm", "n": 2, "m": 4,
                              "sparsity": 0.5}) == "wanda 2:4"
    assert compression_label({"name": "none"}) == "none"
    assert compression_label({"name": "ptq", "method": "base", "w_bits": 4, "a_bits": 32,
                              "finetune_epochs": 1}) == "W4A32 +ft1"
    assert compression_label({"name": "prune", "criterion": "magnitude", "pattern": "unstructured",
                              "sparsity": 0.8, "schedule": "iterative"}) == "iterative magnitude 80%"


def test_empty_dir_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no finished results.json" in capsys.readouterr().err


def test_overhead_is_against_adam_on_the_base_arch_and_seeds_stay_apart(tmp_path):
    ptq = {"name": "ptq", "method": "base", "w_bits": 8, "a_bits": 8}
    write(tmp_path / "a", "adam", ptq, 98.0, 97.0, 40.0, 10.0)
    write(tmp_path / "b", "adam", ptq, 98.0, 96.0, 30.0, 30.0, arch="snt")
    write(tmp_path / "c", "sam", ptq, 98.0, 97.5, 10.0, 20.0)
    write(tmp_path / "d", "adam", ptq, 97.0, 95.0, 50.0, 12.0, seed=1)
    t = paper_table(load_results(tmp_path))
    rows = {(r.optimizer, r.arch.split("(")[0], r.seed): r for r in t.itertuples()}
    assert rows[("adam", "base", 0)].overhead == "1.00x" and rows[("adam", "snt", 0)].overhead == "3.00x"
    assert rows[("sam", "base", 0)].overhead == "2.00x" and rows[("adam", "base", 1)].overhead == "1.00x"
    assert rows[("adam", "base", 1)].W8A8 == "95.00 (-2.00)" and rows[("adam", "base", 0)].W8A8 == "97.00 (-1.00)"
