"""A triage sweep: every knockout estimated (:mod:`vlmask.engine.triage`), the top ``K`` and a random audit exact.

The knockouts confirmed are the ``K`` of largest estimated KL (per knockout, its largest over
the steps) and every knockout with a saturated row (one that loses at least
:data:`~vlmask.engine.triage.SATURATED` of a query row's attention: there the first-order
estimate is least trustworthy). A seeded random sample of the others (``audit``, default
``max(8, 1%)`` of them) is run exactly too: the share of audited knockouts whose exact KL
enters the top ``K`` of all the exact values bounds how many the estimate missed (Clopper-Pearson,
one-sided 95%: with no hit in ``n`` audited, about ``3 / n``).

Every exact value comes from the same packed passes as an exhaustive sweep
(:meth:`~vlmask.engine.passes.PromptPasses.measure` on those knockouts only), so it equals an
exhaustive sweep's; the others are NaN.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from interventions import Intervention
from vlmask.engine.edge_weights import SATURATED
from vlmask.engine.passes import CleanRun, PromptPasses
from vlmask.engine.stages import stage
from vlmask.engine.state import PassPlan
from vlmask.engine.triage import TOP_K, Estimates, estimate
from vlmask.results.agreement import spearman
from vlmask.results.dataset import Measured
from vlmask.spec import SweepSpec

log = logging.getLogger(__name__)

AUDIT_SEED = 0
"""The seed of the audit sample (recorded in the result)."""
RECALL_AT = (1, 5, 10, 20, 50, 100)


@dataclass(frozen=True)
class Triaged:
    """A triage sweep's outcome: ``measured`` (every knockout; NaN where not run exactly), the estimates,
    which knockouts were ``confirmed`` (top K, saturated) and ``audited`` ``(knockout,)``, and the figures."""

    measured: Measured
    estimates: Estimates
    confirmed: np.ndarray
    audited: np.ndarray
    figures: dict[str, Any]

    @property
    def exact(self) -> np.ndarray:
        return self.confirmed | self.audited


def audit_size(unconfirmed: int, audit: int | None) -> int:
    """Knockouts audited: ``audit`` if given, else ``max(8, 1%)`` of the ``unconfirmed`` ones, at most all.

    The default keeps the audit a small part of the exact work (at 1,000 knockouts and K = 20, 10 of
    30 exact ones); its bound on misses is about ``3 / n``: audit more for a tighter one.

    Example:
        >>> audit_size(176, None), audit_size(1004, None), audit_size(3, None), audit_size(50, 0)
        (8, 11, 3, 0)
    """
    wanted = max(8, math.ceil(0.01 * unconfirmed)) if audit is None else audit
    return min(wanted, unconfirmed)


def choose(
    score: np.ndarray, k: int, saturated: np.ndarray, audit: int | None, seed: int = AUDIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ``confirmed`` (the ``k`` largest ``score``, and every ``saturated``) and ``audited`` (a seeded
    random sample of the rest) over the knockouts.

    Example:
        >>> c, a = choose(np.array([0.1, 3.0, 2.0, 0.0, 0.5]), 2, np.zeros(5, bool), 1)
        >>> c.tolist(), int(a.sum()), bool((c & a).any())
        ([False, True, True, False, False], 1, False)
    """
    confirmed = saturated.copy()
    confirmed[np.argsort(-score, kind="stable")[:k]] = True
    rest = np.flatnonzero(~confirmed)
    audited = np.zeros_like(confirmed)
    picked = np.random.default_rng(seed).choice(rest, audit_size(len(rest), audit), replace=False)
    audited[picked] = True
    return confirmed, audited


def spread(measured: Measured, rows: np.ndarray, total: int) -> Measured:
    """``measured`` (one row per entry of ``rows``) as ``total`` rows: NaN elsewhere, the clean tokens as masked ids."""

    def full(t: torch.Tensor, fill: float) -> torch.Tensor:
        out = torch.full((total, *t.shape[1:]), fill, dtype=t.dtype)
        out[torch.as_tensor(rows, dtype=torch.long)] = t
        return out

    ids = full(measured.masked_ids, 0)
    missing = torch.ones(total, dtype=torch.bool)
    missing[torch.as_tensor(rows, dtype=torch.long)] = False
    ids[missing] = torch.tensor(measured.clean_ids, dtype=ids.dtype)  # decodable: replaced in the Dataset
    nan = float("nan")
    return replace(
        measured,
        residual=full(measured.residual, nan),
        heads=full(measured.heads, nan),
        logits=full(measured.logits, nan),
        masked_ids=ids,
    )


def clopper_pearson_upper(hits: int, n: int, level: float = 0.95) -> float:
    """One-sided upper confidence bound on a rate after ``hits`` in ``n`` trials (1.0 when ``n`` is 0).

    Example:
        >>> round(clopper_pearson_upper(0, 100), 4), round(3 / 100, 4)
        (0.0295, 0.03)
    """
    if n == 0 or hits >= n:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(level, hits + 1, n - hits))


def _score(kl: torch.Tensor) -> np.ndarray:
    """``(knockout,)``: a knockout's ranking score, its largest KL over the steps (NaN stays NaN)."""
    return kl.double().amax(dim=1).numpy()


def audit_figures(exact_kl: np.ndarray, confirmed: np.ndarray, audited: np.ndarray, k: int) -> dict[str, Any]:
    """The audit's figures: how many audited knockouts' exact KL (``exact_kl (knockout,)``, NaN where not run)
    is among the ``k`` largest exact values, and the bound it gives on the knockouts missed.

    Example:
        >>> kl = np.array([5.0, 4.0, np.nan, 0.1, np.nan])
        >>> f = audit_figures(kl, np.array([1, 1, 0, 0, 0], bool), np.array([0, 0, 0, 1, 0], bool), 2)
        >>> f["triage_audit_hits"], f["triage_audit_size"], f["triage_unexamined"]
        (0, 1, 2)
    """
    known = np.flatnonzero(confirmed | audited)
    top = known[np.argsort(-exact_kl[known], kind="stable")[:k]]
    hits, n = int(audited[top].sum()), int(audited.sum())
    unexamined = int((~(confirmed | audited)).sum())
    upper = clopper_pearson_upper(hits, n)
    return {
        "triage_audit_size": n,
        "triage_audit_hits": hits,
        "triage_audit_hit_rate": hits / n if n else float("nan"),
        "triage_audit_rate_upper95": upper,
        "triage_unexamined": unexamined,
        "triage_expected_missed_upper95": upper * unexamined,
        "triage_audit_seed": AUDIT_SEED,
    }


def check_figures(estimated: np.ndarray, exact: np.ndarray, confirmed: np.ndarray, k: int) -> dict[str, Any]:
    """How the estimate ranked against every exact value (check mode): Spearman over all knockouts, recall of
    the exact top ``k`` (and top 10) among the confirmed, and of the exact top 10 among the estimated top ``K'``.

    Example:
        >>> f = check_figures(np.array([3.0, 2, 1, 0]), np.array([2.5, 3, 0.5, 0]), np.array([1, 1, 0, 0], bool), 2)
        >>> f["triage_check_spearman"], f["triage_check_recall_at_k"]
        (0.8, 1.0)
    """
    order = np.argsort(-exact, kind="stable")
    by_estimate = np.argsort(-estimated, kind="stable")
    ten = set(order[:10].tolist())
    within = {int(j): len(ten & set(by_estimate[:j].tolist())) / len(ten) for j in RECALL_AT if j <= len(exact)}
    return {
        "triage_check_spearman": float(spearman(estimated, exact)),
        "triage_check_recall_at_k": float(confirmed[order[:k]].mean()),
        "triage_check_recall_at_10": float(confirmed[order[:10]].mean()),
        "triage_check_recall10_within": json.dumps(within),
    }


def _estimated(
    passes: PromptPasses, clean: CleanRun, prompt_len: int, base: Intervention, values: Sequence[Any], answer: bool
) -> Estimates:
    """Every knockout's estimates, from the ``clean`` teacher-forced sequence under ``base`` (``answer``: its
    tokens are an answer's, forced, and measured instead of the top ones)."""
    full_len = clean.inputs.seq_len
    read = list(range(prompt_len - 1, full_len))
    plan = passes.plan([base], full_len, read, internals=False)
    targets = clean.tokens.tolist() if answer else None
    return estimate(passes.vl, clean.inputs, plan, values, read, passes.removed(values, full_len), targets)


def triage_measure(
    passes: PromptPasses,
    prompt_ids: torch.Tensor,
    spec: SweepSpec,
    base: Intervention,
    values: Sequence[Any],
    progress: bool = False,
    answer: Sequence[int] = (),
) -> Triaged:
    """Estimate every knockout of ``values``, run the confirmed and audited ones exactly, and say how it went.

    ``answer``: token ids forced as the clean continuation and measured (see :meth:`PromptPasses.measure`).

    With ``spec.triage_check``, every knockout is also run exactly, to compare (figures ``triage_check_*``).
    """
    started, given = time.perf_counter(), passes
    if PassPlan.needs_head_means([base, *values]):
        passes = passes.with_head_means(prompt_ids)
    with stage("clean pass"):  # one clean pass, for the estimates and the exact knockouts
        clean = passes.clean_pass(prompt_ids, spec.num_tokens, base, attention=spec.attention, forced=answer)
    estimates = _estimated(passes, clean, prompt_ids.shape[1], base, values, bool(answer))
    estimated_s = time.perf_counter() - started
    score = _score(estimates.kl)
    score = np.where(np.isnan(score) | np.isinf(score), np.inf, score)  # a row left empty: confirm it
    confirmed, audited = choose(score, spec.triage, estimates.saturated.numpy() > 0, spec.triage_audit)
    rows = np.flatnonzero(confirmed | audited)

    def exact(which: Sequence[Any], reused: CleanRun | None = clean) -> Measured:
        # without the clean run (the check's exhaustive sweep), from the passes as given: its own head means too
        runs = passes if reused is not None else given
        return runs.measure_spec(prompt_ids, spec, base, which, progress=progress, answer=answer, clean=reused)

    measured = spread(exact([values[i] for i in rows]), rows, len(values))
    elapsed = time.perf_counter() - started
    figures = {
        "triage_k": int(spec.triage),
        "triage_top_k_vocabulary": TOP_K,
        "triage_saturated_share": SATURATED,
        "triage_saturated_rows": int(estimates.saturated.sum()),
        "triage_saturated_knockouts": int((estimates.saturated > 0).sum()),
        "triage_confirmed": int(confirmed.sum()),
        "triage_estimate_seconds": estimated_s,
        "triage_seconds": elapsed,
        **audit_figures(_score(measured.logits[..., 0]), confirmed, audited, spec.triage),
    }
    if spec.triage_check:
        figures |= _checked(exact, values, measured, score, confirmed, spec.triage, elapsed)
    log.info(
        "triage: %s", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    )
    return Triaged(measured, estimates, confirmed, audited, figures)


def _checked(exact, values, measured: Measured, score, confirmed, k: int, elapsed: float) -> dict[str, Any]:
    """Check mode: every knockout run exactly; its ranking figures, the time ratio, and the largest difference
    of KL and log-prob drop between the triage's exact values and the exhaustive ones (0 but for float noise)."""
    started = time.perf_counter()
    full = exact(values, None)  # as an exhaustive sweep runs: its own clean pass too
    exhaustive_s = time.perf_counter() - started
    done = ~measured.logits[:, 0, 0].isnan()
    difference = (full.logits[done, :, :2] - measured.logits[done, :, :2]).abs().amax()  # kl, logprob_drop
    return {
        **check_figures(score, _score(full.logits[..., 0]), confirmed, k),
        "triage_check_exhaustive_seconds": exhaustive_s,
        "triage_check_speedup": exhaustive_s / elapsed,
        "triage_check_max_difference": float(difference) if done.any() else 0.0,
    }
