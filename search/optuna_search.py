"""The Tune searcher: Optuna chooses the trials, the ledger remembers them (search.book).

A Tune `Searcher` on Tune's public interface. A new sweep asks Optuna (TPE) for each trial. A
resumed sweep is a fresh Tuner whose searcher first re-issues what the ledger says is not done
(study trials a killed driver asked but never recorded, then the unfinished trials, continued
from their checkpoints) and only then asks Optuna for new ones, until the ledger holds
num_samples trials. Nothing of an earlier driver is unpickled: the searcher keeps no state of
its own (`save` writes nothing), the ledger and the study are the state.

Fused (`fuse` > 1): each Tune trial is a group, `{"members": [K member configs], trial_key}`,
that trainables.tune trains as one fused model. Every member is asked, recorded and re-issued
exactly as an unfused trial is (its own Optuna trial and ledger entry, key `<group>-<i>`); a
member that cannot share a fused model with the group's first (another shape: model, batch
sizes, phase plan) waits for the next group; one that cannot be fused at all (a method the
fused path does not train, `la`) is a plain trial.
"""

from __future__ import annotations

import optuna
from ray.tune.search import Searcher

from search.book import KEY, MEMBERS, SweepBook
from trainables.fused.members import fusable

# TPE's own default is 10 random trials before it models anything: a default 8-trial sweep would
# be pure random search. A third of the budget (at least 2, at most 10) explores at random.
MAX_STARTUP_TRIALS = 10


class LedgerSearch(Searcher):
    def __init__(self, book: SweepBook, num_samples: int, metric: str, mode: str,
                 fuse: int = 1) -> None:
        super().__init__(metric=metric, mode=mode)
        self.book = book
        self.num_samples = num_samples
        self.fuse = fuse
        self._reissue = book.to_reissue()
        self._waiting: list[dict] = []  # members asked for a group they could not join

    def trials_left(self) -> int:
        """Trials (members, when fused) this searcher will still hand out."""
        return (len(self._waiting) + len(self._reissue)
                + max(0, self.num_samples - self.book.asked()))

    def suggest(self, trial_id: str) -> dict | None:
        if self.fuse == 1:
            return self._next(trial_id) or Searcher.FINISHED
        members: list[dict] = []
        while len(members) < self.fuse:
            member = self._next(f"{trial_id}-{len(members)}")
            if member is None:
                break
            if not members and not fusable(member["trial"], member["trial"]):
                return member  # e.g. logit adjustment: trained unfused, alone
            if members and not fusable(members[0]["trial"], member["trial"]):
                self._waiting.append(member)  # the next group starts with it
                break
            members.append(member)
        return {MEMBERS: members, KEY: trial_id} if members else Searcher.FINISHED

    def _next(self, key: str) -> dict | None:
        """The next trial's config: one waiting for a group, re-issued, or new; None: done."""
        if self._waiting:
            return self._waiting.pop(0)
        if self._reissue:
            return self.book.reissue(key, self._reissue.pop(0))
        if self.book.asked() >= self.num_samples:
            return None
        return self.book.ask(key)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        """Ends are recorded by search.callbacks.LedgerCallback (it sees the error text)."""

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the ledger and the study are the searcher's state."""

    def restore(self, checkpoint_path: str) -> None:
        raise RuntimeError("a tailtune sweep resumes from its ledger, never from a Tune "
                           "searcher checkpoint")

    def __getstate__(self) -> dict:
        return {}  # see SweepBook.__getstate__


def tpe_sampler(seed: int, num_samples: int) -> optuna.samplers.TPESampler:
    """Seeded TPE that starts modelling after a third of the sweep's trials."""
    startup = max(2, min(MAX_STARTUP_TRIALS, num_samples // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
