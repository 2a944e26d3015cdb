"""Resolve and load a frozen causal LM: embedded alias, local HF folder, GGUF file, or hub id."""

from __future__ import annotations

import difflib
import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from kvprobe import assets


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSpec:
    """Which model to run and how.

    Args:
        name: ``smollm2`` (embedded default), ``qwen2.5-coder-0.5b`` (optional extra), a local HF folder,
            a ``.gguf`` file, or a hub id (needs a network).
        dtype: ``float32``, ``bfloat16`` or ``float16``. bf16 is ~2x faster on these CPUs, fp32 is exact.
        device_map: ``None`` for CPU, ``"auto"`` to shard over all GPUs (and CPU), or a device such as ``"cuda:0"``.
        adapter: optional PEFT/LoRA adapter folder applied on top of the frozen base.
    """

    name: str = assets.DEFAULT_MODEL
    dtype: str = "float32"
    device_map: str | None = None
    adapter: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"model.name must name a model (an alias, a folder, a .gguf file or a hub id), not {self.name!r}")


@dataclass(frozen=True)
class ModelShape:
    layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    max_positions: int | None


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec
    source: str  # the folder actually loaded (or the hub id)
    fingerprint: str  # content-derived: changes when the weights or the adapter change
    shape: ModelShape

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


def model_shape(config) -> ModelShape:
    config = getattr(config, "text_config", None) or config
    heads = config.num_attention_heads
    return ModelShape(
        layers=config.num_hidden_layers,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        hidden_size=config.hidden_size,
        max_positions=getattr(config, "max_position_embeddings", None),
    )


def _folder_fingerprint(folder: Path) -> str:
    """Hash of the folder's config and tokenizer files and of each weight file's full contents.

    A weight file's sha256 is memoised by path, size and mtime (``assets.file_sha256``), so each version of a
    file is read once (Qwen2.5-0.5B's 2 GB: docs/capture.md); any edit, even one matrix in the middle, changes it.
    """
    if (folder / assets.CONVERSION_MARKER).is_file():  # checked: a forged marker must not borrow a model's fingerprint
        try:
            return "gguf:" + assets.conversion_digest(folder)
        except assets.AssetError as err:
            raise assets.AssetError(f"{err}; delete {folder / assets.CONVERSION_MARKER} to use the folder as a plain HF "
                                    "model, or convert the GGUF again") from None
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(f.name.encode())
        if f.suffix in {".json", ".txt", ".model", ".jinja"}:
            digest.update(f.read_bytes())
        elif f.suffix in {".safetensors", ".bin", ".pt", ".gguf"}:
            digest.update(assets.file_sha256(f).encode())
    return digest.hexdigest()


def known_fingerprint(name: str) -> str | None:
    """The fingerprint of an embedded alias, known without converting its GGUF (None for any other name)."""
    return "gguf:" + assets.EMBEDDED[name].sha256 if name in assets.EMBEDDED else None


def resolve(name: str) -> tuple[str, str]:
    """Map a model name to (what to pass to ``from_pretrained``, fingerprint of its files)."""
    if name in assets.EMBEDDED:
        entry = assets.EMBEDDED[name]
        folder = assets.converted_gguf(entry.gguf(), entry.sha256)
        return str(folder), "gguf:" + entry.sha256
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        folder = assets.converted_gguf(path)
        return str(folder), _folder_fingerprint(folder)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder but holds no config.json: not a HF model folder")
        return str(path), _folder_fingerprint(path)
    known = f"an embedded alias ({', '.join(assets.EMBEDDED)}), a HF folder nor a .gguf file"
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model {name!r} is neither {known}")
    unreachable = hub_unreachable()
    if unreachable:  # say so at once: the hub client would retry for half a minute before failing
        close = difflib.get_close_matches(name, list(assets.EMBEDDED), n=1)
        raise FileNotFoundError(f"model {name!r} is neither {known}, and it cannot be a hub id here: {unreachable}"
                                + (f". Did you mean {close[0]!r}?" if close else ""))
    return name, "hub:" + name  # a hub id (needs a network): pin a revision by downloading it to a folder


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode set, or its host not answering), or None."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as err:
        return f"{host} cannot be reached ({err})"
    return None


def locate(spec: ModelSpec) -> tuple[str, str]:
    """(what to load, content fingerprint of base weights + adapter), without loading any weights."""
    source, digest = resolve(spec.name)
    if spec.adapter:
        adapter = Path(spec.adapter).expanduser()
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter {adapter} holds no adapter_config.json: not a PEFT adapter folder")
        digest += "+adapter:" + _folder_fingerprint(adapter)
    return source, digest


def load_model(spec: ModelSpec) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    source, digest = locate(spec)
    kwargs = {"dtype": DTYPES[spec.dtype]}
    if spec.device_map is not None:
        if "cuda" in str(spec.device_map) and not torch.cuda.is_available():
            raise ValueError(f"device_map {spec.device_map!r} asks for CUDA, which this machine does not have; use null "
                             "(CPU) or 'auto'")
        kwargs["device_map"] = spec.device_map
    with torch.random.fork_rng():  # weights (and a LoRA adapter) may be initialised before loading: the caller's RNG stays
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if spec.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(Path(spec.adapter).expanduser()))
    model.eval().requires_grad_(False)
    return LoadedModel(model, load_tokenizer(source), spec, source, digest, model_shape(model.config))


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    return for_batches(AutoTokenizer.from_pretrained(source))


def for_batches(tokenizer):
    """``tokenizer`` set up for left-padded batches: a pad id (eos is the usual stand-in) and left padding."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def eos_ids(lm: LoadedModel) -> list[int]:
    """Every id that ends an answer: the generation config's (one or several), else the tokenizer's eos."""
    eos = lm.model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [lm.tokenizer.eos_token_id])


def left_pad(blocks: list[list[int]], pad_id: int, fed: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of ``blocks`` right-aligned in one tensor (left padding, masked); a row with ``fed[i]`` False is
    padding only."""
    width = max(len(b) for b in blocks)
    ids = torch.full((len(blocks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(blocks), width), dtype=torch.long)
    for i, b in enumerate(blocks):
        if b and (fed is None or fed[i]):
            ids[i, width - len(b):] = torch.tensor(b)
            mask[i, width - len(b):] = 1
    return ids, mask


def last_logits_only(model) -> dict:
    """Forward/generate keywords that compute logits for each row's last position only, as one contiguous block.

    ``generate`` already asks for the last position (``logits_to_keep=1``), but as a strided slice of the prompt's
    hidden states; on CPU, a bf16 ``lm_head`` on that view takes a slow path (torch 2.13: ~5 s instead of 0.02 s for
    8 rows and Qwen2.5's 152k vocabulary, the larger part of a whole capture; ``benchmarks/lm_head_slice.py``). A 1-D index tensor selects the same
    position as a contiguous copy (advanced indexing), in the prefill and in every decode step alike. Empty for a
    model whose forward takes no ``logits_to_keep``.
    """
    from kvprobe.cache import forward_takes

    return {"logits_to_keep": torch.tensor([-1])} if "logits_to_keep" in forward_takes(model) else {}
