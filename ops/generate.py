"""A synthetic ads event log: realistic enough to learn from, with a known shift and known bad lines.

Public surface: ``GenerateConfig``, ``generate``, ``generate_labelled``, ``write_log``, ``MALFORMED_KINDS``,
``QUALITY_SOURCES``; ``GenerateCommand`` and ``run_generate`` (``loopline generate``).

Why: the whole pipeline (ingest, attribution join, FM/VM training, reach, quality, drift) needs an event
log (design.md, "The event log") whose truth we know. Real logs are private; this one is deterministic
for a seed (same config -> byte-identical output, numpy ``Generator`` seeded with ``cfg.seed``), fast
(vectorized numpy; 10,000 users x 7 days in a couple of seconds) and carries what the system must cope
with: rare segments, delayed and late conversions, a distribution shift, and malformed input.

The world it simulates:

* **Users** ``u<n>`` have targeting attributes ``attrs`` (age, gender, geo, device, interest). Values are
  Zipf-distributed over a fixed rank order (the first value of each list is the most common), so some
  segments are rare; gender uses fixed weights (F/M common, U rare). Each user has a latent interest
  vector near the centroid of their ``interest`` value (so attributes carry signal), a lognormal activity
  rate and a preference over the verticals.
* **Campaigns** ``c<n>`` each belong to one vertical and have a latent vector, a bias and a delivery
  weight; **ads** ``a<n>`` (``ads_per_campaign`` per campaign) have vectors near their campaign's.
* **Impressions** ``i<n>`` come in sessions (a user opens one vertical and scrolls; ``slot`` is the
  position in the session) whose start times follow a daily cycle (busiest around 20:00 UTC). Each
  impression shows an ad of a campaign active in that vertical, drawn by delivery weight.
* **Clicks**: ``P(click) = sigmoid(offset + campaign bias + scale * user.ad + slot, hour, device and
  age effects)``; the global offset is solved so the expected overall click rate is ``base_ctr``. A click
  is a conversion ``v<n>`` of kind ``"click"`` after ``1 s + Exp(click_delay_s)``. A fraction
  ``purchase_rate`` of clicks is followed by a ``"purchase"`` (with a value) after ``60 s +
  Exp(purchase_delay_s)``; a fraction ``late_purchase_rate`` of purchases lands after the attribution
  window instead (``window_s + 1 s + Exp(purchase_delay_s)``). Conversions may fall after the last
  impression; they are kept (the log ends when the last event happened).
* **The shift** at ``shift_ts = start_ts + shift_at * span``: about a third of the campaigns stop, a
  third start, the rest continue with new delivery weights and perturbed biases; every ad vector is
  partly redrawn and every user's interest drifts along a common trend (``shift_strength`` sets how
  much). So the campaign mix and the click rate of each continuing ad change at once.

Lines are written in event-time order (impressions and conversions interleaved by ``ts``; ties put the
impression first), unless ``disorder_s > 0`` lets lines arrive up to that many seconds out of order.
Ids increase with event time. ``ts`` is rounded to milliseconds; a conversion is always strictly after
its impression.

Data-source quality (``quality_sources``, off by default): segment assertions
``{"type":"segment","source","user","segment","ts"}`` from sources of known ``a = P(truly in |
labelled)`` and ``b = P(truly in | not labelled)`` (:data:`QUALITY_SOURCES`: a good, a poor and an
adversarial one), and per campaign and segment a truth report ``{"type":"truth","campaign","segment",
"fraction","impressions","ts"}`` with binomial sampling noise; the summary's ``quality`` gives each
source's a, b (and their realized values) so a fit can be checked (see ``_quality``).

Malformed lines (``malformed > 0``): ``round(malformed * valid_lines)`` extra lines at random positions,
cycling through :data:`MALFORMED_KINDS` (each with the reason code ``parse_event`` actually gives, or a
reason the ingest core gives: the two duplicates, and ``ts_ahead`` for an impression days after the rest
of the log; ``NaN`` / ``1e400`` timestamps, 400-digit integers and lone surrogates get the field's reason
because ``parse_event`` falls back to a lenient parse for them). Corrupted copies of real events get fresh ids
``x<n>``; duplicates are exact copies of a valid line from shortly before (within 1,000 lines, so the
join still remembers the id). No malformed line contains a newline byte. Only the first ``line_too_long``
line of a log is about 1 MB; the others are about 70 KB.

>>> from loopline.state.events import parse_event
>>> lines = list(generate(GenerateConfig(users=20, days=1, seed=3)))
>>> lines == list(generate(GenerateConfig(users=20, days=1, seed=3)))
True
>>> parse_event(lines[0]).id
'i1'
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import orjson

from loopline.errors import ConfigError
from loopline.settings import argument, nested, setting

__all__ = ["GenerateConfig", "generate", "generate_labelled", "write_log", "MALFORMED_KINDS", "QUALITY_SOURCES",
           "GenerateCommand", "run_generate"]

# -- the value lists of the targeting attributes (rank order: first = most common) -------------------
AGES = ("25-34", "18-24", "35-44", "45-54", "55-64", "65+", "13-17")
GENDERS = ("F", "M", "U")
GENDER_WEIGHTS = (0.49, 0.47, 0.04)
GEOS = ("US-CA", "US-TX", "IN-MH", "US-NY", "BR-SP", "US-FL", "GB-ENG", "DE-BY", "MX-CMX", "US-IL",
        "JP-13", "FR-IDF", "ID-JK", "CA-ON", "US-WA", "PH-00", "NG-LA", "AU-NSW", "ES-MD", "IT-25",
        "KR-11", "TR-34", "EG-C", "AR-C", "ZA-GT", "PL-14", "SE-AB", "NZ-AUK", "US-AK", "LU-L",
        "IS-1", "MC-00")
DEVICES = ("android", "ios", "web", "ctv", "kaios")
INTERESTS = ("sports", "music", "gaming", "fashion", "food", "travel", "tech", "beauty", "movies",
             "finance", "auto", "fitness", "home", "parenting", "pets", "books", "outdoors", "crafts",
             "education", "collectibles")

_AFFINITY_SCALE = 2.5  # logit weight of user.ad (latent vectors of norm ~1.1; gives an affinity sd ~1)
_USER_NOISE = 0.5  # spread of a user's vector around the centroid of their interest
_AD_NOISE = 0.5  # spread of an ad's vector around its campaign's
_SESSION_GAP_S = 15.0  # mean seconds between two impressions of one session
_DIURNAL = 0.6  # amplitude of the daily activity cycle (peak at 20:00 UTC)
_SLOT_EFFECT = -0.12  # logit per slot further down the session
_HOUR_EFFECT = 0.2  # amplitude of the hour-of-day logit effect (peak at 21:00 UTC)
_SMALL_EFFECT_SD = 0.15  # sd of the per-device and per-age logit effects
_DUP_LOOKBACK = 1000  # duplicates copy a valid line at most this many valid lines back
_LONG_PAD = 70_000  # padding of an ordinary line_too_long line (bytes)
_HUGE_PAD = 1_000_000  # padding of the one ~1 MB line_too_long line of a log


def _fail(name: str, msg: str, v) -> None:
    raise ConfigError(f"{name}: {msg}, got {v!r}")


@dataclass(frozen=True)
class GenerateConfig:
    """What to generate. Every field is checked in ``__post_init__``; a bad one raises
    :class:`~loopline.errors.ConfigError` whose message starts with the field's name."""

    users: int = setting(1000, "number of users u1..uN", env="GENERATE_USERS")
    days: float = setting(7.0, "length of the log in days of event time", env="GENERATE_DAYS")
    # seeds the one numpy Generator: same config -> byte-identical log
    seed: int = setting(0, "seeds the log: the same settings give a byte-identical log", env="GENERATE_SEED")
    malformed: float = setting(0.0, "extra malformed lines, as a fraction of the valid lines (0..1)",
                               metavar="FRACTION", env="GENERATE_MALFORMED")
    start_ts: float = 1_700_000_000.0  # event time of the start of the log (epoch seconds)
    shift_at: float = 0.5  # where the distribution shift happens, as a fraction of the span (0..1)
    verticals: tuple = ("feed", "stories", "search")  # the surfaces; each campaign belongs to one
    campaigns: int = 30  # campaigns c1..cN over the whole log (about a third stop, a third start at the shift)
    ads_per_campaign: int = 4  # ads per campaign
    impressions_per_user_day: float = 3.0  # mean impressions per user per day (activity varies by user)
    window_s: float = 86400.0  # attribution window; only used to make some purchases land after it
    # -- finer knobs ---------------------------------------------------------------------------------
    dim: int = 8  # size of the latent user / ad vectors
    base_ctr: float = 0.04  # expected overall click rate (per impression)
    session_len: float = 3.0  # mean impressions per session (1 + Poisson)
    click_delay_s: float = 120.0  # mean of the exponential click delay (after a 1 s minimum)
    purchase_rate: float = 0.1  # fraction of clicks followed by a purchase
    purchase_delay_s: float = 4 * 3600.0  # mean of the exponential purchase delay (after 60 s)
    late_purchase_rate: float = 0.05  # fraction of purchases that land after window_s
    zipf_s: float = 1.1  # Zipf exponent of the attribute values (larger: rarer tails)
    activity_sigma: float = 1.0  # sigma of the lognormal per-user activity rate
    shift_strength: float = 0.6  # how much affinities change at the shift (0: not at all, 1: redrawn)
    disorder_s: float = 0.0  # lines may be written up to this many seconds out of event-time order
    # -- data-source quality (off by default: the log is then byte-identical to one without it) ------
    quality_sources: tuple = ()  # (source, segment, a, b) each: a = P(truly in | labelled), b = P(in | not)
    quality_panel: float = 0.3  # fraction of a campaign's impressions its truth report is measured on
    quality_report_delay_s: float = 3600.0  # a truth report arrives this long after the campaign's last impression

    def __post_init__(self):
        def integer(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                _fail(name, "must be an integer", v)
            if v < lo:
                _fail(name, f"must be >= {lo}", v)

        def number(name, lo=None, hi=None, lo_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(v):
                _fail(name, "must be a finite number", v)
            if lo is not None and (v <= lo if lo_open else v < lo):
                _fail(name, f"must be {'>' if lo_open else '>='} {lo}", v)
            if hi is not None and v > hi:
                _fail(name, f"must be <= {hi}", v)

        integer("users", 1)
        number("days", 0, lo_open=True)
        integer("seed", 0)
        number("malformed", 0, 1)
        number("start_ts", 0)
        number("shift_at", 0, 1)
        vs = self.verticals
        if isinstance(vs, (str, bytes)) or not isinstance(vs, (tuple, list)) or not vs:
            _fail("verticals", "must be a non-empty tuple of names", vs)
        if any(not isinstance(v, str) or not v or len(v) > 64 for v in vs):
            _fail("verticals", "every name must be a non-empty string of at most 64 characters", vs)
        if len(set(vs)) != len(vs):
            _fail("verticals", "names must be unique", vs)
        object.__setattr__(self, "verticals", tuple(vs))
        integer("campaigns", 1)
        integer("ads_per_campaign", 1)
        number("impressions_per_user_day", 0, lo_open=True)
        number("window_s", 0, lo_open=True)
        integer("dim", 1)
        number("base_ctr", 0, lo_open=True)
        if self.base_ctr >= 0.5:
            _fail("base_ctr", "must be < 0.5", self.base_ctr)
        number("session_len", 1)
        number("click_delay_s", 0)
        number("purchase_rate", 0, 1)
        number("purchase_delay_s", 0)
        number("late_purchase_rate", 0, 1)
        number("zipf_s", 0)
        number("activity_sigma", 0, 5)
        number("shift_strength", 0, 1)
        number("disorder_s", 0)
        _check_quality(self)
        if self.start_ts + self.days * 86400.0 > 4e9:  # events stay inside EventLimits' range (2100)
            _fail("days", "start_ts + days must stay below epoch 4e9 (2096)", self.days)


# -- the simulation ----------------------------------------------------------------------------------
def _zipf_p(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=float) ** s
    return w / w.sum()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _session_starts(rng: np.random.Generator, n: int, start: float, span: float) -> np.ndarray:
    """``n`` times in ``[start, start + span)`` following the daily activity cycle (thinning)."""
    out = np.empty(0)
    while out.size < n:
        t = start + rng.random(2 * (n - out.size) + 16) * span
        hour = (t % 86400.0) / 3600.0
        keep = rng.random(t.size) * (1 + _DIURNAL) < 1 + _DIURNAL * np.cos(2 * np.pi * (hour - 20) / 24)
        out = np.concatenate([out, t[keep]])
    return out[:n]


class _World:
    """Every array of one generated log (valid events only), built once from the config."""

    def __init__(self, cfg: GenerateConfig):
        rng = np.random.default_rng(cfg.seed)
        self.cfg = cfg
        span = cfg.days * 86400.0
        self.start_ts, self.end_ts = float(cfg.start_ts), float(cfg.start_ts) + span
        self.shift_ts = float(cfg.start_ts) + cfg.shift_at * span
        d, n_users, n_vert = cfg.dim, cfg.users, len(cfg.verticals)
        sd = 1.0 / math.sqrt(d)

        # users: attributes, latent vectors, activity, vertical preference
        attr_idx = {
            "age": rng.choice(len(AGES), n_users, p=_zipf_p(len(AGES), cfg.zipf_s)),
            "gender": rng.choice(len(GENDERS), n_users, p=np.array(GENDER_WEIGHTS) / sum(GENDER_WEIGHTS)),
            "geo": rng.choice(len(GEOS), n_users, p=_zipf_p(len(GEOS), cfg.zipf_s)),
            "device": rng.choice(len(DEVICES), n_users, p=_zipf_p(len(DEVICES), cfg.zipf_s)),
            "interest": rng.choice(len(INTERESTS), n_users, p=_zipf_p(len(INTERESTS), cfg.zipf_s)),
        }
        values = {"age": AGES, "gender": GENDERS, "geo": GEOS, "device": DEVICES, "interest": INTERESTS}
        cols = {k: [values[k][i] for i in attr_idx[k].tolist()] for k in values}
        self.attrs = [dict(zip(values, row)) for row in zip(*(cols[k] for k in values))]
        centroids = rng.normal(0, sd, (len(INTERESTS), d))
        user_vec = centroids[attr_idx["interest"]] + rng.normal(0, _USER_NOISE * sd, (n_users, d))
        activity = rng.lognormal(0.0, cfg.activity_sigma, n_users) * math.exp(-cfg.activity_sigma ** 2 / 2)
        vert_pref = np.cumsum(rng.dirichlet(np.ones(n_vert), n_users), axis=1)
        self.vert_prob = np.diff(vert_pref, axis=1, prepend=0.0)  # (users, verticals): quality labels lean on it

        # campaigns and ads; which campaigns run before / after the shift
        n_c, n_a = cfg.campaigns, cfg.ads_per_campaign
        camp_vert = rng.permutation(np.arange(n_c) % n_vert)
        camp_vec = rng.normal(0, sd, (n_c, d))
        ad_vec = np.repeat(camp_vec, n_a, axis=0) + rng.normal(0, _AD_NOISE * sd, (n_c * n_a, d))
        bias = rng.normal(0.0, 0.5, n_c)
        weight = rng.lognormal(0.0, 0.8, n_c)
        n_stop = n_new = int(round(n_c / 3))
        order = rng.permutation(n_c)
        stopped, started = order[:n_stop], order[n_stop:n_stop + n_new]
        active = np.ones((2, n_c), dtype=bool)
        active[0, started] = False
        active[1, stopped] = False
        self.stopped = sorted(int(c) + 1 for c in stopped)  # campaign numbers, for the curious
        self.started = sorted(int(c) + 1 for c in started)

        # the shift: new delivery weights, perturbed biases, redrawn ad vectors, drifting interests
        s = cfg.shift_strength
        weight2 = np.where(np.isin(np.arange(n_c), started), weight, rng.lognormal(0.0, 0.8, n_c))
        bias2 = bias + rng.normal(0.0, 0.6 * s, n_c)
        ad_vec2 = math.sqrt(1 - s) * ad_vec + math.sqrt(s) * (
            np.repeat(rng.normal(0, sd, (n_c, d)), n_a, axis=0) + rng.normal(0, _AD_NOISE * sd, (n_c * n_a, d)))
        trend = rng.normal(0, sd, d)
        user_vec2 = user_vec + s * trend + rng.normal(0, 0.5 * s * sd, (n_users, d))
        dev_eff = rng.normal(0.0, _SMALL_EFFECT_SD, len(DEVICES))
        age_eff = rng.normal(0.0, _SMALL_EFFECT_SD, len(AGES))

        # sessions -> impressions
        per_user = activity * cfg.impressions_per_user_day * cfg.days / cfg.session_len
        n_sess = rng.poisson(per_user)
        sess_user = np.repeat(np.arange(n_users), n_sess)
        n_s = sess_user.size
        sess_start = _session_starts(rng, n_s, self.start_ts, span)
        sess_len = 1 + rng.poisson(cfg.session_len - 1, n_s)
        sess_vert = (vert_pref[sess_user] < rng.random(n_s)[:, None]).sum(axis=1)
        sess_vert = np.minimum(sess_vert, n_vert - 1)
        first = np.cumsum(sess_len) - sess_len
        n = int(sess_len.sum())
        sess_of = np.repeat(np.arange(n_s), sess_len)
        slot = np.arange(n) - np.repeat(first, sess_len) + 1
        gaps = rng.exponential(_SESSION_GAP_S, n)
        gaps[slot == 1] = 0.0
        cs = np.cumsum(gaps)
        ts = np.round(sess_start[sess_of] + cs - cs[np.repeat(first, sess_len)], 3)
        keep = ts < self.end_ts
        ts, slot, sess_of = ts[keep], slot[keep], sess_of[keep]
        user, vert = sess_user[sess_of], sess_vert[sess_of]
        n = ts.size
        phase = (ts >= self.shift_ts).astype(np.int64)

        # which campaign and ad: by delivery weight among the campaigns active in (phase, vertical)
        camp = np.zeros(n, dtype=np.int64)
        for ph, w in ((0, weight), (1, weight2)):
            for v in range(n_vert):
                sel = np.flatnonzero((phase == ph) & (vert == v))
                if sel.size == 0:
                    continue
                pool = np.flatnonzero(active[ph] & (camp_vert == v))
                if pool.size == 0:  # no campaign of this vertical runs now: any running one fills in
                    pool = np.flatnonzero(active[ph])
                camp[sel] = rng.choice(pool, sel.size, p=w[pool] / w[pool].sum())
        ad = camp * n_a + rng.integers(0, n_a, n)
        vert = camp_vert[camp]  # the campaign decides the vertical (differs only in the fill-in case)

        # click probabilities
        hour = ((ts % 86400.0) // 3600.0).astype(np.int64)
        post = phase == 1
        aff = np.where(post, np.einsum("ij,ij->i", user_vec2[user], ad_vec2[ad]),
                       np.einsum("ij,ij->i", user_vec[user], ad_vec[ad]))
        logit = (np.where(post, bias2[camp], bias[camp]) + _AFFINITY_SCALE * aff
                 + _SLOT_EFFECT * (slot - 1) + _HOUR_EFFECT * np.cos(2 * np.pi * (hour - 21) / 24)
                 + dev_eff[attr_idx["device"][user]] + age_eff[attr_idx["age"][user]])
        self.p_click = _sigmoid(logit + self._offset(logit, cfg.base_ctr))
        clicked = np.flatnonzero(rng.random(n) < self.p_click)

        # conversions: clicks, purchases after some clicks, a few purchases after the window
        click_ts = np.round(ts[clicked] + 1.0 + rng.exponential(cfg.click_delay_s, clicked.size), 3)
        bought = clicked[rng.random(clicked.size) < cfg.purchase_rate]
        late = rng.random(bought.size) < cfg.late_purchase_rate
        delay = np.where(late, cfg.window_s + 1.0, 60.0) + rng.exponential(cfg.purchase_delay_s, bought.size)
        buy_ts = np.round(ts[bought] + delay, 3)
        buy_value = np.round(rng.lognormal(3.0, 0.8, bought.size), 2)

        # order impressions by time and number them; then conversions
        o = np.lexsort((np.arange(n), ts))
        rank = np.empty(n, dtype=np.int64)
        rank[o] = np.arange(n)
        self.imp_ts, self.imp_user, self.imp_ad, self.imp_camp = ts[o], user[o], ad[o], camp[o]
        self.imp_vert, self.imp_slot, self.imp_hour = vert[o], slot[o], hour[o]
        self.p_click = self.p_click[o]
        conv_imp = np.concatenate([rank[clicked], rank[bought]])
        conv_ts = np.concatenate([click_ts, buy_ts])
        conv_kind = np.concatenate([np.zeros(clicked.size, np.int8), np.ones(bought.size, np.int8)])
        conv_value = np.concatenate([np.zeros(clicked.size), buy_value])
        oc = np.lexsort((conv_kind, conv_imp, conv_ts))
        self.conv_imp, self.conv_ts = conv_imp[oc], conv_ts[oc]
        self.conv_kind, self.conv_value = conv_kind[oc], conv_value[oc]
        self.n_imp, self.n_conv = n, conv_ts.size
        self.n_clicks, self.n_purchases = int(clicked.size), int(bought.size)
        self.n_after_window = int((self.conv_ts - self.imp_ts[self.conv_imp] > cfg.window_s).sum())

        # the write order: merge by ts (impression first on ties), optionally jittered
        all_ts = np.concatenate([self.imp_ts, self.conv_ts])
        is_conv = np.concatenate([np.zeros(n, np.int8), np.ones(self.n_conv, np.int8)])
        idx = np.concatenate([np.arange(n), np.arange(self.n_conv)])
        key = all_ts + (rng.random(all_ts.size) * cfg.disorder_s if cfg.disorder_s > 0 else 0.0)
        om = np.lexsort((idx, is_conv, key))
        self.order_conv, self.order_idx = is_conv[om], idx[om]
        self.write_ts = key[om]  # the (jittered) time each valid line is written at, ascending
        self.rng = rng  # the malformed lines continue from here

    @staticmethod
    def _offset(logit: np.ndarray, target: float) -> float:
        """The global logit offset that makes the mean click probability ``target`` (bisection)."""
        x = logit[:: max(1, logit.size // 50_000)] if logit.size else np.zeros(1)
        lo, hi = -30.0, 30.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if _sigmoid(x + mid).mean() < target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    # -- lines ---------------------------------------------------------------------------------------
    def impression(self, j: int) -> dict:
        return {"type": "impression", "id": f"i{j + 1}", "ts": float(self.imp_ts[j]),
                "user": f"u{int(self.imp_user[j]) + 1}", "ad": f"a{int(self.imp_ad[j]) + 1}",
                "campaign": f"c{int(self.imp_camp[j]) + 1}",
                "vertical": self.cfg.verticals[int(self.imp_vert[j])],
                "attrs": self.attrs[int(self.imp_user[j])],
                "features": {"slot": str(int(self.imp_slot[j])), "hour": str(int(self.imp_hour[j]))}}

    def conversion(self, k: int) -> dict:
        purchase = bool(self.conv_kind[k])
        return {"type": "conversion", "id": f"v{k + 1}", "ts": float(self.conv_ts[k]),
                "impression": f"i{int(self.conv_imp[k]) + 1}", "kind": "purchase" if purchase else "click",
                "value": float(self.conv_value[k])}

    def valid_lines(self) -> Iterator[tuple[bool, bytes]]:
        """``(is_conversion, line)`` in write order; fast path over plain Python lists."""
        dumps = orjson.dumps
        verts = self.cfg.verticals
        attrs = self.attrs
        i_ts, i_user, i_ad = self.imp_ts.tolist(), self.imp_user.tolist(), self.imp_ad.tolist()
        i_camp, i_vert = self.imp_camp.tolist(), self.imp_vert.tolist()
        i_slot, i_hour = self.imp_slot.tolist(), self.imp_hour.tolist()
        c_ts, c_imp = self.conv_ts.tolist(), self.conv_imp.tolist()
        c_kind, c_value = self.conv_kind.tolist(), self.conv_value.tolist()
        for conv, j in zip(self.order_conv.tolist(), self.order_idx.tolist()):
            if conv:
                yield True, dumps({"type": "conversion", "id": f"v{j + 1}", "ts": c_ts[j],
                                   "impression": f"i{c_imp[j] + 1}",
                                   "kind": "purchase" if c_kind[j] else "click", "value": c_value[j]})
            else:
                u = i_user[j]
                yield False, dumps({"type": "impression", "id": f"i{j + 1}", "ts": i_ts[j], "user": f"u{u + 1}",
                                    "ad": f"a{i_ad[j] + 1}", "campaign": f"c{i_camp[j] + 1}",
                                    "vertical": verts[i_vert[j]], "attrs": attrs[u],
                                    "features": {"slot": str(i_slot[j]), "hour": str(i_hour[j])}})

    def line_at(self, pos: int) -> tuple[bool, dict]:
        """The event at write position ``pos`` as ``(is_conversion, dict)``."""
        conv, j = bool(self.order_conv[pos]), int(self.order_idx[pos])
        return conv, (self.conversion(j) if conv else self.impression(j))


# -- malformed lines ---------------------------------------------------------------------------------
def _d(obj) -> bytes:
    return orjson.dumps(obj)


def _without(obj: dict, key: str) -> dict:
    return {k: v for k, v in obj.items() if k != key}


def _with(obj: dict, **kw) -> dict:
    return {**obj, **kw}


def _nested(depth: int):
    x: object = 1
    for i in range(depth):
        x = {"n": x} if i % 2 else [x]
    return x


# name -> (reason parse_event gives / the join gives, needs: "imp" | "conv", builder(obj, rng, state))
# A builder gets a corrupted-copy template (a nearby valid event of the kind it needs, with a fresh id).
def _too_long(obj, rng, st):
    pad = _HUGE_PAD if not st.get("huge_done") else _LONG_PAD
    st["huge_done"] = True
    return _d(_with(obj, pad="x" * pad))


_HUGE_INT = "1" + "0" * 400  # no float holds it: orjson refuses it, the lenient parser returns an int
_AHEAD_GAP_S = 2 * 86400.0  # a ts_ahead line is this far past every valid event (max_ahead_s is one day)
_AHEAD_STEP_S = 1.5 * 86400.0  # and this far from the previous one: they disagree, so none confirms another


def _literal(obj: dict, name: str, text: str) -> bytes:
    """``obj`` as a line whose field ``name`` is the literal JSON ``text`` (what orjson would not write)."""
    return _d(_with(obj, **{name: "@@"})).replace(b'"' + name.encode() + b'":"@@"',
                                                   b'"' + name.encode() + b'":' + text.encode())


def _ahead(obj, rng, st):
    """An impression far ahead of the log's event time: the skew check dead-letters it (``ts_ahead``)
    in any order, in file order (held, then an ordinary event shows it was an outlier) and in
    event-time order (it sorts after every valid line, and the next one is 1.5 days further)."""
    k = st["ahead"] = st.get("ahead", -1) + 1
    slots = int((4.1e9 - st["after_ts"]) // _AHEAD_STEP_S)  # stay inside the plausible range (2100)
    return _d(_with(obj, ts=round(st["after_ts"] + (k % max(slots, 1)) * _AHEAD_STEP_S, 3)))


_BUILDERS = {
    "truncated": ("bad_json", "imp", lambda o, r, s: (lambda b: b[: int(r.integers(1, len(b) - 1))])(_d(o))),
    "trailing_garbage": ("bad_json", "conv", lambda o, r, s: _d(o) + b'}"'),
    "ts_nan": ("bad_ts", "conv", lambda o, r, s: _d(_with(o, ts=0.5)).replace(b'"ts":0.5', b'"ts":NaN')),
    "ts_infinity": ("bad_ts", "imp", lambda o, r, s: _d(_with(o, ts=0.5)).replace(b'"ts":0.5', b'"ts":1e400')),
    "single_quotes": ("bad_json", "imp", lambda o, r, s: _d(o).replace(b'"', b"'")),
    "ts_string": ("wrong_type", "imp", lambda o, r, s: _d(_with(o, ts=str(o["ts"])))),
    "user_number": ("wrong_type", "imp", lambda o, r, s: _d(_with(o, user=int(o["user"][1:])))),
    "attrs_list": ("wrong_type", "imp", lambda o, r, s: _d(_with(o, attrs=list(o["attrs"].values())))),
    "feature_float": ("wrong_type", "imp", lambda o, r, s: _d(_with(o, features={**o["features"], "slot": 1.5}))),
    "value_string": ("wrong_type", "conv", lambda o, r, s: _d(_with(o, value="12.50"))),
    "ts_negative": ("bad_ts", "conv", lambda o, r, s: _d(_with(o, ts=-o["ts"]))),
    "ts_minus_one": ("bad_ts", "imp", lambda o, r, s: _d(_with(o, ts=-1))),
    "missing_user": ("missing_field", "imp", lambda o, r, s: _d(_without(o, "user"))),
    "missing_ts": ("missing_field", "conv", lambda o, r, s: _d(_without(o, "ts"))),
    "missing_type": ("missing_field", "imp", lambda o, r, s: _d(_without(o, "type"))),
    "missing_impression": ("missing_field", "conv", lambda o, r, s: _d(_without(o, "impression"))),
    "too_long": ("line_too_long", "imp", _too_long),
    "latin1_geo": ("not_utf8", "imp", lambda o, r, s: _d(o).replace(b'"attrs":{', b'"attrs":{"city":"S\xe3o Paulo",', 1)),
    "raw_ff": ("not_utf8", "conv", lambda o, r, s: _d(o).replace(b'"kind":"', b'"kind":"\xff\xfe', 1)),
    "deep_nesting": ("too_deep", "imp", lambda o, r, s: _d(_with(o, ctx=_nested(12)))),
    "type_click": ("unknown_type", "conv", lambda o, r, s: _d(_with(o, type="click"))),
    "type_capitalized": ("unknown_type", "imp", lambda o, r, s: _d(_with(o, type="Impression"))),
    "json_array": ("not_object", "imp", lambda o, r, s: _d([o])),
    "json_number": ("not_object", "conv", lambda o, r, s: str(int(o["ts"])).encode()),
    "json_null": ("not_object", "imp", lambda o, r, s: b"null"),
    "too_many_attrs": ("too_many_fields", "imp", lambda o, r, s: _d(_with(o, attrs={f"k{i}": f"v{i}" for i in range(80)}))),
    "long_user": ("string_too_long", "imp", lambda o, r, s: _d(_with(o, user="u" + "9" * 300))),
    "long_attr_value": ("string_too_long", "imp", lambda o, r, s: _d(_with(o, attrs={**o["attrs"], "geo": "G" * 400}))),
    "empty_id": ("bad_value", "conv", lambda o, r, s: _d(_with(o, id=""))),
    "empty_campaign": ("bad_value", "imp", lambda o, r, s: _d(_with(o, campaign=""))),
    "value_infinity": ("bad_value", "conv",
                       lambda o, r, s: _d(_with(o, value=0.5)).replace(b'"value":0.5', b'"value":Infinity')),
    # issue 12: numbers no float (or no field's bound) holds, invalid Unicode, controls, blanks, units, skew
    "ts_huge_int": ("bad_ts", "imp", lambda o, r, s: _literal(o, "ts", _HUGE_INT)),
    "value_huge_int": ("bad_value", "conv", lambda o, r, s: _literal(o, "value", "-" + _HUGE_INT)),
    "value_1e308": ("bad_value", "conv", lambda o, r, s: _d(_with(o, value=1e308))),
    "truth_impressions_huge": ("bad_value", "imp", lambda o, r, s: _literal(
        {"type": "truth", "campaign": o["campaign"], "segment": "any", "fraction": 0.5, "ts": o["ts"]},
        "impressions", "1" + "0" * 30)),
    "ts_milliseconds": ("bad_ts", "imp", lambda o, r, s: _d(_with(o, ts=int(o["ts"] * 1000)))),
    "ts_microseconds": ("bad_ts", "conv", lambda o, r, s: _d(_with(o, ts=int(o["ts"] * 1_000_000)))),
    "user_surrogate": ("bad_string", "imp", lambda o, r, s: _literal(o, "user", '"u\\ud800"')),
    "attr_key_surrogate": ("bad_string", "imp", lambda o, r, s: _literal(
        o, "attrs", orjson.dumps({**o["attrs"], "@@": "x"}).decode().replace('"@@"', '"\\udc00"'))),
    "id_nul": ("bad_string", "conv", lambda o, r, s: _d(_with(o, id=o["id"] + "\x00"))),
    "ad_control": ("bad_string", "imp", lambda o, r, s: _d(_with(o, ad=o["ad"] + "\x07"))),
    "user_blank": ("bad_value", "imp", lambda o, r, s: _d(_with(o, user="   "))),
    "attr_key_empty": ("bad_value", "imp", lambda o, r, s: _d(_with(o, attrs={**o["attrs"], "": "x"}))),
    "ts_ahead": ("ts_ahead", "imp", _ahead),
    "duplicate_impression": ("duplicate_impression", "imp", None),
    "duplicate_conversion": ("duplicate_conversion", "conv", None),
}

#: ``(kind, reason)`` of every malformed line the generator can insert, in the order it cycles through.
#: ``reason`` is what :func:`loopline.state.events.parse_event` raises (checked by the tests), except
#: for the two duplicates and ``ts_ahead``, which parse fine and are rejected by the ingest core.
MALFORMED_KINDS = tuple((name, spec[0]) for name, spec in _BUILDERS.items())


def _malformed(world: _World, n_valid: int) -> list[tuple[int, bytes, str]]:
    """``(insert_before_valid_position, line, reason)`` for every malformed line, sorted by position."""
    cfg, rng = world.cfg, world.rng
    m = int(round(cfg.malformed * n_valid))
    if m == 0 or n_valid == 0:
        return []
    conv_flags = world.order_conv.astype(bool)
    has = {"imp": bool((~conv_flags).any()), "conv": bool(conv_flags.any())}
    kinds = [k for k, (_, need, b) in _BUILDERS.items() if b is not None or has[need]]
    assigned = [kinds[i % len(kinds)] for i in range(m)]
    assigned = [assigned[i] for i in rng.permutation(m)]
    gaps = rng.integers(0, n_valid + 1, m)
    pos_of = {"imp": np.flatnonzero(~conv_flags), "conv": np.flatnonzero(conv_flags)}
    last = max(world.end_ts, float(world.conv_ts.max()) if world.conv_ts.size else world.end_ts)
    state: dict = {"after_ts": last + _AHEAD_GAP_S}
    out = []
    for k, (name, g) in enumerate(zip(assigned, gaps.tolist())):
        reason, need, build = _BUILDERS[name]
        if reason == "ts_ahead":
            g = max(g, 1)  # after a valid line: a partition's first event anchors its event time unchecked
        if not has[need]:
            need = "imp" if has["imp"] else "conv"
        cand = pos_of[need]
        if build is None:  # an exact copy of a valid line shortly before the insertion point
            lo_i = np.searchsorted(cand, g - _DUP_LOOKBACK)
            hi_i = np.searchsorted(cand, g)  # candidates strictly before the gap
            if hi_i <= lo_i:  # nothing of that type just before: move the gap after the first one
                src = int(cand[0])
                g = src + 1 + int(rng.integers(0, min(_DUP_LOOKBACK, n_valid - src)))
            else:
                src = int(cand[int(rng.integers(lo_i, hi_i))])
            _, obj = world.line_at(src)
            line = orjson.dumps(obj)
        else:  # a corrupted copy of the nearest valid event of the type it needs, with a fresh id
            i = min(int(np.searchsorted(cand, g)), cand.size - 1)
            _, obj = world.line_at(int(cand[i]))
            obj = _with(obj, id=f"x{k + 1}")
            line = build(obj, rng, state)
        assert b"\n" not in line and b"\r" not in line
        out.append((g, line, reason))
    order = sorted(range(len(out)), key=lambda i: (out[i][0], i))
    return [out[i] for i in order]


# -- data-source quality: segment assertions and truth reports ----------------------------------------
#: Three sources with known quality, for ``loopline generate --quality``: (source, segment, a, b).
QUALITY_SOURCES = (("s_good", "auto_intender", 0.85, 0.10), ("s_poor", "sports_fan", 0.45, 0.30),
                   ("s_adversarial", "new_parent", 0.15, 0.60))


def _check_quality(cfg: GenerateConfig) -> None:
    qs = cfg.quality_sources
    if isinstance(qs, (str, bytes)) or not isinstance(qs, (tuple, list)):
        _fail("quality_sources", "must be a tuple of (source, segment, a, b)", qs)
    seen = set()
    for src in qs:
        if not isinstance(src, (tuple, list)) or len(src) != 4:
            _fail("quality_sources", "every entry must be (source, segment, a, b)", src)
        name, seg, a, b = src
        if not all(isinstance(x, str) and 0 < len(x) <= 64 for x in (name, seg)):
            _fail("quality_sources", "source and segment must be non-empty strings of at most 64 characters", src)
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x <= 1 for x in (a, b)):
            _fail("quality_sources", "a and b must be numbers in [0, 1]", src)
        if seg in seen:  # the truth of a segment is drawn from its one source's labels (see _quality)
            _fail("quality_sources", "each segment can have one source", src)
        seen.add(seg)
    object.__setattr__(cfg, "quality_sources", tuple(tuple(x) for x in qs))
    if isinstance(cfg.quality_panel, bool) or not isinstance(cfg.quality_panel, (int, float)) \
            or not 0 < cfg.quality_panel <= 1:
        _fail("quality_panel", "must be a number in (0, 1]", cfg.quality_panel)
    d = cfg.quality_report_delay_s
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
        _fail("quality_report_delay_s", "must be a finite number >= 0", d)


def _quality(world: _World) -> tuple[list[tuple[int, bytes]], dict]:
    """Segment assertions and truth reports for ``cfg.quality_sources``, with their write positions.

    Source ``i`` labels user ``u`` with probability ``0.05 + 1.2 P_u(vertical i)`` (capped at 0.95):
    labels lean on the user's preferred surface, so a campaign's labelled fraction q_c depends on its
    vertical and a and b can be told apart. The segment's truth is then drawn from the label
    (``a`` if labelled, else ``b``): a and b hold in every campaign, as the model assumes. (One source
    per segment: two sources' labels cannot both have campaign-independent a and b for one truth.)
    Assertions are spread uniformly over the log's span (the rule counts them whenever they come).
    Each campaign gets a report per segment ``quality_report_delay_s`` after its last impression: the
    fraction of ``round(quality_panel * impressions)`` measured impressions truly in the segment,
    drawn Binomial(measured, the campaign's realized true fraction). Randomness comes from a generator
    of its own, so impressions, conversions and malformed lines are those of the same log without it."""
    cfg = world.cfg
    rng = np.random.default_rng([cfg.seed, 0x9A11])
    n_users, n_vert = cfg.users, world.vert_prob.shape[1]
    camp, users_of = world.imp_camp, world.imp_user
    n_camp = np.bincount(camp, minlength=cfg.campaigns)
    last_ts = np.full(cfg.campaigns, -np.inf)
    np.maximum.at(last_ts, camp, world.imp_ts)
    lines: list[tuple[float, int, bytes]] = []  # (ts, order, line)
    sources = []
    for i, (name, seg, a, b) in enumerate(cfg.quality_sources):
        rate = np.minimum(0.95, 0.05 + 1.2 * world.vert_prob[:, i % n_vert])
        labelled = rng.random(n_users) < rate
        truly = rng.random(n_users) < np.where(labelled, a, b)
        ts = np.round(world.start_ts + rng.random(n_users) * (world.end_ts - world.start_ts), 3)
        for u in np.flatnonzero(labelled).tolist():
            lines.append((float(ts[u]), len(lines), orjson.dumps(
                {"type": "segment", "source": name, "user": f"u{u + 1}", "segment": seg, "ts": float(ts[u])})))
        imp_lab, imp_true = labelled[users_of], truly[users_of]
        true_frac = np.bincount(camp, weights=imp_true, minlength=cfg.campaigns) / np.maximum(n_camp, 1)
        reports = 0
        for c in np.flatnonzero(n_camp).tolist():
            measured = max(1, int(round(cfg.quality_panel * n_camp[c])))
            fraction = int(rng.binomial(measured, true_frac[c])) / measured
            t = round(float(last_ts[c]) + cfg.quality_report_delay_s, 3)
            lines.append((t, len(lines), orjson.dumps({"type": "truth", "campaign": f"c{c + 1}", "segment": seg,
                                                       "fraction": fraction, "impressions": measured, "ts": t})))
            reports += 1
        n_lab = int(imp_lab.sum())
        sources.append({"source": name, "segment": seg, "a": float(a), "b": float(b),
                        # the realized P(truly in | labelled in / out) over every impression of the log
                        "a_realized": float(imp_true[imp_lab].mean()) if n_lab else None,
                        "b_realized": float(imp_true[~imp_lab].mean()) if n_lab < imp_lab.size else None,
                        "labelled_users": int(labelled.sum()), "truly_in_users": int(truly.sum()),
                        "labelled_impressions": n_lab, "truth_reports": reports})
    lines.sort()
    pos = np.searchsorted(world.write_ts, np.array([t for t, _, _ in lines]), side="right")
    extra = [(int(p), line) for p, (_, _, line) in zip(pos.tolist(), lines)]
    summary = {"sources": sources, "segments": sum(s["labelled_users"] for s in sources),
               "truth_reports": sum(s["truth_reports"] for s in sources), "panel": cfg.quality_panel}
    return extra, summary


class _Log:
    def __init__(self, cfg: GenerateConfig):
        if not isinstance(cfg, GenerateConfig):
            raise ConfigError(f"cfg: must be a GenerateConfig, got {type(cfg).__name__}")
        self.world = _World(cfg)
        self.n_valid = self.world.n_imp + self.world.n_conv
        self.bad = _malformed(self.world, self.n_valid)
        self.extra, self.quality = _quality(self.world) if cfg.quality_sources else ([], None)

    def lines(self) -> Iterator[tuple[bytes, str | None]]:
        bad, nb, b = self.bad, len(self.bad), 0
        extra, ne, e = self.extra, len(self.extra), 0  # quality lines: (before valid position, line)
        for pos, (_, line) in enumerate(self.world.valid_lines()):
            while e < ne and extra[e][0] == pos:
                yield extra[e][1], None
                e += 1
            while b < nb and bad[b][0] == pos:
                yield bad[b][1], bad[b][2]
                b += 1
            yield line, None
        for _, line in extra[e:]:
            yield line, None
        while b < nb:
            yield bad[b][1], bad[b][2]
            b += 1

    def summary(self) -> dict:
        w = self.world
        by_reason: dict[str, int] = {}
        for _, _, r in self.bad:
            by_reason[r] = by_reason.get(r, 0) + 1
        out = {"lines": self.n_valid + len(self.extra) + len(self.bad), "valid": self.n_valid + len(self.extra),
                "impressions": w.n_imp,
                "conversions": w.n_conv, "clicks": w.n_clicks, "purchases": w.n_purchases,
                "after_window": w.n_after_window, "malformed_total": len(self.bad),
                "malformed": dict(sorted(by_reason.items())), "users": w.cfg.users,
                "start_ts": w.start_ts, "end_ts": w.end_ts, "shift_ts": w.shift_ts,
                "expected_ctr": float(w.p_click.mean()) if w.n_imp else 0.0,
                "stopped_campaigns": [f"c{c}" for c in w.stopped],
                "started_campaigns": [f"c{c}" for c in w.started]}
        if self.quality is not None:
            out["quality"] = self.quality
        return out


# -- public ------------------------------------------------------------------------------------------
def generate_labelled(cfg: GenerateConfig) -> Iterator[tuple[bytes, str | None]]:
    """Every line of the log (bytes, no newline) with the reason it is meant to be rejected for, or
    ``None`` for a valid event. Useful to check a dead-letter path line by line."""
    return _Log(cfg).lines()


def generate(cfg: GenerateConfig) -> Iterator[bytes]:
    """Every line of the log (bytes, no trailing newline), valid and malformed, in write order."""
    return (line for line, _ in _Log(cfg).lines())


def write_log(cfg: GenerateConfig, path, progress: bool = False) -> dict:
    """Write the log to ``path`` (one newline-terminated line per event) and return a summary:
    ``lines, valid, impressions, conversions, clicks, purchases, after_window`` (conversions more than
    ``window_s`` after their impression), ``malformed_total, malformed`` (count per intended reason),
    ``start_ts, end_ts, shift_ts, expected_ctr``, the stopped/started campaigns, ``path`` and ``bytes``;
    with ``quality_sources``, ``quality`` (per source: a, b, their realized values, labelled users and
    impressions, truth reports) and ``valid``/``lines`` count the assertions and reports too.
    ``progress`` prints a line to stderr every million lines. ``path`` ``"-"`` writes to stdout (its
    binary buffer, flushed and left open)."""
    log = _Log(cfg)
    if str(path) == "-":
        sys.stdout.flush()  # anything printed before comes first
        out = contextlib.nullcontext(sys.stdout.buffer)
    else:
        out = open(path, "wb")
    size, buf = 0, []
    with out as f:
        for n, (line, _) in enumerate(log.lines(), 1):
            buf.append(line)
            if len(buf) >= 8192:
                chunk = b"\n".join(buf) + b"\n"
                f.write(chunk)
                size += len(chunk)
                buf.clear()
            if progress and n % 1_000_000 == 0:
                print(f"generate: {n:,} lines", file=sys.stderr, flush=True)
        if buf:
            chunk = b"\n".join(buf) + b"\n"
            f.write(chunk)
            size += len(chunk)
        f.flush()
    return {**log.summary(), "path": str(path), "bytes": size}


@dataclass(frozen=True)
class GenerateCommand:
    """``loopline generate``: what to generate and where to write it."""

    log: GenerateConfig = nested(GenerateConfig)
    quality: bool = setting(False, "add segment assertions of three sources of known quality and truth reports",
                            env="GENERATE_QUALITY")
    out: str = argument(None, "the log's path; '-' writes it to stdout (the summary then goes to stderr)",
                        metavar="FILE", required=True)

    @property
    def where(self) -> str:
        return "stdout" if self.out == "-" else self.out


def run_generate(cfg: GenerateCommand, progress: bool = False) -> dict:
    """Write the log; the summary of :func:`write_log`."""
    log = replace(cfg.log, quality_sources=QUALITY_SOURCES) if cfg.quality else cfg.log
    return write_log(log, cfg.out, progress=progress)
