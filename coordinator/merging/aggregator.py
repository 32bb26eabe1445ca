"""The trusted side of a round: take in uploads, then merge the round exactly once.

``Aggregator`` has no Celery in it; ``tasks.aggregation`` calls it. It keeps
only caches (run contexts) between calls: all round state is in Redis. Each
volunteer has one voice per round: its accepted deltas are combined
(sample-weighted) before the norm screen and the strategy weigh them against
other volunteers'. A round that cannot be merged (a failing strategy or
evaluation, a non-finite result) fails with its reason after ``MAX_ATTEMPTS``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from broker import keys
from broker.renewal import renewing
from broker.settings import DEFAULT_MERGE_CACHE_MB
from coordinator.merging import heap, split, work
from coordinator.merging.downlink import lossy
from coordinator.merging.judging import (
    Rejection,
    check_copies,
    check_replicas,
    last_update,
    probe_voices,
    sketch_voices,
    voices,
)
from coordinator.merging.plan import RoundPlan
from coordinator.merging.privacy import PrivateStrategy, spent
from coordinator.merging.publishing import Publisher, merged_voice_norms, round_summary
from coordinator.merging.reading import RoundReader, SketchCache, weight_of
from coordinator.merging.sampling import Selection, reputations_after, select
from coordinator.merging.strategies import Strategy, make_strategy
from coordinator.merging.sybils import Plan, clip_scale, plan_round
from coordinator.merging.verification import sketch, weigh
from coordinator.rounds.intake import Intake, Verdict
from coordinator.rounds.leases import Leases
from coordinator.rounds.state import CLAIM_LEASE
from coordinator.rounds.validation import all_finite, delta_norm, printable, screen_norms
from coordinator.runs import checkpoints, slicing
from coordinator.runs.context import RunContext, RunContexts
from coordinator.runs.revocation import split_revoked
from coordinator.store import Store
from serialization import TensorDict, dumps_stream, loads

log = logging.getLogger("crowdtrain.aggregator")

MAX_ATTEMPTS = 3


class Aggregator:
    """Validates uploads and aggregates rounds for every run on one broker."""

    def __init__(
        self,
        store: Store,
        home: Path,
        name: str = "aggregator",
        keep_versions: int = keys.KEEP_VERSIONS,
        cache_bytes: int = DEFAULT_MERGE_CACHE_MB << 20,
    ) -> None:
        self.store = store
        self.home = home
        self.name = name
        self.keep_versions = keep_versions
        # the round being merged: its accepted copies, each read from Redis once
        self.reader = RoundReader(store, cache_bytes)
        self.contexts = RunContexts(store)
        # who answers which shard: the intake loop grants leases and counts only leased uploads
        self.leases = Leases(store, self.contexts)
        # what follows a merge: the commit, credit, reputations, the disk; it keeps the version
        # it published last, so the next round starts from it instead of reading it back
        self.publisher = Publisher(store, home, self.leases.capabilities, keep_versions)
        # the intake sketches each copy as it decodes it: judging takes a one-shard voice's from here
        self.intake = Intake(store, self.contexts, self.leases, SketchCache(cache_bytes // 2))
        # how a sliced round's planner asks other aggregators for help (``merge_slices`` on queue
        # ``aggregate``); None: it merges every slice itself
        self.send: Callable[[str, list], None] | None = None
        self.splits = split.SplitMerges(store.redis)

    def validate(self, run: str, number: int, shard: int, token: str, volunteer: str) -> Verdict:
        """Check one shard's upload and count it at most once (see ``coordinator.rounds.intake``)."""
        return self.intake.validate(run, number, shard, token, volunteer)

    def aggregate(self, run: str, number: int) -> dict[str, Any] | None:
        """Merge the round if its quorum or deadline is reached; None if not ours to do."""
        owner = f"{self.name}:{uuid.uuid4().hex}"
        if self.store.rounds.claim(run, number, owner) != "claimed":
            return None
        started = time.time()
        with _renewing(self.store, run, number, owner):
            try:
                summary = self._aggregate_claimed(run, number, owner, started)
            except Exception as e:
                summary = self._after_error(run, number, owner, e)
            finally:
                self.reader.clear()
                self.intake.sketches.forget_through(run, number)
                heap.give_back()  # what the round freed: an idle aggregator holds no round's memory
        if summary is not None:
            self.contexts[run].mode.after_merge(self.store, run)
        return summary

    def merge_slices(self, run: str, number: int) -> int:
        """Merge slices of a sliced round's plan while any is free (``coordinator.merging.split``).

        Returns how many this call merged; 0 when the round has no plan (it is
        merged already) or every slice is taken.
        """
        plan = self.splits.load(run, number)
        if plan is None:
            return 0
        context = self.contexts[run]
        owner = f"{self.name}:{uuid.uuid4().hex}"
        done = 0
        # a slice task reads each of its uploads once and keeps none: the round's cache is the planner's
        kept, self.reader = self.reader, RoundReader(self.store, 0)
        try:
            while (position := self.splits.take(run, number, plan, owner)) >= 0:
                done += self._merge_slice(context, number, plan, position, owner)
        finally:
            self.reader = kept
        return done

    def _merge_slice(
        self, context: RunContext, number: int, plan: split.MergePlan, position: int, owner: str
    ) -> int:
        """Merge and stage one slice of a plan for its planner; 1."""
        run = context.name
        tensors, state = self._merge_part(context, number, plan, position, owner)
        key = keys.staged_slice(run, number, plan.id, position, owner)
        self.store.stage_slice(run, key, dumps_stream(split.pack_slice(tensors, state)))
        del tensors, state
        outcome = self.splits.staged(run, number, plan, position, key)
        if outcome != "staged":  # merged again by another, or the round moved on: ours goes
            self.store.delete_upload(key)
        log.info("merged slice %d of %s round %d (%s)", plan.parts[position].index, run, number, outcome)
        return 1

    # --- one round -----------------------------------------------------------
    def _aggregate_claimed(self, run: str, number: int, owner: str, started: float) -> dict[str, Any] | None:
        """plan (which voices, at what weight: data) -> merge (the strategy) -> publish (commit, then what
        follows); a round that cannot be merged fails with its reason."""
        context = self.contexts[run]
        info = self.store.rounds.info(run, number) or {}
        base = int(info["base_version"])
        weights, kept_state = self._base(context, base)
        if not checkpoints.has_version(self.home, run, base):  # its aggregator died before writing it
            self.publisher.catch_up(context, base, weights)
        plan = self._plan(context, number, info, weights)
        heap.give_back()  # the probe's model and the deltas judging decoded: the merge's room
        for shard, volunteer in plan.revoked.items():  # revoked while the round was merged: no credit
            self.store.rounds.reject_claimed(run, number, shard, volunteer, "revoked")
        for shard, volunteer, reason in plan.rejections:
            self.store.rounds.reject_claimed(run, number, shard, volunteer, reason)
            self.store.credit(volunteer, run=run, rejected=1)
            log.warning("rejected %s round %d shard %d from %s: %s", run, number, shard, volunteer, reason)
        summary = self._round_summary(context, number, info, plan)
        if plan.failure is not None:
            if plan.reputations and not plan.used:  # every voice judged was rejected: a lone attacker too
                self.store.set_reputations(reputations_after(plan.reputations, plan.selection, ()), run=run)
            return self.publisher.fail(context, number, owner, info, summary, plan.failure)
        clip = None
        if context.slices:  # slice by slice, shared with the other aggregators (coordinator.merging.split)
            shared = self._merge_split(
                context, number, owner, base, weights, plan.used, plan.metas, plan.reputations, plan.sybils
            )
            if shared is None:
                log.warning("round %d of %s not published: its claim was taken over", number, run)
                return None
            merged, strategy_state = shared
        else:
            merged, strategy, clip = self._merge(
                context, weights, plan.used, plan.metas, plan.reputations, plan.sybils, kept_state
            )
            # Each model-sized object goes as soon as it is done with: the strategy's scratch,
            # the base (views of its blob), the evaluation's model; the peak stays under 4x.
            strategy_state = strategy.state_dict()
            del strategy
        if not all(all_finite(t) for t in merged.values()):
            return self.publisher.fail(
                context, number, owner, info, summary, "the merged model has non-finite values"
            )
        weights = self.publisher.publishable(context, weights, merged, base + 1, owner)
        del merged
        done = self.publisher.publish(
            context, number, owner, info, plan, weights, strategy_state, clip, summary
        )
        if done is not None:
            log.info(
                "round %d of %s -> version %d, eval_loss %.4f (%d accepted, %.2fs merging)",
                number,
                run,
                base + 1,
                done.get("eval_loss", math.nan),
                len(plan.used),
                time.time() - started,
            )
        return done

    def _plan(self, context: RunContext, number: int, info: dict, weights: TensorDict) -> RoundPlan:
        """Which accepted voices the round merges, and how: screen, replicas, work, judging, Sybils.

        Returns data; nothing is written (the caller records the rejections).
        """
        run, base = context.name, int(info["base_version"])
        copies = self.store.rounds.accepted_uploads(run, number)
        copies, revoked = split_revoked(self.store.redis, copies)  # revoked while the round was merged
        metas, norms, screened = self._screen(context, number, copies)
        for meta in metas.values():  # asynchronous runs: how many versions old each delta is
            meta["staleness"] = base - int(meta.get("base_version", base))
        rejections = [(s, keys.volunteer_of(copies[s]), reason) for s, reason in screened.items()]
        used = {s: k for s, k in copies.items() if s in metas and s not in screened}
        plan = RoundPlan(used=used, metas=metas, norms=norms, rejections=rejections, revoked=revoked)

        def read(key: str, out: dict[int, dict], shard: int) -> TensorDict | None:
            return self.reader.delta(context, key, out, shard)

        if context.config.replicate:
            replicas = self.store.rounds.replicas(run, number)
            plan.rejections += check_replicas(context.job, weights, replicas, used, metas, norms, read)
        if context.config.work_check and used:  # proof of work: a sample of shards replayed
            owners = list(voices(used))
            record = work.records(self.store.redis, owners)
            plan.checked = work.check_work(
                context.job,
                context.config,
                run,
                number,
                int(info["shards"]),
                weights,
                used,
                metas,
                record,
                read,
                norms,
            )
            caught = {name for _, name, _ in plan.checked.rejections}
            work.forfeit(self.store.redis, caught)
            for name in sorted(caught):  # on disk too, so a restore does not give the credit back
                if self.store.ledger is not None:
                    self.store.ledger.forfeit(run, name)
            plan.rejections += plan.checked.rejections
        sketches: dict[str, torch.Tensor] = {}
        if used and context.privacy is None:  # with DP nothing judges one person's delta by itself
            judged: list[Rejection] = []
            for names, part in slicing.parts(context, used):  # a sliced run's voices, slice by slice
                found, chosen = self._judge(
                    context, base, weights, part, metas, plan.reputations, sketches, names
                )
                judged += found
                plan.selection = Selection(
                    plan.selection.judged | chosen.judged,
                    plan.selection.sampled | chosen.sampled,
                    plan.selection.skipped | chosen.skipped,
                )
            plan.rejections += judged
            plan.used = {s: k for s, k in used.items() if s not in {shard for shard, _, _ in judged}}
        count, needed = len(voices(plan.used)), context.config.min_voices
        if not plan.used:
            plan.failure = "no accepted deltas"
        elif count < needed:
            had = f"{count} voice{'s' if count != 1 else ''}"
            plan.failure = f"{had} (volunteers) with accepted deltas, {needed} needed (--min-voices)"
        elif (
            context.privacy is None
        ):  # probation, similarity groups and clipping (coordinator.merging.sybils)
            history, spoken = self.store.voice_norms(run), merged_voice_norms(plan.used, norms)
            names = list(voices(plan.used))
            drop = context.config.outliers == "drop" and not context.slices  # init --outliers drop
            plan.sybils = plan_round(
                self.store, run, names, sketches, spoken, history, plan.reputations, drop
            )
            if context.slices:  # voices of different slices have norms that do not compare
                plan.sybils.bound = None
        return plan

    def _round_summary(self, context: RunContext, number: int, info: dict, plan: RoundPlan) -> dict[str, Any]:
        """The round's summary so far: what was merged, and what the checks found."""
        summary = round_summary(context, number, info, plan.metas, plan.used)
        if plan.checked is not None:
            summary.update(work.summary(plan.checked))
        if plan.failure is not None:
            return summary
        summary["mean_delta_norm"] = sum(plan.norms[s] for s in plan.used) / len(plan.used)
        summary.update(context.mode.summary(plan.metas, plan.used))
        if context.privacy is not None:
            summary["epsilon"] = spent(context.privacy, int(info["base_version"]) + 1)
        if plan.sybils is not None and plan.sybils.outliers:  # --outliers drop: merged at weight 0
            summary["outliers"] = sorted(plan.sybils.outliers)
        return summary

    def _screen(
        self, context: RunContext, number: int, copies: dict[int, str]
    ) -> tuple[dict[int, dict], dict[int, float], dict[int, str]]:
        """Each accepted delta's meta and norm; norm outliers, one voice per volunteer.

        The intake recorded both when it decoded each copy (``RoundState.facts``);
        only a copy it did not record (accepted by an earlier version) is decoded here.
        """
        metas: dict[int, dict] = {}
        norms: dict[int, float] = {}
        rejections: dict[int, str] = {}
        facts = self.store.rounds.facts(context.name, number, list(copies.values()))
        unrecorded = {s: k for s, k in copies.items() if k not in facts}
        recorded = [k for k in copies.values() if k in facts]
        present = {k for k, (_, stored) in zip(recorded, self.store.upload_sizes(recorded)) if stored}
        for shard, key in copies.items():
            if key in facts and key in present:
                metas[shard], norms[shard] = dict(facts[key].meta), facts[key].norm
            elif key in facts:
                rejections[shard] = "upload expired before aggregation"
        for shard, blob in zip(unrecorded, self.reader.blobs(context, list(unrecorded.values()))):
            delta = self.reader.decode(context, blob, metas, shard)
            if delta is None:
                rejections[shard] = "upload expired before aggregation"
                continue
            norms[shard] = delta_norm(delta)
            del delta
        owners = {shard: keys.volunteer_of(copies[shard]) for shard in norms}
        ratio = float(context.config.max_norm_ratio)
        if context.slices:  # slices differ in norm: each delta is compared within its own
            rejections.update(slicing.screen(norms, owners, len(context.slices), ratio, context.model_norm))
        elif context.privacy is None:
            history = self.store.voice_norms(context.name)
            rejections.update(screen_norms(norms, owners, ratio, context.model_norm, history))
        # With DP no screen: clipping bounds every voice, and a screen that judges one volunteer
        # by the others' norms would let one person's data decide whether another's counts.
        return metas, norms, rejections

    def _judge(
        self,
        context: RunContext,
        base: int,
        weights: TensorDict,
        used: dict[int, str],
        metas: dict[int, dict],
        reputations: dict[str, float | None],
        sketches: dict[str, torch.Tensor],
        names: list[str] | None = None,
    ) -> tuple[list[Rejection], Selection]:
        """Copies of another voice or of the last update (``copy``); with ``--verify probe``, each
        judged voice's effect on the probe (``probe``), a round of one voice included: every voice
        up to ``--probe-voices``, else a sample (``coordinator.merging.sampling``), drawn now that the
        uploads are in. ``reputations`` is filled in for a probed round, whose merge weighs by them;
        ``sketches`` with each voice's ``sketch``. With ``names`` (one slice's voices) the last
        update is that slice's tensors only."""

        def read(shards: list[int]) -> TensorDict:
            return self.reader.voice(context, used, metas, shards)[1]

        def known(shards: list[int]) -> tuple[float, torch.Tensor] | None:  # as the intake took them
            return self.intake.sketches.get(used[shards[0]]) if len(shards) == 1 and names is None else None

        probed: list[Rejection] = []
        previous = self._previous_version(context, base)
        view = weights if names is None else {k: weights[k] for k in names}
        # The copy check needs only the last update's sketch, formed tensor by tensor; a lone
        # voice is also probed against the whole update, which only then is held.
        last_sketch = sketch(view, minus=previous) if previous is not None else None
        lone = _probes(context) and len(voices(used)) == 1
        last = last_update(view, previous) if lone and previous is not None else None
        del previous
        selection = Selection(frozenset())
        if _probes(context):
            reputations.update(self.store.reputations(list(voices(used))))
            selection = select(reputations, context.config.probe_voices)
            history = self.store.voice_norms(context.name)
            usual = statistics.median(history) if history else None
            # the judged voices, judged as a round of their own (the share, medians and agreement
            # are theirs); the others are merged by reputation, screened and copy-checked
            judged = {s: k for s, k in used.items() if keys.volunteer_of(k) in selection.judged}
            probed = probe_voices(
                context.job, weights, judged, read, reputations, usual, sketches, last, known
            )
            sketches.update(sketch_voices({s: k for s, k in used.items() if s not in judged}, read, known))
        else:
            sketches.update(sketch_voices(used, read, known))
        copied = check_copies(used, sketches, last_sketch, reputations)
        shards = {shard for shard, _, _ in copied}
        return copied + [entry for entry in probed if entry[0] not in shards], selection

    def _base(self, context: RunContext, base: int) -> tuple[TensorDict, TensorDict | None]:
        """Version ``base`` and, if this process published it, the strategy state after it.

        A version this process published is taken from memory (and given up:
        the merge updates it in place); any other is read from Redis, and its
        strategy state is read by ``_merge``.
        """
        kept = self.publisher.kept.pop(context.name, None)
        if kept is not None and kept[0] == base:
            return kept[1], kept[2]
        weights, _ = loads(self.contexts.model_blob(context.name, base))
        return weights, None

    def _previous_version(self, context: RunContext, base: int) -> TensorDict | None:
        """Version ``base - 1``, views of its blob (None for version 0, or once it left Redis)."""
        if base < 1:
            return None
        blob = self.store.model_blob(context.name, base - 1)
        if blob is None:
            return None
        return loads(blob)[0]

    def _merge(
        self,
        context: RunContext,
        base: TensorDict,
        used: dict[int, str],
        metas: dict[int, dict],
        reputations: dict[str, float | None],
        plan: Plan | None = None,
        kept_state: TensorDict | None = None,
    ) -> tuple[TensorDict, Strategy, float | None]:
        """Second pass: one combined delta per volunteer through the strategy.

        Returns the new weights, the strategy and, with adaptive clipping, the
        next round's clip. With ``reputations`` (a judged round) each voice
        weighs by its samples times its volunteer's reputation. With a ``plan``
        (``coordinator.merging.sybils``) each weight is scaled by probation and similarity
        groups, and a voice longer than its clip bound is scaled down to it.
        """
        # ``base`` is views of its blob (a bytearray: writable), which nothing reads after the
        # merge unless a lossy downlink publishes base + update: only then is a copy needed, and
        # the strategy makes it once the deltas are summed (not beside the last one decoded).
        keep_base = lossy(context.config.downlink_compression)
        weights = dict(base)
        strategy = _strategy_maker(context)()
        if kept_state is not None:  # the state this process published with the base
            state = kept_state
        else:
            state_blob = self.store.strategy_blob(context.name)
            state = loads(state_blob)[0] if state_blob else {}
        if state:
            strategy.load_state_dict(state)
        if context.privacy is not None:  # DP-FedAvg: the strategy applies the noised mean of clipped voices
            clip = self.store.dp_clip(context.name) or context.privacy.clip
            strategy = PrivateStrategy(strategy, context.privacy, clip)

        def deltas(used: dict[int, str] = used) -> Iterator[tuple[float, TensorDict]]:
            for name, shards in voices(used).items():
                samples, delta = self.reader.voice(context, used, metas, shards)
                weight = _voice_weight(name, samples, reputations, plan)
                if plan is not None:
                    _scale(delta, clip_scale(delta_norm(delta), plan.bound))
                yield weight, delta
                # before the next voice is decoded: one decoded delta in memory at a time, not two (a
                # delta's tensors are views of one arena, so any of them kept keeps all of it)
                del delta

        weights = strategy.aggregate(weights, deltas(), copy=keep_base)
        next_value = strategy.next_clip if isinstance(strategy, PrivateStrategy) else None
        return weights, strategy, next_value

    def _merge_split(
        self,
        context: RunContext,
        number: int,
        owner: str,
        base: int,
        weights: TensorDict,
        used: dict[int, str],
        metas: dict[int, dict],
        reputations: dict[str, float | None],
        plan: Plan | None,
    ) -> tuple[TensorDict, TensorDict] | None:
        """A sliced round's merge, as its planner: (the new weights, the strategy state after them).

        The plan records each slice's voices, their shards and weights (as
        ``_merge`` weighs them); this aggregator merges slices while any is
        free, then waits for those others hold. Each tensor is merged from the
        deltas that trained it; a tensor of a slice no accepted delta touched
        keeps its bytes. None if the round's claim was taken over meanwhile.
        """
        run = context.name
        parts = []
        for index, shards in slicing.by_slice(used, len(context.slices)).items():
            part = {s: used[s] for s in shards}
            merged_voices = []
            for name, voice_shards in voices(part).items():
                # as ``RoundReader.voice`` totals them
                samples = sum(weight_of(metas[s]) for s in voice_shards)
                weight = float(_voice_weight(name, samples, reputations, plan))
                entries = tuple(
                    split.Shard(s, used[s], int(metas[s]["samples"]), int(metas[s].get("staleness", 0)))
                    for s in voice_shards
                )
                merged_voices.append(split.Voice(name, weight, entries))
            parts.append(split.Part(index, tuple(merged_voices)))
        merge_plan = split.MergePlan(uuid.uuid4().hex, base, tuple(parts))
        self.splits.record(run, number, merge_plan)
        if self.send is not None:
            for _ in merge_plan.parts[1:]:
                self.send("merge_slices", [run, number])
        mine: dict[int, tuple[TensorDict, TensorDict]] = {}
        while (position := self.splits.take(run, number, merge_plan, owner)) != split.ALL_STAGED:
            if position >= 0:
                mine[position] = self._merge_part(context, number, merge_plan, position, owner, weights)
                self.splits.staged(run, number, merge_plan, position, "")
            elif position == split.GONE or not split.holds(self.store.redis, run, number, owner):
                return None
            else:  # the rest are held by other aggregators: wait for them, or for a lease to run out
                time.sleep(split.SLICE_POLL)
        staging = self.splits.staging(run, number, merge_plan)
        if staging is None:
            return None
        state_blob = self.store.strategy_blob(run)
        state = dict(loads(state_blob)[0]) if state_blob else {}
        merged = dict(weights)
        for position in range(len(merge_plan.parts)):
            if position in mine:
                tensors, part_state = mine.pop(position)
            else:
                blob = self.store.staged_slice(staging[position])
                if blob is None:
                    raise LookupError(f"slice {position} of the round's merge left Redis before the commit")
                tensors, part_state = split.unpack_slice(loads(blob)[0])
            merged.update(tensors)
            state.update(part_state)
        self.splits.clear(run, number, merge_plan)
        return merged, state

    def _merge_part(
        self,
        context: RunContext,
        number: int,
        plan: split.MergePlan,
        position: int,
        owner: str,
        base: TensorDict | None = None,
    ) -> tuple[TensorDict, TensorDict]:
        """One slice of a merge plan: (its merged tensors, its strategy state), reading its deltas only.

        ``base``: the plan's base version when the caller holds it (the planner).
        """
        run, part = context.name, plan.parts[position]
        names = (context.config.slice_tensors or [])[part.index]
        if base is None:  # the slice's tensors alone, read chunk by chunk
            base = self.store.model_part(run, plan.base, names)
            if base is None:
                raise LookupError(f"model version {plan.base} of run {run!r} is not in Redis")
        used = {s.shard: s.key for voice in part.voices for s in voice.shards}
        metas = {
            s.shard: {"samples": s.samples, "staleness": s.staleness} for v in part.voices for s in v.shards
        }

        def deltas() -> Iterator[tuple[float, TensorDict]]:
            for voice in part.voices:
                yield (
                    voice.weight,
                    self.reader.voice(context, used, metas, [s.shard for s in voice.shards])[1],
                )

        def renew() -> bool:
            try:
                return self.splits.renew(run, number, plan, position, owner)
            except Exception as e:  # keep trying; the lease covers short blips
                log.warning("could not renew slice %d of %s round %d: %s", position, run, number, e)
                return True

        state = self.store.strategy_part(run, names)  # this slice's momentum or Adam moments
        with renewing(split.SLICE_LEASE / 3, renew, "slice-renewal"):
            return slicing.merge_one(_strategy_maker(context), state, base, names, deltas())

    def _after_error(self, run: str, number: int, owner: str, error: Exception) -> dict[str, Any] | None:
        """A merge that raised: retried (the claim lapses) until MAX_ATTEMPTS, then the round fails."""
        text = printable(f"{type(error).__name__}: {error}")
        info = self.store.rounds.info(run, number) or {}
        attempts = int(info.get("attempts") or 1)
        log.error(
            "aggregating %s round %d failed (attempt %d of %d): %s", run, number, attempts, MAX_ATTEMPTS, text
        )
        if attempts < MAX_ATTEMPTS or "base_version" not in info:
            self.store.rounds.note_error(run, number, text)
            raise error
        summary = {"run": run, "round": number, "shards": info.get("shards"), "accepted": 0}
        reason = f"aggregation failed {attempts} times: {text}"
        return self.publisher.fail(self.contexts[run], number, owner, info, summary, reason)


def _strategy_maker(context: RunContext) -> Callable[[], Strategy]:
    """Makes the run's strategy (one for the run, or one per slice of a sliced run)."""
    config = context.config

    def make() -> Strategy:
        return make_strategy(
            config.strategy,
            server_lr=config.server_lr,
            momentum=config.momentum,
            clip_norm=config.clip_norm,
            momentum_delay=context.mode.momentum_delay,
        )

    return make


def _scale(delta: TensorDict, factor: float) -> None:
    """Scale a delta's floating-point tensors in place (a function: no loop variable outlives it)."""
    if factor < 1.0:
        for tensor in delta.values():
            if tensor.is_floating_point():
                tensor.mul_(factor)


def _voice_weight(
    name: str, samples: float, reputations: dict[str, float | None], plan: Plan | None
) -> float:
    """A voice's weight: its samples, by its reputation in a judged round, by the plan's factor."""
    weight = weigh(samples, reputations[name]) if reputations else samples
    return plan.weight(name, weight) if plan is not None else weight


def _probes(context: RunContext) -> bool:
    """True for a run made with ``--verify probe`` and without DP.

    With DP nothing judges one person's delta by itself: the decision would
    depend on that person's data beyond what the accountant counts.
    """
    return context.config.verify == "probe" and context.privacy is None


@contextlib.contextmanager
def _renewing(store: Store, run: str, number: int, owner: str) -> Iterator[None]:
    """Renew our claim on a round every third of its lease until the block ends."""

    def renew() -> bool:
        try:
            # taken over: stop; our commit will be refused, which is safe
            return bool(store.rounds.renew(run, number, owner) == "renewed")
        except Exception as e:  # keep trying; the lease covers short blips
            log.warning("could not renew the claim on %s round %d: %s", run, number, e)
            return True

    with renewing(CLAIM_LEASE / 3, renew, "claim-renewal"):
        yield
