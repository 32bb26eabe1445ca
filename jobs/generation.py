"""Sampling text from a language model, for ``coordinator sample``."""

from __future__ import annotations

from collections.abc import Callable

import torch


def continue_ids(
    model: torch.nn.Module,
    ids: list[int],
    tokens: int,
    context: int,
    *,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
    stop: Callable[[int], bool] | None = None,
) -> list[int]:
    """``tokens`` more ids after ``ids``: top-k sampling at ``temperature`` (0: greedy), seeded.

    The model sees at most its last ``context`` ids. Sampling stops early at an
    id for which ``stop`` is true (an end-of-text token), which is not returned.
    """
    if not ids:
        raise ValueError("the prompt must give at least one token")
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[int] = []
    try:
        with torch.no_grad():
            for _ in range(tokens):
                window = torch.tensor([(ids + out)[-context:]], device=device)
                logits = model(window)[0, -1].float().cpu()
                if temperature <= 0:
                    chosen = int(logits.argmax())
                else:
                    values, positions = logits.topk(min(top_k, logits.numel()))
                    weights = torch.softmax(values / temperature, dim=0)
                    chosen = int(positions[torch.multinomial(weights, 1, generator=generator)])
                if stop is not None and stop(chosen):
                    break
                out.append(chosen)
    finally:
        model.train(was_training)
    return out
