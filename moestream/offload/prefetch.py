"""Prefetcher: guess the experts of the next MoE layers while the current one computes.

Speculative gating: the hidden state entering layer l's MoE is already close to what layer l+d's
router will see (the residual stream changes a little per layer), so applying the routers of layers
l+1 .. l+k to it predicts their choices. The guesses become prefetches; how good they were is
recorded per lookahead distance (recall: share of the experts actually used that were predicted;
precision: share of the predictions that were used).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..model.llama4 import route


class Prefetcher:
    def __init__(self, moe_layers: list[int], routers: dict[int, torch.Tensor], top_k: int, lookahead: int):
        """routers: the MoE layers whose experts can be prefetched (not --cpu-moe ones), by layer."""
        self.routers, self.top_k, self.lookahead = routers, top_k, lookahead
        targets = [layer for layer in moe_layers if layer in routers]
        self.next_layers = {layer: [t for t in targets if t > layer][:lookahead] for layer in moe_layers}
        self.guesses: dict[int, list[tuple[int, set[int]]]] = defaultdict(list)  # target -> [(distance, guess)] not yet scored
        self.next_guess: dict[int, set[int]] = {}  # target -> the distance-1 guess waiting for it (read by the routing trace)
        self.predicted = defaultdict(int)  # distance -> experts predicted
        self.used = defaultdict(int)  # distance -> experts actually used (at layers that had a guess)
        self.correct = defaultdict(int)  # distance -> predicted and used

    def predict(self, layer: int, h: torch.Tensor) -> list[tuple[int, int, list[int]]]:
        """[(target layer, distance, experts)] for a single-token step's MoE input h [1, D]."""
        out = []
        for distance, target in enumerate(self.next_layers[layer], start=1):
            experts, _, _ = route(h, self.routers[target], self.top_k)
            guess = experts.flatten().tolist()
            self.guesses[target].append((distance, set(guess)))
            if distance == 1:
                self.next_guess[target] = self.guesses[target][-1][1]
            out.append((target, distance, guess))
        return out

    def score(self, layer: int, actual: list[int]) -> None:
        """Compare the guesses made for `layer` with what its router chose."""
        used = set(actual)
        self.next_guess.pop(layer, None)
        for distance, guess in self.guesses.pop(layer, []):
            self.predicted[distance] += len(guess)
            self.used[distance] += len(used)
            self.correct[distance] += len(guess & used)

    def recall(self, distance: int) -> float:
        return self.correct[distance] / self.used[distance] if self.used[distance] else 0.0

    def precision(self, distance: int) -> float:
        return self.correct[distance] / self.predicted[distance] if self.predicted[distance] else 0.0

    def snapshot(self) -> dict[int, dict[str, float]]:
        return {d: {"recall": self.recall(d), "precision": self.precision(d)} for d in range(1, self.lookahead + 1)}
