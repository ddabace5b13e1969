"""Privacy accounting that survives rounds and restarts, and noise calibration.

A client's epsilon covers every DP-SGD step it has ever taken (privacy composes
over all its rounds): the ledger keeps Opacus' accountant history
``[(sigma, q, steps), ...]`` and is serialised into Flower's ``context.state`` and
a state file between rounds, never rebuilt from scratch (a fresh accountant each
round would under-report epsilon).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from fedlora.dp.settings import check_accountant, check_delta, check_sample_rate

# (noise_multiplier, sample_rate, steps), the entry format of Opacus' accountants.
HistoryEntry = tuple[float, float, int]
_FORMAT_VERSION = 1


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
) -> float:
    """Smallest sigma (to Opacus' tolerance) with epsilon <= target after ``steps``.

    Call it once for the whole planned run: ``steps`` is every local step the client
    is expected to take (rounds x local steps x expected participation).

    Parameters
    ----------
    target_epsilon : float
        Budget for the whole run.
    delta : float
        Target delta.
    sample_rate : float
        Poisson rate q of every step.
    steps : int
        Number of steps the budget must cover.
    accountant : str
        ``"rdp"`` or ``"prv"``.

    Returns
    -------
    float
        sigma with ``target - 0.01 <= epsilon(sigma) <= target``.
    """
    from opacus.accountants.utils import get_noise_multiplier

    check_accountant(accountant)
    check_delta(delta)
    check_sample_rate(sample_rate)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon={target_epsilon!r} must be > 0")
    if steps < 1:
        raise ValueError(f"steps={steps!r} must be >= 1")
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


def _epsilon(history: list[HistoryEntry], accountant: str, delta: float) -> float:
    """Epsilon of ``history`` (0 when empty, inf when a step had no noise)."""
    if not history:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in history):
        return math.inf  # a noiseless step releases an exact gradient
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def _merge(history: list[HistoryEntry], sigma: float, q: float, n: int) -> None:
    """Append ``n`` steps, merging with the last entry as Opacus does."""
    if history and history[-1][:2] == (sigma, q):
        last = history.pop()
        history.append((sigma, q, last[2] + n))
    else:
        history.append((sigma, q, n))


class PrivacyLedger:
    """One client's cumulative privacy spend; never reset between rounds.

    Parameters
    ----------
    accountant : str
        ``"rdp"`` or ``"prv"``.
    delta : float
        Delta at which :meth:`epsilon` is reported.
    history : list[tuple[float, float, int]] or None (default: None)
        Steps taken so far as ``(sigma, q, steps)``; None for a new client.
    """

    def __init__(
        self,
        accountant: str,
        delta: float,
        history: list[HistoryEntry] | None = None,
    ) -> None:
        check_accountant(accountant)
        check_delta(delta)
        self.accountant = accountant
        self.delta = delta
        self._history: list[HistoryEntry] = []
        # (history it was computed for, epsilon): PRV takes ~0.1 s per call.
        self._cache: tuple[tuple[HistoryEntry, ...], float] | None = None
        for sigma, q, n in history or []:
            self.step(sigma, q, n)

    @property
    def history(self) -> list[HistoryEntry]:
        """A copy of the ``(sigma, q, steps)`` entries."""
        return list(self._history)

    @property
    def steps(self) -> int:
        """DP-SGD steps recorded so far (empty Poisson batches included)."""
        return sum(n for _, _, n in self._history)

    def step(self, noise_multiplier: float, sample_rate: float, n: int = 1) -> None:
        """Record ``n`` Poisson-subsampled Gaussian steps at (sigma, q)."""
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier={noise_multiplier!r} must be >= 0")
        check_sample_rate(sample_rate)
        if n < 1:
            raise ValueError(f"n={n!r} must be >= 1")
        _merge(self._history, float(noise_multiplier), float(sample_rate), int(n))

    def epsilon(self) -> float:
        """Epsilon spent so far at ``self.delta`` (0.0 before the first step)."""
        key = tuple(self._history)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, _epsilon(self._history, self.accountant, self.delta))
        return self._cache[1]

    def epsilon_after(
        self, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """Epsilon after ``steps`` more steps at (sigma, q); the ledger is unchanged.

        Use it as the budget check before a round.
        """
        future = self.history
        if steps > 0:
            check_sample_rate(sample_rate)
            _merge(future, float(noise_multiplier), float(sample_rate), int(steps))
        return _epsilon(future, self.accountant, self.delta)

    def to_json(self) -> str:
        """Serialise accountant, delta and history (floats round-trip exactly)."""
        return json.dumps(
            {
                "version": _FORMAT_VERSION,
                "accountant": self.accountant,
                "delta": self.delta,
                "history": [list(entry) for entry in self._history],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """Rebuild a ledger written by :meth:`to_json`."""
        data = json.loads(text)
        if data.get("version") != _FORMAT_VERSION:
            raise ValueError(
                f"privacy ledger format version {data.get('version')!r} is not "
                f"{_FORMAT_VERSION}; refusing to guess the spent budget"
            )
        history = [(float(s), float(q), int(n)) for s, q, n in data["history"]]
        return cls(data["accountant"], float(data["delta"]), history)

    def save(self, path: Path) -> None:
        """Write :meth:`to_json` to ``path`` atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(self.to_json())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        """Read a ledger written by :meth:`save`."""
        return cls.from_json(Path(path).read_text())

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger(accountant={self.accountant!r}, delta={self.delta!r}, "
            f"steps={self.steps})"
        )
