"""Copy the trained weights of a finished craft-run run to a file a later run can load as pretrained weights.

    python scripts/export_checkpoint.py RUN_DIR DEST.pt

RUN_DIR holds the run's results.json, which names the cache entry (``cache_key``) under ``paths.cache_dir``;
its model.pt ({"model": state_dict, "meta": ...}) is copied to DEST (``model.checkpoint_path`` reads the
"model" key). The pretraining step of the _small CrAFT experiments (`make pretrained`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def export(run_dir: Path, dest: Path) -> Path:
    results = json.loads((Path(run_dir) / "results.json").read_text())
    if results.get("status") != "ok":
        raise ValueError(f"{run_dir}: the run did not finish (status {results.get('status')!r})")
    src = Path(results["config"]["paths"]["cache_dir"]) / results["cache_key"] / "model.pt"
    if not src.is_file():
        raise ValueError(f"{src}: no cached weights (was the cache cleaned?)")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dest)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    try:
        print(export(Path(sys.argv[1]), Path(sys.argv[2])))
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"export_checkpoint: error: {e}")
