"""The ensemble's model: a weighted mixture of distributions, weights fixed or by posterior."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jobs.mixture import Mixture

VOCAB = 5


def _bigram(seed: int) -> nn.Module:
    """A next-token model: each id's logits for the id after it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Embedding(VOCAB, VOCAB)


def _counter() -> nn.Module:
    """A model sure that id i is followed by i + 1 (mod VOCAB)."""
    model = nn.Embedding(VOCAB, VOCAB)
    with torch.no_grad():
        model.weight.fill_(-10.0)
        for i in range(VOCAB):
            model.weight[i, (i + 1) % VOCAB] = 10.0
    return model


def test_fixed_weights_give_the_log_of_the_weighted_mean_of_the_members_distributions():
    members = [_bigram(1), _bigram(2)]
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = Mixture(members, [3.0, 1.0])(ids)
        expected = (0.75 * F.softmax(members[0](ids), -1) + 0.25 * F.softmax(members[1](ids), -1)).log()
    torch.testing.assert_close(mixed, expected)
    # the logits of the job's own cross entropy: log-probabilities that need no normalising
    torch.testing.assert_close(mixed.logsumexp(-1), torch.zeros(3, 7), atol=1e-6, rtol=0)


def test_a_uniform_mixture_has_at_most_the_mean_log_loss_of_its_members():
    members = [_bigram(3), _bigram(4), _bigram(5)]
    ids = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:]

    def loss(model: nn.Module) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1)))

    mean = sum(loss(m) for m in members) / len(members)
    assert loss(Mixture(members, [1, 1, 1])) < mean


def test_posterior_weights_are_bayes_rule_over_the_tokens_seen_so_far():
    members, prior = [_bigram(6), _bigram(7)], [0.5, 0.5]
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mixed = Mixture(members, prior, posterior=True)(ids)
        probs = [F.softmax(m(ids), -1) for m in members]
    for b in range(2):
        for t in range(6):
            seen = [math.prod(float(p[b, s, ids[b, s + 1]]) for s in range(t)) for p in probs]
            joint = [w * like for w, like in zip(prior, seen, strict=True)]
            weights = [j / sum(joint) for j in joint]
            expected = sum(w * p[b, t] for w, p in zip(weights, probs, strict=True))
            torch.testing.assert_close(mixed[b, t].exp(), expected, rtol=1e-5, atol=1e-7)


def test_the_posterior_turns_to_the_member_that_predicts_the_context():
    ids = torch.arange(12).remainder(VOCAB).unsqueeze(0)  # 0 1 2 3 4 0 1 ...: the counter's text
    x, y = ids[:, :-1], ids[:, 1:]
    members = [_counter(), _bigram(8)]
    with torch.no_grad():
        uniform = F.cross_entropy(Mixture(members, [1, 1])(x)[0], y[0])
        posterior = F.cross_entropy(Mixture(members, [1, 1], posterior=True)(x)[0], y[0])
    assert posterior < uniform
    assert posterior < math.log(2) / 4  # after a token or two the mixture is the counter's


@pytest.mark.parametrize("weights", [[1.0], [1.0, -1.0], [0.0, 0.0], [1.0, math.nan]])
def test_a_mixture_refuses_one_member_and_weights_that_are_no_distribution(weights):
    with pytest.raises(ValueError):
        Mixture([_bigram(0) for _ in weights], weights)
