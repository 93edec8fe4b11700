"""LLCD change detector: an adaptive, one-sided 3-sigma rule on a score stream.

The agent feeds one surprise score per live policy step (``llcd_score``, by default
``latent_kl``; see docs/design.md#llcd-score). This rule is the ``threshold`` detector;
the default is ``CusumDetector`` below (docs/design.md#llcd-detector).
A change of the environment's dynamics shows up as a sustained rise of that
score; the detector raises a change exactly once per such rise.

Rule
----
* A sliding window of the last ``history_window`` *normal* scores is the
  baseline. Until ``burn_in`` normal scores have been collected the detector is
  not ready: every finite score is normal and nothing can alarm.
* Once ready, a score is *alarming* when it exceeds
  ``mean + sigma * max(std, std_floor)`` of the window (one-sided: a drop in
  surprise is never a change). Alarming scores never enter the window, so a
  change does not contaminate the baseline it is measured against.
* A change is declared when ``patience`` consecutive finite scores are
  alarming. A normal score resets the streak; a non-finite score is ignored
  (counted in ``nonfinite``, neither added nor breaking the streak). If the
  score is smoothed before it gets here, keep ``patience`` above the smoothing
  length: one smoothed spike crosses the threshold for that many steps.
* On a declaration the window is cleared (re-baseline, so burn-in starts
  again on the new level) and no further change can be declared during the
  next ``cooldown`` calls of ``update``. A streak that is still running when the
  cooldown ends is declared on the first call after it, so a change that
  happens inside the cooldown is delayed, not lost.

Cost and numerics
-----------------
``update`` is O(1): the window is a ``RunningWindow`` (the phase normaliser's
too) whose mean and variance come from running sums of ``x - shift``. Raw sums
of x and x**2 cancel catastrophically when the mean is large compared with the spread (an
NLL of ~1e3 with a std of ~1), and add/subtract round-off accumulates over a
long stream. Both are handled by shifted sums with a periodic exact refresh:
``shift`` is the first value after a re-baseline, and after every
``history_window`` evictions the sums are recomputed from the buffer with
``shift`` re-centred on the window mean. The refresh is O(history_window) once
every ``history_window`` steps, i.e. amortised O(1), and it bounds both the
accumulated round-off and the distance of the data from the shift.

``state_dict`` / ``load_state_dict`` carry the window and the running sums
verbatim, so a resumed detector is bit-for-bit identical to one that never
stopped.
"""

import collections
import math

import numpy as np

__all__ = ["ChangeDetector", "CusumDetector", "PhaseNormalizer", "FusedCusum", "AdaptationGate", "ScoreFilter",
           "CandidateScore", "PHASE", "fused_cusum", "DETECTORS", "from_config", "detection_report",
           "chance_hit_rate", "resolve_max_delay"]


class ChangeDetector:
    """Adaptive one-sided sigma rule with patience, re-baseline and cooldown.

    Defaults (scores are NLLs in nats, one per agent step):

    * ``history_window=500``: the original design's window
      (docs/design.md#llcd-detector); long enough that the baseline
      std is estimated to a few percent, short enough that the baseline follows
      a slow drift of the score while the world model keeps learning (a drift
      of 1e-3 std per step lags the window mean by only ~0.25 std; drifts up
      to ~0.03 std per step were measured to be absorbed without alarms).
    * ``sigma=3.0``: the original design's 3-sigma rule.
    * ``patience=8``: measured per-step rates of threshold crossings on
      i.i.d. noise at these defaults are ~0.0017 (Gaussian), ~0.012
      (Student-t, 3 dof) and up to ~0.11 for strongly right-skewed scores
      (chi-square, 1 dof, whose truncated baseline understates the right
      tail). Eight independent crossings in a row then have probability
      0.012**8 = 4e-16 (t3) and 0.11**8 = 2e-8 (chi-square) per step, i.e. at
      most ~2e-3 false alarms per 1e5 steps even for the skewed stream. A
      single spike spread by a short smoothing of the score (<= 5 steps)
      produced crossing runs of at most 7 steps, so it cannot trigger either.
      The price is delay and resolution: a shift of >= 6 std is declared
      exactly ``patience`` steps after it, a 4-std shift after a median of
      ~13 steps, and shifts below ~3 std are usually absorbed into the
      baseline rather than declared.
    * ``burn_in=100``: the std of 100 Gaussian scores is within ~7% of the
      truth (one standard error), which moves a 3-sigma threshold by ~0.2 std;
      the window keeps filling to ``history_window`` after that.
    * ``std_floor=0.1``: an alarming step carries at least ``sigma * 0.1 = 0.3``
      nats of excess surprise, so a world model that predicts an easy task
      almost perfectly (std -> 0) does not alarm on trivial fluctuations.
    * ``cooldown=1000``: one to two episodes. Task switches in the CRL
      schedule are tens of thousands of steps apart, so this lockout costs no
      recall, but it keeps the transient surprise of a re-adapting world model
      from producing a second detection for the same switch.
    """

    def __init__(self, history_window=500, sigma=3.0, patience=8, burn_in=100,
                 std_floor=0.1, cooldown=1000):
        _check_int("history_window", history_window, 2)
        _check_positive_float("sigma", sigma)
        _check_int("patience", patience, 1)
        _check_int("burn_in", burn_in, 2)
        if burn_in > history_window:
            raise ValueError(f"burn_in ({burn_in}) must not exceed history_window ({history_window})")
        _check_nonnegative_float("std_floor", std_floor)
        _check_int("cooldown", cooldown, 0)
        self._window = int(history_window)
        self._sigma = float(sigma)
        self._patience = int(patience)
        self._burn_in = int(burn_in)
        self._std_floor = float(std_floor)
        self._cooldown = int(cooldown)
        self._baseline = RunningWindow(self._window)
        self._steps = 0
        self._nonfinite = 0
        self._streak = 0
        self._cooldown_end = -1
        self._detections = []

    # ------------------------------------------------------------------ API

    def update(self, score):
        """Feed one score; return True exactly when this call declares a change."""
        step = self._steps
        self._steps += 1
        x = float(score)
        if not math.isfinite(x):
            self._nonfinite += 1
            return False
        if x <= self.threshold:
            self._baseline.push(x)
            self._streak = 0
            return False
        self._streak += 1
        if self._streak < self._patience or step <= self._cooldown_end:
            return False
        self._declare(step)
        return True

    @property
    def threshold(self):
        """Current alarm threshold; +inf while the baseline is in burn-in."""
        if not self.ready:
            return math.inf
        return self.mean + self._sigma * max(self.std, self._std_floor)

    @property
    def mean(self):
        """Mean of the baseline window (nan when empty)."""
        return self._baseline.mean()

    @property
    def std(self):
        """Sample std (ddof=1) of the baseline window (nan below two scores)."""
        return self._baseline.std(ddof=1)

    @property
    def ready(self):
        """True once ``burn_in`` normal scores are in the baseline window."""
        return len(self._baseline.values) >= self._burn_in

    @property
    def in_cooldown(self):
        """True when the next ``update`` call cannot declare a change."""
        return self._steps <= self._cooldown_end

    @property
    def steps(self):
        """Number of ``update`` calls so far (finite or not)."""
        return self._steps

    @property
    def nonfinite(self):
        """Number of non-finite scores that were ignored."""
        return self._nonfinite

    @property
    def window_size(self):
        """Number of scores currently in the baseline window."""
        return len(self._baseline.values)

    @property
    def detections(self):
        """0-based ``update`` call indices at which changes were declared."""
        return list(self._detections)

    def state_dict(self):
        """Plain Python/NumPy snapshot from which ``load_state_dict`` resumes exactly. The window is
        written as a ring buffer (oldest first, next write at ``head``), the format of earlier versions."""
        window = self._baseline
        buffer = np.zeros(self._window, dtype=np.float64)
        buffer[:len(window.values)] = window.values
        return {
            "config": self._config(),
            "buffer": buffer,
            "head": len(window.values) % self._window,
            "count": len(window.values),
            "shift": window.shift,
            "sum": window.sum,
            "sumsq": window.sumsq,
            "evictions": window.evictions,
            "steps": self._steps,
            "nonfinite": self._nonfinite,
            "streak": self._streak,
            "cooldown_end": self._cooldown_end,
            "detections": list(self._detections),
        }

    def load_state_dict(self, d):
        """Restore a snapshot taken by ``state_dict`` of an identically configured detector."""
        if dict(d["config"]) != self._config():
            raise ValueError(f"state_dict config {dict(d['config'])} does not match detector config {self._config()}")
        buf = np.asarray(d["buffer"], dtype=np.float64)
        if buf.shape != (self._window,):
            raise ValueError(f"state_dict buffer has shape {buf.shape}, expected {(self._window,)}")
        count, head = int(d["count"]), int(d["head"])
        window = self._baseline
        window.values.clear()
        window.values.extend((buf[:count] if count < self._window else np.roll(buf, -head)).tolist())  # oldest first
        window.shift, window.sum, window.sumsq = float(d["shift"]), float(d["sum"]), float(d["sumsq"])
        window.evictions = int(d["evictions"])
        self._steps = int(d["steps"])
        self._nonfinite = int(d["nonfinite"])
        self._streak = int(d["streak"])
        self._cooldown_end = int(d["cooldown_end"])
        self._detections = [int(s) for s in d["detections"]]

    # ------------------------------------------------------------- internals

    def _config(self):
        return {
            "history_window": self._window,
            "sigma": self._sigma,
            "patience": self._patience,
            "burn_in": self._burn_in,
            "std_floor": self._std_floor,
            "cooldown": self._cooldown,
        }

    def _declare(self, step):
        self._detections.append(step)
        self._cooldown_end = step + self._cooldown
        self._streak = 0
        self._baseline.clear()


class CusumDetector:
    """One-sided CUSUM for small persistent rises of an autocorrelated score.

    Baseline: the mean m and long-run std s of the finite scores since the last declaration,
    leaving out the newest ``lag`` (at most ``window`` of them, refreshed every
    ``REFRESH`` calls). The lag is the detection deadline (``llcd_max_delay``): a change is
    either declared within it or missed, so the scores it raised never enter the baseline it
    is measured against, while the baseline still follows a world model that keeps learning
    (its surprise keeps falling). s is the long-run std of an AR(1) stream,
    std * sqrt((1 + phi) / (1 - phi)) with phi the lag-1 autocorrelation, so that sums of
    z = (x - m) / s grow like a unit-variance random walk when nothing changed.

    S = max(0, S + min(z, Z_CLIP) - drift); a change is declared when S > h. The clip makes
    one spike add at most Z_CLIP - drift: surprise streams are heavy-tailed, a persistent
    rise is not a single spike. h is set for ``false_alarms_per_100k`` (per 100K scores; see
    ``from_config`` for agent steps) by Siegmund's
    approximation of the in-control average run length, ARL0 = (exp(2 k b) - 2 k b - 1) /
    (2 k^2) with k = drift, b = h + 1.166 (the clip only lowers the in-control rate).
    ``drift`` is half the smallest shift (in long-run std) it is built to catch quickly.

    Burn-in, at the start and after each declaration: at least ``2 * burn_in`` finite
    scores that have settled (``settled``: the newer half no longer lower than the older),
    or ``10 * burn_in`` at the latest, and then ``lag`` more before it can alarm. A
    declaration also starts ``cooldown`` calls without one. Non-finite scores are skipped.
    """

    REFRESH = 50
    Z_CLIP = 3.0

    def __init__(self, burn_in=200, drift=0.1, false_alarms_per_100k=1.0, cooldown=1000, window=5000, lag=500):
        _check_int("burn_in", burn_in, 4)
        _check_positive_float("drift", drift)
        _check_positive_float("false_alarms_per_100k", false_alarms_per_100k)
        _check_int("cooldown", cooldown, 0)
        _check_int("window", window, 2 * burn_in)
        _check_int("lag", lag, 0)
        self.burn_in, self.drift, self.cooldown = int(burn_in), float(drift), int(cooldown)
        self.window, self.lag = int(window), int(lag)
        self.h = cusum_threshold(self.drift, 100_000 / false_alarms_per_100k)
        self.steps = 0
        self.cooldown_end = -1
        self.rebaseline()

    def rebaseline(self):
        self.history = collections.deque(maxlen=self.window + self.lag)  # finite scores since then
        self.count, self.since_settled = 0, 0  # finite scores since then, and since they settled
        self.settled, self.baseline, self.statistic = False, None, 0.0

    def update(self, score):
        """Feed one score; return True exactly when this call declares a change."""
        step, self.steps = self.steps, self.steps + 1
        x = float(score)
        if not math.isfinite(x):
            return False
        self.history.append(x)
        self.count += 1
        if not self.settled:
            self.settled = self.count >= 10 * self.burn_in or settled(self.history, self.burn_in)
            return False
        self.since_settled += 1
        if self.since_settled <= self.lag:
            return False
        if self.baseline is None or step % self.REFRESH == 0:
            reference = list(self.history)[:len(self.history) - self.lag]
            self.baseline = long_run_stats(np.asarray(reference[-self.window:]))
        mean, scale = self.baseline
        self.statistic = cusum_step(self.statistic, (x - mean) / scale, self.drift)
        if self.statistic <= self.h or step < self.cooldown_end:
            return False
        self.cooldown_end = step + 1 + self.cooldown
        self.rebaseline()
        return True

    @property
    def ready(self):
        return self.baseline is not None

    def state_dict(self):
        return {"steps": self.steps, "cooldown_end": self.cooldown_end, "history": list(self.history),
                "count": self.count, "settled": self.settled, "since_settled": self.since_settled,
                "baseline": self.baseline, "statistic": self.statistic}

    def load_state_dict(self, state):
        self.steps, self.cooldown_end = state["steps"], state["cooldown_end"]
        self.history = collections.deque(state["history"], maxlen=self.window + self.lag)
        self.count, self.settled, self.since_settled = state["count"], state["settled"], state["since_settled"]
        self.baseline, self.statistic = state["baseline"], state["statistic"]


def cusum_step(statistic, z, drift, clip=CusumDetector.Z_CLIP):
    """One step of the clipped one-sided CUSUM recursion: max(0, S + min(z, clip) - drift)."""
    return max(0.0, statistic + min(z, clip) - drift)


def long_run_stats(values):
    """(mean, long-run std) of a stream under an AR(1) model: std * sqrt((1 + phi) / (1 - phi)),
    phi the lag-1 autocorrelation less its small-sample bias, clipped to [0, 0.99]."""
    centred = values - values.mean()
    var = max(float(centred.var()), 1e-12)
    phi = float((centred[1:] * centred[:-1]).mean() / var)
    phi = min(max(phi + (1 + 3 * phi) / len(values), 0.0), 0.99)
    return float(values.mean()), math.sqrt(var * (1 + phi) / (1 - phi))


def settled(history, burn_in):
    """True once the last ``2 * burn_in`` scores have settled: the mean of the newer
    ``burn_in`` is not below that of the older by more than two standard errors (a world
    model that is still learning keeps lowering its surprise)."""
    if len(history) < 2 * burn_in:
        return False
    recent = np.asarray(list(history)[-2 * burn_in:])
    _, scale = long_run_stats(recent)
    return recent[burn_in:].mean() - recent[:burn_in].mean() >= -2 * scale * math.sqrt(2 / burn_in)


def cusum_threshold(drift, arl0):
    """h such that Siegmund's in-control run length of a CUSUM with drift k is ``arl0``."""
    def run_length(h):
        b = 2 * drift * (h + 1.166)
        return (math.exp(b) - b - 1) / (2 * drift ** 2)

    low, high = 0.0, 1.0
    while run_length(high) < arl0:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if run_length(mid) < arl0 else (low, mid)
    return high


class AdaptationGate:
    """When LLCD's context encoder trains (docs/design.md#llcd-gate).

    ``mode``: ``always`` (open on every update), ``never`` (closed: z is inferred by a
    frozen, randomly initialised encoder) or ``detector``: ``trigger()`` (a detected
    change) opens the gate for the next ``updates`` updates, each counted by
    ``consume()``; a trigger while open restarts the count. States: closed ->
    trigger -> open(n = updates) -> consume ... -> open(1) -> consume -> closed.
    """

    MODES = ("detector", "always", "never")

    def __init__(self, mode="detector", updates=500):
        if mode not in self.MODES:
            raise ValueError(f"gate mode must be one of {self.MODES}, got {mode!r}")
        _check_int("updates", updates, 0)
        self.mode, self.updates = mode, int(updates)
        self.remaining = 0

    @property
    def open(self):
        return self.mode == "always" or (self.mode == "detector" and self.remaining > 0)

    def trigger(self):
        if self.mode == "detector":
            self.remaining = self.updates

    def consume(self):
        """Count one update; the gate closes after the last update of its window."""
        self.remaining = max(0, self.remaining - 1)

    def state_dict(self):
        return {"mode": self.mode, "updates": self.updates, "remaining": self.remaining}

    def load_state_dict(self, state):
        self.remaining = int(state["remaining"])


class ScoreFilter:
    """What the detector sees of a score stream: optionally log(max(x, 0) + LOG_FLOOR)
    (surprise scores are positive and heavy-tailed, and a change multiplies them; the floor
    keeps near-zero scores from dominating), then the mean of the last ``smoothing`` finite
    values. A non-finite value is skipped and gives NaN."""

    LOG_FLOOR = 0.01  # nats

    def __init__(self, smoothing, log=False):
        self.values = collections.deque(maxlen=smoothing)
        self.log = log

    def update(self, value):
        if not math.isfinite(value):
            return math.nan
        self.values.append(math.log(max(value, 0.0) + self.LOG_FLOOR) if self.log else value)
        return sum(self.values) / len(self.values)


class PhaseNormalizer:
    """The phase-normalised score: a value at episode phase p becomes (x - m) / max(s, ``std_floor``),
    m and s the mean and std of the last ``window`` values of p's bucket (phases
    [k * ``bucket``, (k+1) * ``bucket``)) that are at least ``lag`` calls old. An episode's phases
    differ in surprise more than most changes move it (contacts, swings, the start); this removes
    that profile. The lag (the detection deadline, as in ``CusumDetector``) keeps a change's own
    values out of the baseline it is measured against. NaN for a non-finite value or phase, and
    while the bucket holds fewer than ``min_count`` values. O(1) per call (``RunningWindow``)."""

    def __init__(self, bucket=25, window=200, lag=500, min_count=20, std_floor=1e-3):
        _check_int("bucket", bucket, 1)
        _check_int("min_count", min_count, 2)
        _check_int("window", window, min_count)
        _check_int("lag", lag, 0)
        self.bucket, self.lag, self.min_count, self.std_floor = int(bucket), int(lag), int(min_count), float(std_floor)
        self.buckets = collections.defaultdict(lambda: RunningWindow(int(window)))
        self.pending = collections.deque()  # (call, bucket, value) younger than lag
        self.calls = 0

    def update(self, value, phase):
        call, self.calls = self.calls, self.calls + 1
        while self.pending and self.pending[0][0] <= call - self.lag:
            _, key, old = self.pending.popleft()
            self.buckets[key].push(old)
        if not (math.isfinite(value) and math.isfinite(phase)):
            return math.nan
        key = int(phase) // self.bucket
        self.pending.append((call, key, float(value)))
        history = self.buckets[key]
        if len(history.values) < self.min_count:
            return math.nan
        return (value - history.mean()) / max(history.std(), self.std_floor)


class RunningWindow:
    """The last ``size`` values with their mean and std from running sums of x - shift, shift the first
    value after a clear (so a large mean does not cancel the spread); every ``size`` evictions the sums
    are recomputed exactly, re-centred on the window mean, which bounds their round-off."""

    def __init__(self, size):
        self.values = collections.deque(maxlen=size)
        self.clear()

    def clear(self):
        self.values.clear()
        self.shift, self.sum, self.sumsq, self.evictions = 0.0, 0.0, 0.0, 0

    def push(self, x):
        if not self.values:
            self.shift = x
        if len(self.values) == self.values.maxlen:
            old = self.values[0] - self.shift
            self.sum, self.sumsq, self.evictions = self.sum - old, self.sumsq - old * old, self.evictions + 1
        self.values.append(x)
        d = x - self.shift
        self.sum, self.sumsq = self.sum + d, self.sumsq + d * d
        if self.evictions >= self.values.maxlen:
            values = np.asarray(self.values)
            self.shift = float(values.mean())
            centred = values - self.shift
            self.sum, self.sumsq, self.evictions = float(centred.sum()), float(centred @ centred), 0

    def mean(self):
        """NaN when empty."""
        return self.shift + self.sum / len(self.values) if self.values else math.nan

    def std(self, ddof=0):
        """NaN with ``ddof`` values or fewer."""
        n = len(self.values)
        return math.sqrt(max((self.sumsq - self.sum * self.sum / n) / (n - ddof), 0.0)) if n > ddof else math.nan


class FusedCusum:
    """Max of CUSUMs over several score streams: one ``CusumDetector`` per stream, each set for
    1/n of the false-alarm budget (so the union keeps it); a change is declared when any of them
    declares, and then every one re-baselines and starts its cooldown."""

    def __init__(self, detectors):
        self.detectors = list(detectors)

    def update(self, scores):
        """Feed one value per stream; True exactly when this call declares a change."""
        fired = [d.update(x) for d, x in zip(self.detectors, scores)]
        if not any(fired):
            return False
        for d, declared in zip(self.detectors, fired):
            if not declared:
                d.cooldown_end = d.steps + d.cooldown
                d.rebaseline()
        return True


def from_config(config, name=None):
    """The detector ``name`` (default ``llcd_detector``) with the run config's LLCD settings:
    the adaptive sigma rule (``threshold``) or ``cusum`` (its baseline lags by
    ``llcd_max_delay``). ``config``: any mapping.

    A detector sees one score per policy call, and a call steps all ``envs`` train envs, so a
    call is ``envs`` agent steps. The settings that scoring measures in agent steps, the false-
    alarm rate (per 100K agent steps) and the baseline lag (``llcd_max_delay``, the detection
    deadline), are turned into calls here; the others count calls."""
    name = name or config["llcd_detector"]
    if name == "cusum":
        envs = config["envs"]
        return CusumDetector(config["llcd_burn_in"], config["llcd_cusum_drift"],
                             config["llcd_false_alarms_per_100k"] * envs, config["llcd_cooldown"],
                             config["llcd_cusum_window"], lag_calls(config))
    return ChangeDetector(config["llcd_history_window"], config["llcd_sigma"], config["llcd_patience"],
                          config["llcd_burn_in"], config["llcd_std_floor"], config["llcd_cooldown"])


def lag_calls(config):
    """The detection deadline (``llcd_max_delay``, agent steps) in policy calls of ``envs`` steps."""
    return math.ceil(resolve_max_delay(config["llcd_max_delay"], config["time_limit"], config["action_repeat"])
                     / config["envs"])


def fused_cusum(config, streams):
    """A ``FusedCusum`` over ``streams`` score streams with the run config's CUSUM settings."""
    share = {**config, "llcd_false_alarms_per_100k": config["llcd_false_alarms_per_100k"] / streams}
    return FusedCusum(from_config(share, "cusum") for _ in range(streams))


PHASE = "@phase"  # a candidate name's suffix: the score phase-normalised


class CandidateScore:
    """What a detector sees of one candidate, ``<score>`` or ``<score>@phase``, per policy call: that
    score through the run's ``ScoreFilter`` (``llcd_smoothing``, ``llcd_log_score``), then, for
    ``@phase``, through a ``PhaseNormalizer`` whose baseline lags by the detection deadline. The live
    agent and the offline replay both use it, so a replayed stream gives the live detector inputs."""

    def __init__(self, config, name):
        self.score = name.removesuffix(PHASE)
        self.filter = ScoreFilter(config["llcd_smoothing"], config["llcd_log_score"])
        self.normalizer = PhaseNormalizer(lag=lag_calls(config)) if name.endswith(PHASE) else None

    def update(self, scores, phase):
        """The detector input of one call from its candidate scores {name: value} and mean episode phase."""
        value = self.filter.update(scores[self.score])
        return self.normalizer.update(value, phase) if self.normalizer else value


DETECTORS = ("threshold", "cusum")


def detection_report(detections, switches, steps, max_delay, unit=100_000):
    """Strict scoring of declared changes against the scheduled switches (docs/design.md#llcd-scoring).

    ``detections``, ``switches`` (start, end) of every window that begins with a task switch,
    ``steps`` (how far the run got) and ``max_delay`` are in agent steps. A switch is detected
    only by a detection in [start, start + max_delay] (and before ``end``); its delay is that
    of the first one. Every other detection is a false alarm. A switch whose deadline lies
    beyond ``steps`` without a detection is pending: neither a hit nor a miss.
    ``chance_hit_rate`` is the hit rate the same detections get against fake switches: every
    real switch shifted by multiples of ``max_delay``, kept where its interval lies inside
    [0, steps] and overlaps no real one, i.e. what a detector blind to the switches scores.
    Returns {"delays" (NaN: missed or pending), "outcomes" ('hit', 'miss' or 'pending' per switch),
    "hits", "misses", "hit_rate",
    "median_delay", "false_alarms", "false_alarms_per_unit", "chance_hit_rate"}.
    """
    found = np.sort(np.asarray(detections, dtype=float))
    delays, used = [], set()
    for start, end in switches:
        inside = np.flatnonzero((found >= start) & (found <= start + max_delay) & (found < end))
        delays.append(float(found[inside[0]] - start) if len(inside) else math.nan)
        used.update(inside[:1].tolist())
    outcomes = ["hit" if math.isfinite(d) else "miss" if min(start + max_delay, end) <= steps else "pending"
                for d, (start, end) in zip(delays, switches)]
    hits, misses = outcomes.count("hit"), outcomes.count("miss")
    false_alarms = len(found) - len(used)
    finite = [d for d in delays if math.isfinite(d)]
    return {"delays": delays, "outcomes": outcomes, "hits": hits, "misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else math.nan,
            "median_delay": float(np.median(finite)) if finite else math.nan,
            "false_alarms": false_alarms,
            "false_alarms_per_unit": false_alarms / steps * unit if steps > 0 else math.nan,
            "chance_hit_rate": chance_hit_rate(found, [start for start, _ in switches], steps, max_delay)}


def chance_hit_rate(detections, starts, steps, max_delay):
    """Fraction of fake switch times t (real starts shifted by k * max_delay, |k| >= 2, with
    [t, t + max_delay] inside [0, steps] and clear of every real [start, start + max_delay])
    that have a detection in [t, t + max_delay]. NaN if there is no such time."""
    if max_delay <= 0 or not len(starts):
        return math.nan
    starts = np.asarray(starts, dtype=float)
    k = np.arange(2, steps // max_delay + 2)
    shifts = max_delay * np.concatenate([k, -k])
    fake = np.unique((starts[:, None] + shifts[None]).ravel())  # (F,)
    fake = fake[(fake >= 0) & (fake + max_delay <= steps)]
    fake = fake[np.all(np.abs(fake[:, None] - starts[None]) > max_delay, axis=1)]
    if not len(fake):
        return math.nan
    if not len(detections):
        return 0.0
    index = np.searchsorted(detections, fake, side="left")  # first detection at or after t
    hit = (index < len(detections)) & (detections[np.minimum(index, len(detections) - 1)] <= fake + max_delay)
    return float(hit.mean())


def resolve_max_delay(max_delay, time_limit, action_repeat):
    """``llcd_max_delay`` in agent steps; 0 stands for one episode."""
    return max_delay or time_limit // action_repeat


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_positive_float(name, value):
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_nonnegative_float(name, value):
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _is_real(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
