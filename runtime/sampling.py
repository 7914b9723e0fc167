"""Choosing each row's next token from its logits, with the reference servers' semantics.

- Logit processors, in this order: ``logit_bias`` (OpenAI: added to the logits), ``min_tokens`` (vLLM:
  end-of-sequence and stop ids banned until that many tokens), ``repetition_penalty`` (HF's
  ``RepetitionPenaltyLogitsProcessor`` over prompt + output, as HF, vLLM and TGI), presence and
  frequency penalties (OpenAI/vLLM: over output tokens only, ``logit -= frequency*count +
  presence*(count>0)``; TGI's ``frequency_penalty`` is TGI's own formula over prompt + output).
- Warpers, when the row samples: HF's own ``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
  ``TopPLogitsWarper``, ``MinPLogitsWarper``, ``TypicalLogitsWarper``, in HF's order.
- Log-probabilities: ``raw`` (vLLM's default: log-softmax of the model's logits) or ``processed``
  (TGI: log-softmax of the scores after processors and warpers).

Rows that ask for nothing of this (greedy, no penalty, bias or logprobs) cost one ``argmax``."""

from __future__ import annotations

import torch


def _processors(s, row: torch.Tensor) -> torch.Tensor:
    if s.logit_bias:
        ids = torch.tensor(list(s.logit_bias.keys()), device=row.device)
        row[ids] += torch.tensor(list(s.logit_bias.values()), dtype=row.dtype, device=row.device)
    if s.min_tokens and len(s.generated) < s.min_tokens and s.banned_until_min:
        row[torch.tensor(sorted(s.banned_until_min), device=row.device)] = -float("inf")
    if s.repetition_penalty != 1.0:
        from transformers import RepetitionPenaltyLogitsProcessor

        ids = torch.tensor([s.prompt + s.generated], device=row.device)
        row = RepetitionPenaltyLogitsProcessor(s.repetition_penalty)(ids, row[None])[0]
    if s.frequency_penalty or s.presence_penalty:
        if s.penalty_style == "tgi":
            # TGI's FrequencyPenaltyLogitsProcessor: each occurrence in prompt + output (pad id 0 excluded)
            # adds -(score / p) for a non-negative score and -(score * p) for a negative one.
            ids = torch.tensor([t for t in s.prompt + s.generated if t != 0], dtype=torch.long, device=row.device)
            if ids.numel():
                score = row[ids]
                p = s.frequency_penalty
                row = row.scatter_add(0, ids, -torch.where(score < 0, score * p, score / p))
        elif s.generated:
            counts = torch.bincount(torch.tensor(s.generated, device=row.device), minlength=row.shape[-1])
            counts = counts[: row.shape[-1]].to(row.dtype)
            row = row - s.frequency_penalty * counts - s.presence_penalty * (counts > 0).to(row.dtype)
    return row


def _warp(s, row: torch.Tensor) -> torch.Tensor:
    from transformers import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
                              TypicalLogitsWarper)

    scores = row[None]
    if s.temperature not in (0.0, 1.0):
        scores = TemperatureLogitsWarper(s.temperature)(None, scores)
    if s.top_k and s.top_k > 0:
        scores = TopKLogitsWarper(s.top_k)(None, scores)
    if s.top_p < 1.0:
        scores = TopPLogitsWarper(s.top_p)(None, scores)
    if s.min_p and s.min_p > 0:
        scores = MinPLogitsWarper(s.min_p)(None, scores)
    if s.typical_p < 1.0:
        scores = TypicalLogitsWarper(s.typical_p)(None, scores)
    return scores[0]


def _plain(s) -> bool:
    return (not s.sample and s.logprobs is None and not s.logit_bias and s.repetition_penalty == 1.0
            and not s.frequency_penalty and not s.presence_penalty and not s.min_tokens)


def _record(s, tok: int, lp: torch.Tensor) -> None:
    s.token_logprobs.append(float(lp[tok]))
    if s.logprobs:
        vals, ids = lp.topk(min(s.logprobs, lp.shape[-1]))
        s.top_logprobs.append(list(zip(ids.tolist(), vals.tolist())))
    else:
        s.top_logprobs.append([])


def choose(logits: torch.Tensor, seqs) -> list[int]:
    """Next token of each row (appended to ``seq.generated``; logprobs recorded where asked)."""
    logits = logits.float()
    greedy = logits.argmax(-1).tolist()
    out = []
    for i, s in enumerate(seqs):
        if _plain(s):
            tok = greedy[i]
        else:
            raw = logits[i]
            row = _processors(s, raw.clone())
            if s.sample:
                row = _warp(s, row)
                probs = torch.softmax(row, -1)
                tok = int(torch.multinomial(probs, 1, generator=s.generator))
            else:
                tok = int(row.argmax())
            if s.logprobs is not None:
                _record(s, tok, torch.log_softmax(raw if s.logprob_mode == "raw" else row, -1))
        s.generated.append(tok)
        out.append(tok)
    return out


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], top: int) -> list[tuple[float, list]]:
    """Raw log-probability of each prompt token after the first, given the ones before it (TGI's
    ``decoder_input_details``), with the ``top`` most likely tokens at each position."""
    lp = torch.log_softmax(logits.float(), -1)
    nxt = torch.tensor(prompt[1:], device=lp.device)
    chosen = lp[torch.arange(len(prompt) - 1, device=lp.device), nxt].tolist()
    tops = []
    if top:
        vals, ids = lp.topk(min(top, lp.shape[-1]), -1)
        tops = [list(zip(a, b)) for a, b in zip(ids.tolist(), vals.tolist())]
    return [(c, tops[j] if tops else []) for j, c in enumerate(chosen)]
