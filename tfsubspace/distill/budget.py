"""Aiming LASSO at a budget: the channels a budget plan would remove become the only ones the
proximal step shrinks, re-planned as training goes, so that pruning to the budget removes
exact zeros only."""

from __future__ import annotations

import keras
import numpy as np

from tfsubspace.distill.lasso import ChannelLasso


class BudgetTargets(keras.callbacks.Callback):
    """Aims a ChannelLasso at a budget: every `every` steps, marks the channels that
    `choose(norms)` (a function from the current channel norms to keep-masks, e.g. the plan
    that meets a parameter budget) would remove, and restricts the proximal step to them
    (stage-wise, to those of the groups whose taps `groups_of_taps` lists as trained so far).
    LASSO then drives exactly those channels to zero while the rest of the network learns
    to do without them, so pruning to the budget afterwards removes zeros only."""

    def __init__(self, lasso: ChannelLasso, choose, every: int = 50, groups_of_taps: dict[str, str] | None = None):
        super().__init__()
        self.lasso, self.choose, self.every = lasso, choose, every
        self.groups_of_taps = groups_of_taps  # tap -> group, to follow a stage-wise schedule

    def _update(self):
        keep = self.choose(self.lasso.norms())
        targets = {g: ~np.asarray(m, bool) for g, m in keep.items()}
        if self.groups_of_taps is not None and self.model.stages is not None:
            # stage-wise: a layer whose latent is not trained yet gets no gradient to make up
            # for what LASSO takes, so only the groups of the taps trained so far shrink
            trained = {self.groups_of_taps[t] for t in self.model.trained_taps() if t in self.groups_of_taps}
            targets = {g: m if g in trained else np.zeros_like(m) for g, m in targets.items()}
        self.lasso.set_targets(targets)

    def on_epoch_begin(self, epoch, logs=None):
        if self.model.stages is not None:
            self._update()  # the stage may have changed

    def on_train_begin(self, logs=None):
        # steps count from the optimizer's, and the targets are saved with the trainer's
        # weights: a resumed run continues the same schedule from the same targets
        if self._step() == 0:
            self._update()

    def on_train_batch_end(self, batch, logs=None):
        if self._step() % self.every == 0:
            self._update()

    def _step(self) -> int:
        # convert_to_numpy also reads a distributed (mirrored) counter, which int() cannot
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
