"""Schema migrations: an ordered list of small functions, each applied once.

Never edit a released migration; append a new one. `migrate(db)` runs on every open.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Callable

import sqlite_utils

MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = []


def migration(fn):
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE images (
            id TEXT PRIMARY KEY,            -- sha256 of the file's bytes
            name TEXT NOT NULL,             -- the dataset's own name (CIRR 'dev-12-0-img1')
            path TEXT,                      -- absolute path on disk, when local
            url TEXT,                       -- when the image lives remotely
            root TEXT,                      -- the dataset folder it was imported from
            width INTEGER, height INTEGER,
            size_bytes INTEGER,
            format TEXT,
            split TEXT,
            scene_json TEXT,                -- demo world: ground-truth scene graph
            created_at TEXT NOT NULL
        );
        CREATE INDEX images_name ON images(name);

        CREATE TABLE pairs (
            id TEXT PRIMARY KEY,            -- stable hash of (source, external id, ref, target)
            source TEXT NOT NULL,           -- dataset/import name ('demo', 'cirr', ...)
            external_id TEXT,               -- CIRR pairid, CIRCO id, pairs.jsonl id
            reference_id TEXT NOT NULL REFERENCES images(id),
            target_id TEXT NOT NULL REFERENCES images(id),
            split TEXT,
            original_captions TEXT NOT NULL DEFAULT '[]',  -- JSON list of imported captions
            img_set TEXT,                   -- JSON list of image ids (CIRR img_set members)
            ground_truth TEXT,              -- demo world: JSON edit list
            extra TEXT NOT NULL DEFAULT '{}',  -- format-specific fields (CIRCO shared_concept ...)
            created_at TEXT NOT NULL
        );
        CREATE INDEX pairs_split ON pairs(split);
        CREATE INDEX pairs_reference ON pairs(reference_id);
        CREATE UNIQUE INDEX pairs_source_external ON pairs(source, external_id);

        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            name TEXT,
            backend TEXT NOT NULL,
            model TEXT NOT NULL,
            base_url TEXT,
            method TEXT NOT NULL DEFAULT 'staged',  -- 'staged' or 'single' (the ablation)
            settings TEXT NOT NULL DEFAULT '{}',
            prompt_versions TEXT NOT NULL DEFAULT '{}',
            status TEXT NOT NULL DEFAULT 'created', -- created/running/stopped/finished/failed
            pairs_total INTEGER NOT NULL DEFAULT 0,
            started_at TEXT, finished_at TEXT,
            created_at TEXT NOT NULL
        );

        -- Every VLM request made. A successful row's request_hash is the cache key that
        -- makes a resumed run skip a paid call.
        CREATE TABLE calls (
            id INTEGER PRIMARY KEY,
            run_id INTEGER REFERENCES runs(id),
            stage TEXT NOT NULL,            -- 'stage1','stage2','stage3','single','repair'
            request_hash TEXT NOT NULL,
            prompt_version TEXT,
            model TEXT,
            subject_id TEXT,                -- image id (stage 1) or pair id
            request TEXT,                   -- JSON request with images as image ids, never keys
            response TEXT,                  -- raw text as returned
            status TEXT NOT NULL,           -- 'ok' or 'error'
            error TEXT,
            tokens_in INTEGER NOT NULL DEFAULT 0,
            tokens_out INTEGER NOT NULL DEFAULT 0,
            latency_ms REAL,
            cost_usd REAL NOT NULL DEFAULT 0,
            batch_id TEXT,
            custom_id TEXT,
            created_at TEXT NOT NULL
        );
        CREATE INDEX calls_hash ON calls(request_hash, status);
        CREATE INDEX calls_run ON calls(run_id);

        CREATE TABLE batches (
            id TEXT PRIMARY KEY,            -- the provider's batch id
            run_id INTEGER REFERENCES runs(id),
            stage TEXT NOT NULL,
            input_file_id TEXT,
            output_file_id TEXT,
            error_file_id TEXT,
            status TEXT NOT NULL,
            custom_ids TEXT NOT NULL DEFAULT '[]',
            collected INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL
        );

        -- Stage 1 / 2 descriptor lists. Stage 1 rows are shared by every pair with that
        -- reference (cache_key = image hash + prompt version + model + params).
        CREATE TABLE descriptions (
            id TEXT PRIMARY KEY,            -- the cache key
            stage INTEGER NOT NULL,         -- 1 or 2
            image_id TEXT NOT NULL REFERENCES images(id),
            pair_id TEXT REFERENCES pairs(id),
            prompt_version TEXT, model TEXT,
            objects TEXT NOT NULL,          -- JSON [{"name":..., "descriptors":[...]}]
            call_id INTEGER REFERENCES calls(id),
            created_at TEXT NOT NULL
        );

        -- One row per (run, pair): the unit that is annotated, reviewed and exported.
        CREATE TABLE annotations (
            id TEXT PRIMARY KEY,            -- '<run_id>:<pair_id>'
            run_id INTEGER NOT NULL REFERENCES runs(id),
            pair_id TEXT NOT NULL REFERENCES pairs(id),
            status TEXT NOT NULL DEFAULT 'pending',  -- pending/done/failed
            error TEXT,
            stage1_id TEXT REFERENCES descriptions(id),
            stage2_id TEXT REFERENCES descriptions(id),
            review_status TEXT NOT NULL DEFAULT 'unreviewed',  -- unreviewed/approved/rejected
            flag_count INTEGER NOT NULL DEFAULT 0,
            note TEXT,
            reviewer TEXT, reviewed_at TEXT,
            seq INTEGER,                    -- queue order
            updated_at TEXT NOT NULL
        );
        CREATE INDEX annotations_queue ON annotations(status, review_status, seq);
        CREATE INDEX annotations_run_queue ON annotations(run_id, status, review_status, seq);
        CREATE INDEX annotations_pair ON annotations(pair_id);

        -- Captions as the VLM wrote them. `text` is never updated; edits live in caption_edits.
        CREATE TABLE captions (
            id TEXT PRIMARY KEY,
            annotation_id TEXT NOT NULL REFERENCES annotations(id),
            kind TEXT NOT NULL,             -- 'individual' or 'compound'
            position INTEGER NOT NULL,
            text TEXT NOT NULL,
            sources TEXT,                   -- compound: JSON list of individual caption ids
            token_count INTEGER,
            created_at TEXT NOT NULL
        );
        CREATE INDEX captions_annotation ON captions(annotation_id, kind, position);

        CREATE TABLE caption_edits (
            id INTEGER PRIMARY KEY,
            caption_id TEXT NOT NULL REFERENCES captions(id),
            version INTEGER NOT NULL,       -- 1, 2, ...; version 0 is the VLM's text
            text TEXT NOT NULL,
            action TEXT NOT NULL,           -- 'edit' or 'undo'
            restores INTEGER NOT NULL,      -- the version whose text this row makes current
            editor TEXT NOT NULL,
            created_at TEXT NOT NULL,
            UNIQUE (caption_id, version)
        );

        -- A hallucination flag on one descriptor or caption. Removing a flag keeps the row.
        CREATE TABLE flags (
            id INTEGER PRIMARY KEY,
            annotation_id TEXT NOT NULL REFERENCES annotations(id),
            target_kind TEXT NOT NULL,      -- 'descriptor' or 'caption'
            target_id TEXT NOT NULL,        -- caption id, or '<description id>/<obj>/<desc>'
            reason TEXT,
            reviewer TEXT NOT NULL,
            created_at TEXT NOT NULL,
            removed_at TEXT, removed_by TEXT
        );
        CREATE INDEX flags_annotation ON flags(annotation_id);

        -- Every review action, in order: approve, reject, reset, note.
        CREATE TABLE review_events (
            id INTEGER PRIMARY KEY,
            annotation_id TEXT NOT NULL REFERENCES annotations(id),
            action TEXT NOT NULL,
            value TEXT,
            reviewer TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        CREATE INDEX review_events_annotation ON review_events(annotation_id);
        """
    )


def migrate(db: sqlite_utils.Database) -> int:
    """Apply pending migrations; returns the schema version now in force."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (version INTEGER PRIMARY KEY, name TEXT, applied_at TEXT)"
    )
    done = {row[0] for row in db.execute("SELECT version FROM _migrations").fetchall()}
    for version, fn in enumerate(MIGRATIONS, start=1):
        if version in done:
            continue
        conn = db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            # A second process may have migrated while we waited for the lock.
            if conn.execute("SELECT 1 FROM _migrations WHERE version = ?", [version]).fetchone():
                conn.execute("COMMIT")
                continue
            for statement in _statements(fn, db):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO _migrations VALUES (?, ?, ?)",
                [version, fn.__name__, datetime.now(timezone.utc).isoformat()],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)


def schema_version(db: sqlite_utils.Database) -> int:
    row = db.execute("SELECT MAX(version) FROM _migrations").fetchone()
    return row[0] or 0


class _Recorder:
    """Collects the SQL a migration would run so it can run inside one transaction
    (executescript would commit on its own)."""

    def __init__(self):
        self.statements: list[str] = []

    def executescript(self, script: str) -> None:
        self.statements.extend(_split_sql(script))

    def execute(self, sql: str, *args) -> None:
        self.statements.append(sql)


def _statements(fn, db) -> list[str]:
    recorder = _Recorder()
    fn(recorder)
    return recorder.statements


def _split_sql(script: str) -> list[str]:
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


@migration
def m002_pairs_target_optional(db: sqlite_utils.Database) -> None:
    """pairs.target_id may be NULL: CIRR test1 and CIRCO test queries withhold the target.

    SQLite cannot drop NOT NULL in place, so the table is rebuilt. Foreign keys stay on:
    they are deferred to the commit, by which point every annotation's pair is back.
    """
    db.executescript(
        """
        PRAGMA defer_foreign_keys = ON;
        CREATE TEMP TABLE _pairs_m002 AS SELECT * FROM pairs;
        DROP TABLE pairs;
        CREATE TABLE pairs (
            id TEXT PRIMARY KEY,
            source TEXT NOT NULL,
            external_id TEXT,
            reference_id TEXT NOT NULL REFERENCES images(id),
            target_id TEXT REFERENCES images(id),
            split TEXT,
            original_captions TEXT NOT NULL DEFAULT '[]',
            img_set TEXT,
            ground_truth TEXT,
            extra TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL
        );
        INSERT INTO pairs (id, source, external_id, reference_id, target_id, split,
            original_captions, img_set, ground_truth, extra, created_at)
            SELECT id, source, external_id, reference_id, target_id, split,
            original_captions, img_set, ground_truth, extra, created_at FROM _pairs_m002;
        DROP TABLE _pairs_m002;
        CREATE INDEX pairs_split ON pairs(split);
        CREATE INDEX pairs_reference ON pairs(reference_id);
        CREATE UNIQUE INDEX pairs_source_external ON pairs(source, external_id);
        """
    )


@migration
def m003_flagged_queue_index(db: sqlite_utils.Database) -> None:
    """The flagged queue and its count as index seeks: flagged annotations are few, and
    without this index finding the next one scanned every done annotation."""
    db.execute("CREATE INDEX annotations_flagged ON annotations(status, seq) WHERE flag_count > 0")


@migration
def m004_run_leases(db: sqlite_utils.Database) -> None:
    """One row per run a session is working on (store/leases.py): two sessions on one
    run would both pay for every answer. No secrets here: owner is a random session id."""
    db.executescript(
        """
        CREATE TABLE run_leases (
            run_id INTEGER PRIMARY KEY REFERENCES runs(id),
            owner TEXT NOT NULL,            -- a uuid per Runner session
            pid INTEGER NOT NULL,           -- the session's process, on host
            host TEXT NOT NULL,
            acquired_at REAL NOT NULL,      -- unix time
            heartbeat_at REAL NOT NULL      -- unix time of the last heartbeat
        );
        """
    )


@migration
def m005_batch_cancelled_by(db: sqlite_utils.Database) -> None:
    """Who cancelled a batch: 'good4cir' (its deadline; the unfinished lines go out again)
    or 'outside' (the provider's dashboard: the user chose not to pay for the rest)."""
    db.execute("ALTER TABLE batches ADD COLUMN cancelled_by TEXT")


@migration
def m006_batch_lines(db: sqlite_utils.Database) -> None:
    """What each line of a batch asks, stored when it is submitted: the runner's request
    hash (the key every run reuses a stored answer by) and what a call row holds. When the
    batch is collected, the answers no session asked for (pairs outside the collecting
    run's scope) are stored as calls of the batch's run from these rows, then the rows go."""
    db.executescript(
        """
        CREATE TABLE batch_lines (
            batch_id TEXT NOT NULL,         -- batches.id ('pending:<input file>' until created)
            custom_id TEXT NOT NULL,
            request_hash TEXT NOT NULL,
            stage TEXT NOT NULL,            -- as its call is stored ('repair' for a repair)
            subject_id TEXT,
            prompt_version TEXT,
            request TEXT,                   -- as calls.request: images as ids, never keys
            PRIMARY KEY (batch_id, custom_id)
        );
        CREATE INDEX batch_lines_hash ON batch_lines(request_hash);
        CREATE INDEX calls_batch_line ON calls(batch_id, custom_id);
        """
    )


@migration
def m007_cirr_pairids(db: sqlite_utils.Database) -> None:
    """The pairid each exported caption was given in a CIRR export, kept so that it has
    the same one in every later export (of any split, after any review) and no two
    captions share one: CIRR numbers its queries once over all its splits."""
    db.executescript(
        """
        CREATE TABLE cirr_pairids (
            caption_key TEXT PRIMARY KEY,   -- captions.id, or '<pair id>:imported:<index>'
            pairid INTEGER NOT NULL UNIQUE,
            created_at TEXT NOT NULL
        );
        """
    )
