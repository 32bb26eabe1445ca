"""A round's accepted uploads made into the next version: judging, strategies, DP, the aggregator."""
