"""The routers a probe must beat, each trained on the training questions and tuned on validation only: a text-only
router (character n-gram TF-IDF and a logistic regression, as RouteLLM's simplest baselines), a router on the
prompt's hidden states, prompt length, and a random router (its expected outcome, exact)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from kvprobe.models import LoadedModel, left_pad
from kvprobe.prompts import PromptSpec, prompt_ids
from kvprobe.routing import Outcomes
from kvprobe.tasks import Item

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def logistic_router(train_x, train_y: list[int], val_x, val: Outcomes, scale: bool, grid=C_GRID):
    """A logistic regression predicting "only slow mode answers it right"; its inverse L2 strength C chosen among
    ``grid`` by the validation routing gain (``Outcomes.route_gain``). Returns the model and what was chosen."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(train_y)) < 2:
        raise ValueError("the training questions hold one difficulty class only (slow mode never, or always, "
                         "needed): no router can be trained; use more questions")
    best = None
    for c in grid:
        model = make_pipeline(*([StandardScaler()] if scale else []), LogisticRegression(C=c, max_iter=3000))
        model.fit(train_x, train_y)
        gain = val.route_gain(torch.tensor(model.predict_proba(val_x)[:, 1]))
        if best is None or gain > best[0]:
            best = (gain, c, model)
    return best[2], {"C": best[1], "val_route_gain": best[0]}


def text_router(questions: dict[str, list[str]], train_y: list[int], val: Outcomes) -> tuple[dict, dict]:
    """Routing scores per split from the question text alone."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True).fit(questions["train"])
    x = {s: vec.transform(q) for s, q in questions.items()}
    model, chosen = logistic_router(x["train"], train_y, x["val"], val, scale=False)
    return {s: torch.tensor(model.predict_proba(x[s])[:, 1]).float() for s in ("val", "test")}, chosen


def feature_router(features: dict[str, torch.Tensor], train_y: list[int], val: Outcomes) -> tuple[dict, dict]:
    """Routing scores per split from one feature vector per question, standardised."""
    x = {s: f.flatten(1).numpy() for s, f in features.items()}
    model, chosen = logistic_router(x["train"], train_y, x["val"], val, scale=True)
    return {s: torch.tensor(model.predict_proba(x[s])[:, 1]).float() for s in ("val", "test")}, chosen


def length_router(prompt_tokens: dict[str, list[int]]) -> dict:
    """Longer prompts to slow mode; ties broken by a seeded jitter under one token."""
    out = {}
    for split, seed in (("val", 1), ("test", 2)):
        n = len(prompt_tokens[split])
        out[split] = torch.tensor(prompt_tokens[split]).float() + torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 0.5
    return out


def prompt_hidden(lm: LoadedModel, items: list[Item], prompt: PromptSpec, window: int, batch_size: int = 16) -> torch.Tensor:
    """Per question: every layer's hidden state averaged over the prompt's last ``window`` positions (the positions
    the KV routers read): (n, layers + 1, hidden)."""
    ids = [prompt_ids(item, prompt, lm.tokenizer) for item in items]
    out = []
    for start in tqdm(range(0, len(ids), batch_size), desc="prompt hidden states", unit="batch"):
        batch, mask = left_pad(ids[start : start + batch_size], lm.tokenizer.pad_token_id)
        with torch.inference_mode():
            hs = lm.model(input_ids=batch.to(lm.input_device), attention_mask=mask.to(lm.input_device),
                          position_ids=(mask.cumsum(1) - 1).clamp_min(0).to(lm.input_device), output_hidden_states=True).hidden_states
        out.append(torch.stack([h[:, -window:].float().mean(1).cpu() for h in hs], 1))
    return torch.cat(out)


def random_share(outcomes: Outcomes, *, token_ratio: float | None = None, max_loss: float | None = None) -> float:
    """The share of questions a random router sends to slow mode to spend ``token_ratio`` x always-slow's tokens, or
    to come within ``max_loss`` of always-slow's accuracy, on these (validation) questions."""
    fast_t, slow_t = float(outcomes.fast_tokens.mean()), float(outcomes.slow_tokens.mean())
    fast_a, slow_a = float(outcomes.fast_correct.mean()), float(outcomes.slow_correct.mean())
    if token_ratio is not None:
        share = (token_ratio * slow_t - fast_t) / (slow_t - fast_t) if slow_t > fast_t else 1.0
    else:
        share = 1 - max_loss / (slow_a - fast_a) if slow_a > fast_a else 0.0
    return min(1.0, max(0.0, share))


def random_outcome(outcomes: Outcomes, share: float) -> dict[str, torch.Tensor]:
    """Per question, the expected outcome of sending a random ``share`` to slow mode (``kvprobe.cascade.outcome``'s
    form, with expectations in place of 0/1)."""
    mix = lambda fast, slow: (1 - share) * fast + share * slow
    return {"correct": mix(outcomes.fast_correct, outcomes.slow_correct), "tokens": mix(outcomes.fast_tokens, outcomes.slow_tokens),
            "slow": torch.full((len(outcomes),), share), "escalated": torch.zeros(len(outcomes))}
