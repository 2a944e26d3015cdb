"""On-disk capture: safetensors shards plus a Parquet table, keyed by a fingerprint, resumable, verified.

A capture lives in ``<root>/<name>-<fingerprint[:16]>/``:

    spec.json                  everything that went into the fingerprint
    shard-00003.safetensors    tensors of the shard's items (row i of every tensor is item i of the shard)
    shard-00003.parquet        one row per item: ids, question, response, grade, token counts, output scores
    shard-00003.done.json      written last: item count and sha256 of both files. No done file, no shard.
    table.parquet              all shards' rows, merged once
    manifest.json              written last: shards, hashes, summary. Its presence means "complete".

Every file is written to a temp name and renamed, so an interrupted run leaves whole shards or none. A shard whose
hash no longer matches is reported and recomputed, never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from kvprobe.assets import as_created, sha256_file


class CorruptCapture(RuntimeError):
    """A capture file is missing, truncated or altered."""


def spec_digest(spec: dict) -> str:
    """The content hash of a capture spec: it names the capture's folder."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        as_created(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: Path, obj) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1, default=str)))


def _read_object(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "BOOL": np.bool_, "U8": np.uint8}


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file as read-only memory maps: nothing is read until a row is indexed."""
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        shape = tuple(meta["shape"])
        if end == begin:
            out[name] = torch.zeros(shape, dtype=getattr(torch, np.dtype(_NP_DTYPES[meta["dtype"]]).name))
            continue
        array = np.memmap(path, dtype=_NP_DTYPES[meta["dtype"]], mode="r", offset=8 + header_len + begin, shape=shape)
        with warnings.catch_warnings():  # torch warns that the array is read-only; we never write to it
            warnings.simplefilter("ignore", UserWarning)
            out[name] = torch.from_numpy(array)
    return out


class CaptureStore:
    def __init__(self, path: Path):
        self.path = Path(path)

    # --- writing ------------------------------------------------------------------------------------------
    def begin(self, spec: dict) -> None:
        """Create the folder and its spec.json (rewritten when missing or damaged: the caller knows the spec)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if _read_object(self.path / "spec.json") is None:
            _write_json(self.path / "spec.json", spec)

    def _files(self, j: int) -> tuple[Path, Path, Path]:
        stem = self.path / f"shard-{j:05d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".parquet"), Path(f"{stem}.done.json")

    def write_shard(self, j: int, tensors: dict[str, torch.Tensor], rows: list[dict], seconds: float = 0.0) -> None:
        """``seconds``: the model time the shard took, kept so a resumed capture reports its whole cost."""
        tensor_file, table_file, done_file = self._files(j)
        tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
        _atomic(tensor_file, lambda tmp: save_file(tensors, tmp))
        _atomic(table_file, lambda tmp: pq.write_table(pa.Table.from_pylist(rows), tmp))
        record = {"items": len(rows), "files": {f.name: sha256_file(f) for f in (tensor_file, table_file)},
                  "seconds": round(seconds, 3)}
        _write_json(done_file, record)

    def seconds(self, n_shards: int) -> float:
        """Model time of all shards, over every run that wrote one."""
        return sum(json.loads(self._files(j)[2].read_text()).get("seconds", 0.0) for j in range(n_shards))

    def shard_ok(self, j: int) -> bool:
        """True when shard ``j`` is complete and intact. A damaged shard is removed (and reported) so it is redone."""
        tensor_file, table_file, done_file = self._files(j)
        if not done_file.is_file():
            return False
        problem = self._check(done_file)
        if problem is None:
            return True
        warnings.warn(f"{self.path.name}: shard {j} is corrupt ({problem}); recomputing it")
        for f in (done_file, tensor_file, table_file):
            f.unlink(missing_ok=True)
        (self.path / "manifest.json").unlink(missing_ok=True)
        return False

    def _check(self, done_file: Path) -> str | None:
        record = _read_object(done_file)
        files = record.get("files") if record else None
        if not isinstance(files, dict):
            return f"unreadable {done_file.name} (not a JSON object with 'files')"
        for name, digest in files.items():
            f = self.path / name
            if not f.is_file():
                return f"{name} is missing"
            if sha256_file(f) != digest:
                return f"{name} does not match its recorded sha256 (truncated or altered)"
        return None

    def rows_of(self, j: int) -> list[dict]:
        return pq.read_table(self._files(j)[1]).to_pylist()

    def rows(self, n_shards: int) -> list[dict]:
        return [r for j in range(n_shards) for r in self.rows_of(j)]

    def finalize(self, n_shards: int, summary: dict) -> None:
        tables = [pq.read_table(self._files(j)[1]) for j in range(n_shards)]
        table_file = self.path / "table.parquet"
        _atomic(table_file, lambda tmp: pq.write_table(pa.concat_tables(tables, promote_options="default"), tmp))
        shards = [json.loads(self._files(j)[2].read_text()) for j in range(n_shards)]
        manifest = {"shards": shards, "table": sha256_file(table_file), "summary": summary}
        _write_json(self.path / "manifest.json", manifest)

    # --- reading ------------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """A manifest is there and readable. A damaged one is removed (and reported): the next capture run rebuilds
        it from the intact shards without model work."""
        path = self.path / "manifest.json"
        if not path.is_file():
            return False
        manifest = _read_object(path)
        if manifest is not None and isinstance(manifest.get("shards"), list) and "summary" in manifest:
            return True
        warnings.warn(f"{path} is damaged; removed, the next capture run rebuilds it from the intact shards")
        path.unlink(missing_ok=True)
        return False

    def manifest(self) -> dict:
        return self._required("manifest.json")

    def spec(self) -> dict:
        return self._required("spec.json")

    def _required(self, name: str) -> dict:
        record = _read_object(self.path / name)
        if record is None:
            raise CorruptCapture(f"{self.path / name} is missing or damaged: run the capture again "
                                 "(python -m kvprobe.capture with the same settings) to rebuild it")
        return record

    def verify(self) -> list[int]:
        """Indices of shards that are damaged (and now removed, so a capture run redoes them)."""
        n = len(self.manifest()["shards"])
        bad = [j for j in range(n) if not self.shard_ok(j)]
        table_file = self.path / "table.parquet"
        if not bad and (not table_file.is_file() or sha256_file(table_file) != self.manifest()["table"]):
            (self.path / "manifest.json").unlink(missing_ok=True)  # the merged table is rebuilt from the shards
            bad = [-1]
        return bad

    def open(self) -> tuple[list[dict[str, torch.Tensor]], pa.Table]:
        """Memory-mapped shard tensors and the merged table. Run ``verify`` first (capture does)."""
        if not self.complete:
            raise CorruptCapture(f"{self.path} is not a complete capture (no manifest.json): run the capture again")
        n = len(self.manifest()["shards"])
        return [mmap_safetensors(self._files(j)[0]) for j in range(n)], pq.read_table(self.path / "table.parquet")

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
