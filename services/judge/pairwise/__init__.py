"""Pairwise LLM judging (the run config's judge.pairwise section): each candidate prediction
against the same prompt's baseline response (an earlier epoch of the run, or another run of
the same user), asked in both orders so that position bias cancels. Modules: config (the
section and its checks), models (tables), prompts, providers (the calls), store (queue and
results), worker (the judging), cost (EstimateCost figures)."""
