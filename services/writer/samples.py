"""The samples of a commit: each (run, sample_index) prompt and ground truth is stored once
in writer.samples, and predictions keep only what changes between epochs.

A batch declares samples in its `samples`, and every prediction with a prompt declares its
sample too (older clients send the prompt on every prediction). The first text stored for a
sample stays: the same text again is a no-op, another one is INVALID_ARGUMENT naming the
field, and the whole batch is refused (the transaction is rolled back: nothing of it is
stored). A prediction with an empty prompt needs its sample declared in the commit or
stored before; otherwise INVALID_ARGUMENT too.

On PostgreSQL the samples of a commit are one statement: insert what is new (ON CONFLICT DO
NOTHING, in key order) and compare what was stored before with what was sent. A key that
statement neither inserted nor saw (a concurrent transaction committed it meanwhile) is read
again by a second statement with a fresh snapshot.
"""

import asyncio
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import select, text, tuple_
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from epochlens.v1 import common_pb2, writer_pb2
from services.common.db import is_postgres
from services.common.errors import FieldViolation, InvalidArgument
from services.writer.models import SCHEMA, samples_table

SampleKey = tuple[uuid.UUID, int]
# (prompt, ground truth)
SampleText = tuple[str, str | None]
# Where a sample was named: (position of the batch in the commit, field path in the batch).
Origin = tuple[int, str]

# Keys looked up per statement on SQLite (2 bind parameters each, well within its limit).
LOOKUP_CHUNK = 1000

_PG_UPSERT = text(f"""
WITH input AS (
    SELECT r, i, p, g, n FROM unnest(CAST(:run_ids AS UUID[]), CAST(:indices AS BIGINT[]),
        CAST(:prompts AS TEXT[]), CAST(:truths AS TEXT[])) WITH ORDINALITY AS u(r, i, p, g, n)
), ins AS (
    INSERT INTO {SCHEMA}.samples (run_id, sample_index, user_id, prompt, ground_truth)
    SELECT r, i, :user_id, p, g FROM input ORDER BY r, i
    ON CONFLICT (run_id, sample_index) DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM ins),
    count(*) FILTER (WHERE s.run_id IS NULL),
    COALESCE(array_agg(u.n - 1) FILTER (WHERE s.prompt <> u.p
                                        OR s.ground_truth IS DISTINCT FROM u.g), '{{}}')
FROM input u LEFT JOIN {SCHEMA}.samples s ON s.run_id = u.r AND s.sample_index = u.i
""")


class SampleConflict(Exception):
    """Batches of a commit refused over their samples, by position in the commit; the
    transaction is rolled back, and the caller commits the other batches again."""

    def __init__(self, violations: dict[int, list[FieldViolation]]) -> None:
        super().__init__(f"samples refused in {len(violations)} batches")
        self.violations = violations

    def error(self, position: int) -> InvalidArgument:
        return InvalidArgument(self.violations[position])


@dataclass
class SampleWrite:
    """The samples the owned batches of one commit declare, and the samples their
    predictions with an empty prompt rely on."""

    texts: dict[SampleKey, SampleText] = field(default_factory=dict)
    origins: dict[SampleKey, list[Origin]] = field(default_factory=dict)
    # Keys predictions with an empty prompt name that the commit does not declare.
    relied: set[SampleKey] = field(default_factory=set)
    known: Mapping[SampleKey, SampleText] = field(default_factory=dict)

    @classmethod
    def collect(cls, batches: Sequence, owned: set[uuid.UUID],
                known: Mapping[SampleKey, SampleText] | None = None) -> "SampleWrite":
        """The commit's samples; SampleConflict when two of them name one key with
        different text (the later batch is refused). known: samples known to be stored,
        with their text (not sent to the database again)."""
        work, conflicts = cls(), _Conflicts()
        work.known = known or {}
        for position, batch in enumerate(batches):
            if batch.run_id not in owned:
                continue
            for index, sample in enumerate(batch.samples):
                work._add(conflicts, (batch.run_id, sample.sample_index), _text_of(sample),
                          (position, f"samples[{index}]"))
            for index, item in enumerate(batch.items):
                if item.prompt:
                    work._add(conflicts, (batch.run_id, item.sample_index), _text_of(item),
                              (position, f"predictions[{index}]"))
        conflicts.raise_if_any()
        for batch in batches:
            if batch.run_id in owned:
                work.relied.update((batch.run_id, item.sample_index) for item in batch.items
                                   if not item.prompt)
        work.relied.difference_update(work.texts)
        work.relied.difference_update(work.known)
        return work

    def _add(self, conflicts: "_Conflicts", key: SampleKey, sample: SampleText,
             origin: Origin) -> None:
        stored = self.known.get(key)
        if stored is not None:
            if stored != sample:
                conflicts.add(origin, key, sample, stored, "as stored for this run")
            return
        known = self.texts.get(key)
        if known is None:
            self.texts[key] = sample
            self.origins[key] = [origin]
        elif known == sample:
            self.origins[key].append(origin)
        else:
            conflicts.add(origin, key, sample, known, "as declared earlier in this request")

    async def store(self, conn: AsyncConnection, user_id: str) -> None:
        """Inserts the new samples; SampleConflict when a stored one has other text."""
        if not self.texts:
            return
        keys = sorted(self.texts)
        if is_postgres(conn):
            stored = await self._store_pg(conn, user_id, keys)
        else:
            stored = await self._store_sqlite(conn, user_id, keys)
        conflicts = _Conflicts()
        for key, text_stored in stored.items():
            for origin in self.origins[key]:
                conflicts.add(origin, key, self.texts[key], text_stored,
                              "as stored for this run")
        conflicts.raise_if_any()

    async def _store_pg(self, conn: AsyncConnection, user_id: str, keys: list[SampleKey]
                        ) -> dict[SampleKey, SampleText]:
        """The stored text of every key whose text differs from the commit's."""
        texts = [self.texts[key] for key in keys]
        inserted, unseen, differing = (await conn.execute(_PG_UPSERT, {
            "user_id": user_id, "run_ids": [key[0] for key in keys],
            "indices": [key[1] for key in keys], "prompts": [t[0] for t in texts],
            "truths": [t[1] for t in texts]})).one()
        wanted = [keys[n] for n in differing]
        if unseen > inserted:  # committed by another transaction while this one ran
            wanted = keys
        if not wanted:
            return {}
        stored = await stored_texts(conn, wanted)
        return {key: value for key, value in stored.items() if value != self.texts[key]}

    async def _store_sqlite(self, conn: AsyncConnection, user_id: str, keys: list[SampleKey]
                            ) -> dict[SampleKey, SampleText]:
        stored = await stored_texts(conn, keys)
        new = [{"run_id": key[0], "sample_index": key[1], "user_id": user_id,
                "prompt": self.texts[key][0], "ground_truth": self.texts[key][1]}
               for key in keys if key not in stored]
        if new:
            await conn.execute(sqlite.insert(samples_table).on_conflict_do_nothing(), new)
        return {key: value for key, value in stored.items() if value != self.texts[key]}

    async def raise_missing(self, conn: AsyncConnection, batches: Sequence) -> None:
        """SampleConflict naming every prediction with an empty prompt whose sample is not
        stored (the caller found some)."""
        present = set(await stored_texts(conn, sorted(self.relied)))
        violations: dict[int, list[FieldViolation]] = {}
        for position, batch in enumerate(batches):
            for index, item in enumerate(batch.items):
                key = (batch.run_id, item.sample_index)
                if not item.prompt and key in self.relied and key not in present:
                    violations.setdefault(position, []).append(FieldViolation(
                        f"predictions[{index}].prompt",
                        f"empty, and run {batch.run_id} has no sample {item.sample_index}: "
                        "declare it in `samples` (or set the prompt)"))
        if violations:
            raise SampleConflict(violations)


@dataclass
class StreamSamples:
    """What one upload stream knows of its samples: which commit still in flight declares
    which sample, and which samples its committed batches stored (samples are immutable:
    a prediction that relies on one of those needs no lookup)."""

    declaring: dict[SampleKey, asyncio.Task] = field(default_factory=dict)
    stored: dict[SampleKey, SampleText] = field(default_factory=dict)

    def wait_for(self, batches: Iterable) -> list[asyncio.Task]:
        """The commits in flight that declare a sample the batches' predictions with an
        empty prompt rely on: the batches commit after them, or would not see it yet."""
        if not self.declaring:
            return []
        tasks = {self.declaring.get((batch.run_id, item.sample_index))
                 for batch in batches for item in batch.items if not item.prompt}
        return [task for task in tasks if task is not None and not task.done()]

    def declared(self, batches: Iterable, task: asyncio.Task) -> None:
        """The batches' samples are declared by the commit `task`."""
        for batch in batches:
            self.declaring.update((key, task) for key, _ in _declared(batch))

    def committed(self, batches: Iterable) -> None:
        """The batches are committed: their samples are stored, with this text."""
        for batch in batches:
            self.stored.update(_declared(batch))


def _declared(batch) -> Iterable[tuple[SampleKey, SampleText]]:
    yield from (((batch.run_id, sample.sample_index), _text_of(sample))
                for sample in batch.samples)
    yield from (((batch.run_id, item.sample_index), _text_of(item))
                for item in batch.items if item.prompt)


async def stored_texts(conn: AsyncConnection, keys: Sequence[SampleKey]
                       ) -> dict[SampleKey, SampleText]:
    """The stored text of the keys that are stored (the caller's own, under RLS)."""
    S = samples_table.c
    found: dict[SampleKey, SampleText] = {}
    for start in range(0, len(keys), LOOKUP_CHUNK):
        chunk = list(keys[start:start + LOOKUP_CHUNK])
        rows = await conn.execute(select(S.run_id, S.sample_index, S.prompt, S.ground_truth)
                                  .where(tuple_(S.run_id, S.sample_index).in_(chunk)))
        for run_id, index, prompt, truth in rows:
            found[(run_id, index)] = (prompt, truth)
    return found


def _text_of(message: writer_pb2.SampleInput | common_pb2.PredictionInput) -> SampleText:
    return message.prompt, (message.ground_truth if message.HasField("ground_truth") else None)


class _Conflicts:
    def __init__(self) -> None:
        self.violations: dict[int, list[FieldViolation]] = {}

    def add(self, origin: Origin, key: SampleKey, sent: SampleText, known: SampleText,
            where: str) -> None:
        position, path = origin
        name = "prompt" if sent[0] != known[0] else "ground_truth"
        self.violations.setdefault(position, []).append(FieldViolation(
            f"{path}.{name}", f"differs from the {name} of sample {key[1]} {where} (a "
            "sample's prompt and ground truth are fixed for the whole run)"))

    def raise_if_any(self) -> None:
        if self.violations:
            raise SampleConflict(self.violations)
