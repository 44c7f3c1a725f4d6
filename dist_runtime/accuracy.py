"""How far an engine (a quantized one, say) strays from a reference engine built from the same
checkpoint: both see the same random prompts; the reference's greedy continuation fixes the
positions, and at each one both engines' next-token logits are compared (teacher forcing), as
are their own greedy continuations."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from dist_runtime.engine import Engine
from dist_runtime.errors import RequestError
from dist_runtime.llm import LLM
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.tokenizer import Tokenizer


def _windows(ids: list[int], count: int, length: int) -> list[list[int]]:
    if len(ids) < length:
        raise RequestError(f"the text holds {len(ids)} tokens; a prompt takes {length}", "text")
    return [ids[i * (len(ids) - length) // max(1, count - 1):][:length] for i in range(count)]


def _next_token_logits(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    return torch.stack([o.outputs[0].logits[0].float().cpu() for o in llm.generate(prompts, params,
                                                                                    return_logits=True)])


def _run(engine: str, prompts: list[list[int]], steps: int, fixed: list[list[int]] | None, **options):
    """(greedy continuations, logits at every position of `fixed` or of its own continuations)."""
    with LLM(engine, **options) as llm:
        greedy = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True))
        tokens = [o.outputs[0].token_ids for o in greedy]
        positions = [p + t[:k] for p, t in zip(prompts, fixed or tokens) for k in range(steps)]
        return tokens, _next_token_logits(llm, positions)


def compare(reference: str, candidate: str, prompts: int = 8, steps: int = 125, prompt_len: int = 16,
            seed: int = 0, text: str | None = None, **options) -> dict:
    """Logit cosine similarity and top-1 agreement over prompts x steps positions, and how many
    greedy tokens the two engines share before they first differ. The prompts are random token
    ids, or with `text` (a file) windows of it spread evenly, read by the reference's tokenizer:
    a trained model continues text as it was trained to, where random ids show its noise.
    `options` go to LLM."""
    if text is None:
        rng = random.Random(seed)
        vocab = Engine.load(reference).config.vocab_size
        ids = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(prompts)]
    else:
        ids = _windows(Tokenizer(reference).encode(Path(text).read_text()), prompts, prompt_len)
    ref_tokens, ref_logits = _run(reference, ids, steps, None, **options)
    cand_tokens, cand_logits = _run(candidate, ids, steps, ref_tokens, **options)
    cosine = torch.nn.functional.cosine_similarity(ref_logits, cand_logits, dim=-1)
    agree = [next((i for i, (a, b) in enumerate(zip(r, c)) if a != b), len(r)) for r, c in zip(ref_tokens, cand_tokens)]
    return {"reference": str(reference), "candidate": str(candidate), "prompts": "random ids" if text is None else text,
            "positions": len(cosine),
            "logit_cosine_mean": cosine.mean().item(), "logit_cosine_min": cosine.min().item(),
            "top1_agreement": (ref_logits.argmax(-1) == cand_logits.argmax(-1)).float().mean().item(),
            "greedy_agreement_mean": sum(agree) / len(agree), "greedy_agreement_min": min(agree),
            "greedy_steps": steps}

