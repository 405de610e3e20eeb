"""Read an offline W&B run's ``run-<id>.wandb`` file (wandb ships no reader): a LevelDB-style log of
protobuf `Record` messages after a 7-byte ``:W&B`` header, in 32 KiB blocks."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32768
HEADER = 7  # a chunk's crc32 (4), length (2), type (1): 1 full, 2 first, 3 middle, 4 last


def records(path: Path) -> Iterator:
    """Every `wandb_internal_pb2.Record` of the file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B datastore"
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER:  # block trailer padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        pending += data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_run(path: Path) -> dict:
    """``{"name", "group", "job_type", "config": {key: value}, "summary": {key: last value}, "files": [...]}``."""
    run: dict = {"config": {}, "summary": {}, "files": []}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(name=record.run.display_name, group=record.run.run_group, job_type=record.run.job_type)
        elif kind == "config":
            run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "summary":
            for item in record.summary.update:
                run["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "files":
            run["files"] += [file.path for file in record.files.files]
    return run
