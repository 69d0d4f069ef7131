"""Deciding again, from what an output stored, which samples each filter keeps: the what-if of
`bricks-dj refilter`. Nothing is decoded and no model runs.

The replayed steps are those after the last segmenter or fan-out (and after the operators that
run on the source before it is decoded): each sample they saw is one row of the output, kept
(in the shards, with every column) or dropped or failed (in the rejects, with the scores that
decided and, since rejects carry `fields`, the sample's columns at the decision). Samples go
through these steps again in recipe order:

- a changed filter decides with its own `keep` and the new parameters, on the scores the
  sample had when it passed (its stored columns; a filter that needs no frames scores the
  stored fields again with its own `score`, unless it opens media or models itself, as
  Data-Juicer's filters do) or when it was dropped (the reject's `scores`);
- an unchanged step decides as it did (same scores, same parameters);
- a sample a loosened filter brings back goes through the steps it never reached: those
  that need no frames and no model run on its stored fields (with the engine's own
  `apply_step`); one that does is refused, since it would need decoding or the model;
- failed samples stay failed at the step that failed them;
- where the last fan-out keeps its parent (`FanOut.keeps_parent`: `middle_frame` gives the clip,
  then its image), a filter before it decides on the clip, and a clip it drops takes the samples
  made from it along (they never exist in a re-run); bringing one back needs the fan-out's frames.

Before the new thresholds, the changed filters decide again with the old ones (`checking`):
every sample must get the outcome OUT recorded, or the stored scores are not what the filters
decided on. Where the stored rows cannot say what a re-run would decide, `RefilterError` says
why in one line; the caller refuses the whole what-if.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .operator import FanOut, Filter, Mapper, ModelOperator, Segmenter
from .pipeline import NoFrames, OpStats, SourceResult, apply_step, describe_error
from .plan import Plan, Step
from .rows import DROPPED, FAILED, KEPT, reject_record, verdict
from .schema import BASE_COLUMNS, fit_columns

LABEL = re.compile(r"(\d+):(.+)")


class RefilterError(ValueError):
    """A what-if that the stored rows cannot answer; one line."""


@dataclass
class Stored:
    """One sample that reached the replayed steps, as the output holds it."""

    uri: str
    status: str  # kept | dropped | failed
    at: int | None  # the step index that dropped or failed it
    row: dict[str, Any]  # kept: the shard row; else the sample's fields at the decision
    reject: dict[str, Any] | None = None  # the reject row


@dataclass
class Outcome:
    status: str
    row: dict[str, Any] | None  # kept: the row to write
    reject: dict[str, Any] | None  # dropped or failed: the reject row to write
    brought_back: bool = False


@dataclass
class Replay:
    """The replayed steps and the changes; `run` decides one sample at a time."""

    plan: Plan  # the new recipe's (the old one's, to check that the stored scores decide as it did)
    changed: set[int]
    checking: bool = False  # a sample brought back ends there, as a mismatch (nothing runs for it)
    steps: list[Step] = field(init=False)
    final: set[int] = field(init=False)

    def __post_init__(self) -> None:
        self.steps = replayed_steps(self.plan)
        self.final = {s.index for s in self.plan.final_steps}

    @property
    def keeper(self) -> Step | None:
        """The fan-out among the replayed steps (one that keeps its parent), if any."""
        return next((s for s in self.steps if isinstance(s.op, FanOut)), None)

    def run_group(self, parent: Stored, children: list[Stored], stats: dict[str, OpStats]) -> list[Outcome]:
        """A sample the keeping fan-out split (`parent`, as its first child holds it) and the
        samples it made (`children`, the first among them): the parent decided at the steps
        before the fan-out, then each child at the steps after it."""
        keeper = self.keeper
        state = parent.row
        for step in self.steps:
            if step.index >= keeper.index:
                break
            st = stats.setdefault(step.label, OpStats())
            if not self._reaches(step, state):
                continue
            st.n_in += 1
            if step.index in self.changed and step.op.applies_to(state):
                scores = self._stored_scores(step, state, parent)
                reason = _decide(step, scores, parent)
                if reason is not None:
                    st.dropped += 1
                    fields = self._before(keeper, state)
                    return [Outcome(DROPPED, None, reject_record(parent.uri, fields, step.label, DROPPED, reason,
                                                                 scores))]
            st.n_out += 1
        st = stats.setdefault(keeper.label, OpStats())
        st.n_in += 1
        st.n_out += len(children)
        return [self.run(child, stats, after=keeper.index) for child in children]

    def _before(self, keeper: Step, state: dict[str, Any]) -> dict[str, Any]:
        """A parent's fields as they were before the fan-out: without the columns of the steps
        from it on, and without media (which those steps made)."""
        later = {c for s in self.steps if s.index >= keeper.index for c in s.op.outputs}
        return {k: (None if k in ("media", "media_format") else v) for k, v in state.items() if k not in later}

    def run(self, sample: Stored, stats: dict[str, OpStats], after: int | None = None) -> Outcome:
        state = sample.row
        back = False
        for step in self.steps:
            i, op = step.index, step.op
            if after is not None and i <= after:
                continue  # decided for the sample's parent (`run_group`)
            counted = self._reaches(step, state)
            st = stats.setdefault(step.label, OpStats())
            if back:
                outcome = self._fresh(step, sample, state, st)
                if isinstance(outcome, Outcome):
                    return outcome
                state = outcome
                continue
            if counted:
                st.n_in += 1
            if sample.status == FAILED and i == sample.at:
                st.failed += 1
                return Outcome(FAILED, None, sample.reject)
            if sample.status == DROPPED and i == sample.at:
                if i not in self.changed:
                    st.dropped += 1
                    return Outcome(DROPPED, None, sample.reject)
                scores = json.loads(sample.reject["scores"] or "{}")
                reason = _decide(step, scores, sample)
                if reason is not None:
                    st.dropped += 1
                    return Outcome(DROPPED, None, dict(sample.reject, reason=reason))
                state, back = dict(state), True
                st.n_out += 1
                if self.checking:
                    return Outcome(KEPT, None, None, brought_back=True)
                continue
            if i in self.changed and sample.status != FAILED:
                if op.applies_to(state):
                    scores = self._stored_scores(step, state, sample)
                    reason = _decide(step, scores, sample)
                    if reason is not None:
                        st.dropped += 1
                        return Outcome(DROPPED, None, reject_record(sample.uri, state, step.label, DROPPED, reason, scores))
            if counted:
                st.n_out += 1
        if back:
            return Outcome(KEPT, _restorable(state, sample), None, brought_back=True)
        if sample.status != KEPT:
            raise RefilterError(f"internal error: sample {sample.reject['sample_id']} kept no outcome")
        return Outcome(KEPT, state, None)

    def _reaches(self, step: Step, state: dict[str, Any] | None) -> bool:
        # Per-source steps count the samples they apply to; the model stages (and the steps
        # after them) count every sample that reaches them.
        return step.index in self.final or step.op.applies_to(state)

    def _stored_scores(self, step: Step, state: dict[str, Any], sample: Stored) -> dict[str, Any]:
        op = step.op
        if scores_again(op):
            return fit_columns(op.score(dict(state), []), {**BASE_COLUMNS, **op.outputs}, op.name)
        missing = [c for c in op.outputs if state.get(c) is None]
        if missing and len(missing) == len(op.outputs):  # a Data-Juicer filter may leave some stats unwritten
            which = sample.reject["sample_id"] if sample.reject else state.get("sample_id")
            raise RefilterError(f"{step.label}: sample {which} has no stored {missing[0]} (it was never "
                                "computed); re-run the recipe")
        return {c: state[c] for c in op.outputs}

    def _fresh(self, step: Step, sample: Stored, state: dict[str, Any], st: OpStats):
        """A brought-back sample at a step it never reached: its new state, or its outcome."""
        op = step.op
        if not op.applies_to(state):
            if step.index in self.final:
                st.n_in += 1
                st.n_out += 1
            return state
        if isinstance(op, ModelOperator) or op.needs_frames or not op.reruns_on_fields:
            needs = "needs a model" if isinstance(op, ModelOperator) else "needs frames" if op.needs_frames else \
                "opens the media (or a model) itself"
            raise RefilterError(f"the new thresholds would bring back samples (such as {sample.reject['sample_id']}) "
                                f"that never reached {step.label}, which {needs}; re-run the recipe")
        result = SourceResult(sample.uri)
        out = apply_step(step, state, NoFrames(), None, result)
        st.add(result.ops[step.label])
        if out:
            return out[0]
        reject = result.rejects[0]
        return Outcome(reject["status"], None, reject, brought_back=True)


def _decide(step: Step, scores: dict[str, Any], sample: Stored) -> str | None:
    """The step's verdict on stored scores; a decision that cannot be made from them refuses
    the what-if."""
    try:
        return verdict(step.op, scores, stored=True)
    except Exception as exc:
        which = sample.reject["sample_id"] if sample.reject else sample.row.get("sample_id")
        raise RefilterError(f"{step.label}: sample {which} cannot be decided again from its stored scores "
                            f"({describe_error(exc)}); re-run the recipe") from exc


def replayed_steps(plan: Plan) -> list[Step]:
    """The steps after the last segmenter or fan-out, which see the output's own samples; or,
    where the last fan-out keeps its parent (`middle_frame`: the clip, then its image), after
    the one before it: each output row is then a sample, or a child of one, across it."""
    ordered = plan.post + plan.final_steps
    splits = [k for k, s in enumerate(ordered) if isinstance(s.op, (FanOut, Segmenter))]
    if splits and getattr(ordered[splits[-1]].op, "keeps_parent", False):
        splits.pop()
    return ordered[splits[-1] + 1 if splits else 0:]


def scores_again(op) -> bool:
    """A filter that needs no frames and no model scores a sample from its fields alone: its
    score is computed again from the stored fields, as the engine computed it."""
    return isinstance(op, Filter) and not op.needs_frames and op.reruns_on_fields


def check_changes(plan: Plan, changed: dict[int, list[str]]) -> None:
    """Refuse what the stored rows cannot answer: a parameter that is not a threshold, a step
    before the replayed ones, scores a later step may have overwritten."""
    replayed = {s.index for s in replayed_steps(plan)}
    for index, params in sorted(changed.items()):
        step = plan.steps[index]
        op = step.op
        where = f"process[{index}] {op.name}.{params[0]}"
        if not isinstance(op, (Filter, ModelOperator)) or (isinstance(op, ModelOperator) and
                                                            type(op).keep is ModelOperator.keep):
            raise RefilterError(f"{where}: {op.name} is not a filter; changing it needs decoding (or its model) "
                                "again: re-run the recipe")
        other = next((p for p in params if p not in op.thresholds), None)
        if other is not None:
            named = ", ".join(op.thresholds) if op.thresholds else "none"
            raise RefilterError(f"process[{index}] {op.name}.{other}: not a threshold that {op.name} decides with "
                                f"from stored scores (those are: {named}); changing it needs its scores computed "
                                "again: re-run the recipe")
        if index not in replayed:
            before = "runs on the source before it is decoded" if step in plan.pre else \
                "runs before the last segmenter or fan-out, on samples that are not the output's rows"
            raise RefilterError(f"{where}: {op.name} {before}; its scores are not stored per sample: re-run the recipe")
        later = plan.steps[index + 1:]
        if scores_again(op):
            mapper = next((s for s in later if isinstance(s.op, Mapper) or
                           (isinstance(s.op, ModelOperator) and type(s.op).keep is ModelOperator.keep)), None)
            if mapper is not None:
                raise RefilterError(f"{where}: {op.name} scores the sample's fields, which {mapper.label} may have "
                                    "changed after it decided; re-run the recipe")
        else:
            clash = next(((s, c) for s in later for c in op.outputs if c in s.op.outputs), None)
            if clash is not None:
                raise RefilterError(f"{where}: its column '{clash[1]}' is written again by {clash[0].label}, so the "
                                    f"stored value is not the one {op.name} decided on; re-run the recipe")


def _restorable(state: dict[str, Any], sample: Stored) -> dict[str, Any]:
    """A brought-back sample's row; refused where the rejects could not keep a column."""
    if state.get("media_format") is not None:
        raise RefilterError(f"the new thresholds would bring back samples (such as {sample.reject['sample_id']}) "
                            "with media, which the rejects do not keep; re-run the recipe")
    return dict(state, media=None)


def step_of(label: str | None) -> int | None:
    """The step index of a reject's `op` label ("3:motion_filter"); None for "read", "decode"..."""
    match = LABEL.fullmatch(label or "")
    return int(match.group(1)) if match else None
