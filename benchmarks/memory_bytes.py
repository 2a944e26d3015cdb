"""Bytes: what each stored representation costs per item, and hidden states vs the KV cache in flight.

    python benchmarks/memory_bytes.py                         # SmolLM2, contexts 256..4096, its arithmetic capture
    python benchmarks/memory_bytes.py --model <folder> --contexts 32 64 --capture <dir>   # CI, reduced

1. Per item on disk, from a real capture: pooled per-layer KV, the prompt window (difficulty input), pooled hidden
   states, the per-token layer-averaged KV; and what keeping full per-token hidden states would cost.
2. In flight, measured on one forward pass per context length: bytes of the KV cache the model returns versus
   bytes of ``output_hidden_states`` (every layer, every position), and their ratio.
3. The same ratio computed from the configs of the KV paper's models (no weights needed: the shapes suffice).

Prints one JSON line and writes it to benchmarks/results/memory_bytes.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kvprobe.cache import layer_kv
from kvprobe.models import ModelSpec, load_model
from kvprobe.store import CaptureStore

from common import emit

# (layers, kv_heads, head_dim, hidden_size) from each model's config.json
PAPER_MODELS = {
    "Llama-3.1-8B": (32, 8, 128, 4096),
    "Qwen2-7B": (28, 4, 128, 3584),
    "Qwen3-8B": (36, 8, 128, 4096),
    "Qwen3-32B": (64, 8, 128, 5120),
}


def per_token_bytes(layers: int, kv_heads: int, head_dim: int, hidden: int, bytes_per: int = 2) -> dict:
    kv = 2 * layers * kv_heads * head_dim * bytes_per
    hs = (layers + 1) * hidden * bytes_per  # embeddings + every layer's output
    return {"kv_bytes_per_token": kv, "hidden_bytes_per_token": hs, "hidden_over_kv": round(hs / kv, 3)}


def stored_bytes(capture: Path) -> dict:
    shards, table = CaptureStore(capture).open()
    n = table.num_rows
    out = {f"{name}_bytes_per_item": round(sum(s[name].numel() * s[name].element_size() for s in shards) / n, 1)
           for name in ("response_kv", "prompt_kv", "hidden", "token_kv") if name in shards[0]}
    if "hidden" in shards[0]:
        tokens = sum(table.column("gen_tokens").to_pylist()) / n
        width = shards[0]["hidden"].shape[1] * shards[0]["hidden"].shape[2]
        out["full_hidden_states_fp32_bytes_per_item"] = round(tokens * width * 4, 1)
    return out


def in_flight(lm, contexts: list[int]) -> list[dict]:
    rows = []
    vocab = lm.model.config.vocab_size
    for length in contexts:
        ids = torch.randint(100, vocab - 1, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.inference_mode():
            out = lm.model(input_ids=ids, use_cache=True, output_hidden_states=True, logits_to_keep=1)
        kv = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layer_kv(out))
        hs = sum(h.numel() * h.element_size() for h in out.hidden_states)
        rows.append({"context": length, "kv_cache_bytes": kv, "hidden_states_bytes": hs, "hidden_over_kv": round(hs / kv, 3)})
        del out
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--capture", default=None, help="a capture folder (default: the newest SmolLM2 arithmetic capture)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_bytes.json"))
    args = parser.parse_args(argv)

    lm = load_model(ModelSpec(name=args.model, dtype=args.dtype))
    s = lm.shape
    figures = {"benchmark": "memory_bytes", "model": args.model, "dtype": args.dtype}
    if args.capture is None:
        from kvprobe.assets import cache_dir

        found = sorted((cache_dir() / "captures").glob("arithmetic-slow-*/manifest.json"), key=lambda p: p.stat().st_mtime)
        args.capture = str(found[-1].parent) if found else None
    if args.capture:
        figures["capture"] = Path(args.capture).name
        figures |= stored_bytes(Path(args.capture))
    figures["in_flight"] = in_flight(lm, args.contexts)
    bytes_per = torch.tensor([], dtype=lm.model.dtype).element_size()
    figures["this_model_per_token"] = per_token_bytes(s.layers, s.kv_heads, s.head_dim, s.hidden_size, bytes_per)
    figures["paper_models_per_token_bf16"] = {name: per_token_bytes(*shape) for name, shape in PAPER_MODELS.items()}
    return emit(figures, args.out)


if __name__ == "__main__":
    main()
