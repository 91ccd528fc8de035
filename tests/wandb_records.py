"""Read an offline W&B run back: its ``.wandb`` file is W&B's record log (the LevelDB log format: 32 KiB
blocks of chunks with a 7-byte header — CRC, length, type — after a 7-byte ``:W&B`` file header), each record
a ``wandb.proto.wandb_internal_pb2.Record``. wandb 0.31 ships the protobuf schema but no Python reader of the
framing (the writer is wandb-core), so the framing is read here and every record parsed with wandb's schema."""

import json
import struct
import time
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B record log")
    pos, chunks, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the rest of a block is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        if len(chunk) < length:  # the writer was killed mid-record: what came before is whole
            break
        pos += 7 + length
        if kind == FULL:
            chunks.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            chunks.append(pending + chunk)
    return [pb.Record.FromString(c) for c in chunks]


def finished_records(run_dir: Path, wait_s: float = 60.0) -> list:
    """The records of a run directory once its ``exit`` record is there: W&B's service (wandb-core, its own
    process) may still be writing after ``run.finish()`` returned or the run's process ended. After ``wait_s``
    (a run that was killed never gets one) the records as they are."""
    deadline = time.time() + wait_s
    while True:
        files = list(Path(run_dir).glob("*.wandb"))
        records = read_records(files[0]) if len(files) == 1 else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            return records
        time.sleep(0.2)


def run_summary(run_dir: Path, wait_s: float = 60.0) -> dict:
    """What a W&B offline run directory recorded: run id, name, group, tags, config, history rows, summary."""
    out = {"history": [], "summary": {}, "config": {}, "files": []}
    for r in finished_records(run_dir, wait_s):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, name=r.run.display_name, group=r.run.run_group, tags=list(r.run.tags),
                       job_type=r.run.job_type)
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            row["_step"] = r.history.step.num
            out["history"].append(row)
        elif kind == "summary":
            out["summary"].update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                   for i in r.summary.update})
        elif kind == "files":
            out["files"] += [f.path for f in r.files.files]
    return out
