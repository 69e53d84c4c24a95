"""CF-style metadata of a result: the ``long_name`` and ``units`` of every variable and coordinate, in one table.

:func:`vlmask.results.dataset.to_dataset` writes them, with ``Conventions`` and ``title``; a new
variable gets its metadata from one entry in :data:`CF_METADATA`.
"""

from __future__ import annotations

from vlmask.results.schema import (
    CLEAN_TOP_LOGPROB,
    HEAD,
    HEADS,
    INTERVENTION,
    INTERVENTION_JSON,
    INTERVENTION_TYPE,
    KL,
    LAYER,
    LOGPROB_DROP,
    MASKED_CONTINUATION,
    MASKED_TOKEN_ID,
    METRIC,
    PROB_CHANGE_PCT,
    RESIDUAL,
    SEQ,
    SEQ_COL,
    SEQ_ID,
    SEQ_IMAGE,
    SEQ_KIND,
    SEQ_ROW,
    SEQ_T,
    SEQ_TEXT,
    SEQ_VIDEO,
    STEP,
    STEP_POSITION,
    STEP_TOKEN,
    STEP_TOKEN_ID,
    TOKEN,
    TOKEN_COL,
    TOKEN_COLS,
    TOKEN_IMAGE,
    TOKEN_KIND,
    TOKEN_MEMBERS,
    TOKEN_ROW,
    TOKEN_ROWS,
    TOKEN_SIZE,
    TOKEN_T,
    TOKEN_TEXT,
    TOKEN_VIDEO,
    TOP_CHANGED,
    WINDOW,
    WINDOW_END,
    WINDOW_START,
)

CONVENTIONS = "CF-1.10"
CF_METADATA: dict[str, tuple[str, str | None]] = {
    RESIDUAL: ("change of the decoder layer output at the measured position, knockout vs clean", "1"),
    HEADS: ("change of each attention head's output at the measured position, knockout vs clean", "1"),
    KL: ("KL divergence of the next-token distribution, clean from knocked out, in nats", "1"),
    LOGPROB_DROP: ("drop of the clean top token's log-probability (nats) under the knockout", "1"),
    PROB_CHANGE_PCT: ("relative change of the clean top token's probability under the knockout", "percent"),
    TOP_CHANGED: ("whether the knockout changed the top next token", None),
    MASKED_TOKEN_ID: ("greedy next token id under the knockout", None),
    MASKED_CONTINUATION: ("greedy continuation under the knockout, decoded", None),
    CLEAN_TOP_LOGPROB: ("log-probability (nats) of the clean top token in the clean run", "1"),
    STEP: ("teacher-forced generation step", "1"),
    STEP_TOKEN: ("clean next token of the step, decoded", None),
    STEP_TOKEN_ID: ("clean next token id of the step", None),
    STEP_POSITION: ("measured position: the last position of the step's sequence", "1"),
    TOKEN: ("first position of the masked unit", "1"),
    TOKEN_TEXT: ("text of the masked unit's first token", None),
    TOKEN_KIND: ("kind of the masked unit: text, vision or special", None),
    TOKEN_MEMBERS: ("positions of the masked unit, comma-separated", None),
    TOKEN_SIZE: ("number of positions in the masked unit", "1"),
    TOKEN_IMAGE: ("image index of the masked unit (-1: none)", "1"),
    TOKEN_VIDEO: ("video index of the masked unit (-1: none)", "1"),
    TOKEN_T: ("frame group of the masked unit (-1: none)", "1"),
    TOKEN_ROW: ("first merged-token grid row of the masked unit (-1: none)", "1"),
    TOKEN_COL: ("first merged-token grid column of the masked unit (-1: none)", "1"),
    TOKEN_ROWS: ("grid rows the masked unit spans", "1"),
    TOKEN_COLS: ("grid columns the masked unit spans", "1"),
    INTERVENTION: ("index of the knocked-out intervention", "1"),
    INTERVENTION_TYPE: ("type of the knocked-out intervention", None),
    INTERVENTION_JSON: ("the knocked-out intervention as JSON", None),
    WINDOW: ("centre decoder layer of the knocked-out layer window", "1"),
    WINDOW_START: ("first decoder layer of the window", "1"),
    WINDOW_END: ("last decoder layer of the window", "1"),
    LAYER: ("decoder layer", "1"),
    HEAD: ("attention head", "1"),
    METRIC: ("vector metric: l2, cosine (1 - cosine similarity) or rel_l2", None),
    SEQ: ("position in the model input", "1"),
    SEQ_ID: ("token id at the position", None),
    SEQ_TEXT: ("token at the position, decoded", None),
    SEQ_KIND: ("kind of the position: text, vision or special", None),
    SEQ_IMAGE: ("image index of the position (-1: none)", "1"),
    SEQ_VIDEO: ("video index of the position (-1: none)", "1"),
    SEQ_T: ("frame group of the position (-1: none)", "1"),
    SEQ_ROW: ("merged-token grid row of the position (-1: none)", "1"),
    SEQ_COL: ("merged-token grid column of the position (-1: none)", "1"),
}
"""CF ``long_name`` and ``units`` of each variable and coordinate (None: no units, for text, ids and flags).

A new variable gets its metadata from one entry here.

Example:
    >>> CF_METADATA[PROB_CHANGE_PCT][1], CF_METADATA[LAYER]
    ('percent', ('decoder layer', '1'))
"""
