"""The concept store: users, hashed API keys and per-user concepts in a database,
reference images in a content-addressed directory.

The database is SQLite (a file under `root`) by default, or any SQLAlchemy URL
(PostgreSQL through psycopg 3: `postgresql://user@host:port/db`). Image bytes are
kept out of the database, under `root/images/<sha[:2]>/<sha>`, written once and
shared by every concept (of any user) that holds the same bytes. The database
counts the references to each file (`image_files.refs`); the count changes, and a
file is written or removed, only inside the transaction that adds or deletes the
concepts holding it, so a delete never removes a file that a concurrent add uses.

Writes are serialized where they must be: SQLite transactions that write take the
database's write lock when they begin (`BEGIN IMMEDIATE`), PostgreSQL ones lock the
rows they count or update (`SELECT ... FOR UPDATE`, upserts). Unique names are
still checked by the database; a violation surfaces as `StoreError`, never as a
database error.

Every read and write of a concept is scoped by the owning user's id, so one user
can never see, use or delete another user's concepts or images: the store has no
method that reaches a concept without its owner.

The schema is versioned: `schema_version` holds one row, and `MIGRATIONS` lists
the ordered steps that bring an older database up to `SCHEMA_VERSION`. Opening a
store upgrades the database in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

SCHEMA_VERSION = 3
KEY_PREFIX = "rk_"


@dataclass
class StoreConfig:
    """Where the concept store keeps its data."""

    root: str = ""
    """Data directory: the SQLite file (by default) and the `images/` directory;
    empty means `$REPIC_CACHE/serve` (`~/.cache/repic/serve`)."""
    database_url: str = ""
    """SQLAlchemy URL of the database; empty means `sqlite:///<root>/concepts.db`.
    `postgresql://...` URLs use the psycopg 3 driver."""

    def resolved_root(self) -> Path:
        if self.root:
            return Path(os.path.expanduser(self.root))
        return Path(os.environ.get("REPIC_CACHE") or Path.home() / ".cache" / "repic") / "serve"


@dataclass
class User:
    id: int
    name: str
    is_admin: bool


@dataclass
class Concept:
    """One personal concept of one user."""

    id: int
    name: str
    category: str
    info: str
    image_sha256: list[str] = field(default_factory=list)
    created_at: float = 0.0


class StoreError(ValueError):
    """A request the store refuses (duplicate name, unknown user, ...)."""


def hash_key(api_key: str) -> str:
    """SHA-256 of an API key. Keys are 256-bit random tokens, so a plain (unsalted,
    fast) hash is enough: there is nothing to brute-force from a leaked hash."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def normalize_url(url: str) -> str:
    """Use the psycopg 3 driver for bare `postgresql://` URLs."""
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            return "postgresql+psycopg://" + url[len(bare):]
    return url


# ---------------------------------------------------------------------------
# Migrations. Each step builds its own tables from literal definitions (never from
# the current code's model), so an old database upgrades the same way forever.


def _migrate_v1(conn: Connection) -> None:
    """Users, hashed API keys, concepts with their image hashes as a JSON list."""
    md = sa.MetaData()
    sa.Table(
        "users", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("is_admin", sa.Boolean, nullable=False, default=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    sa.Table(
        "api_keys", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("revoked", sa.Boolean, nullable=False, default=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    sa.Table(
        "concepts", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("category", sa.String(64), nullable=False),
        sa.Column("info", sa.Text, nullable=False),
        sa.Column("images", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("user_id", "name", name="uq_concepts_user_name"),
    )
    md.create_all(conn)


def _migrate_v2(conn: Connection) -> None:
    """Move image hashes from the JSON column into `concept_images` rows, so that
    the images still in use can be found with an indexed query (garbage collection)."""
    md = sa.MetaData()
    # Stub of the existing table, only so the foreign key resolves (create_all skips it).
    sa.Table("concepts", md, sa.Column("id", sa.Integer, primary_key=True))
    images = sa.Table(
        "concept_images", md,
        sa.Column("concept_id", sa.Integer, sa.ForeignKey("concepts.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False, index=True),
    )
    md.create_all(conn)
    rows = conn.execute(sa.text("SELECT id, images FROM concepts")).all()
    for concept_id, blob in rows:
        hashes = json.loads(blob)
        if hashes:
            conn.execute(images.insert(), [
                {"concept_id": concept_id, "position": i, "sha256": h}
                for i, h in enumerate(hashes)
            ])
    conn.execute(sa.text("ALTER TABLE concepts DROP COLUMN images"))


def _migrate_v3(conn: Connection) -> None:
    """Reference counts of the image files, one row per file, from `concept_images`."""
    md = sa.MetaData()
    sa.Table(
        "image_files", md,
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("refs", sa.Integer, nullable=False),
    )
    md.create_all(conn)
    conn.execute(sa.text("INSERT INTO image_files (sha256, refs) SELECT sha256, COUNT(*) "
                         "FROM concept_images GROUP BY sha256"))


MIGRATIONS: list[tuple[int, Callable[[Connection], None]]] = [
    (1, _migrate_v1),
    (2, _migrate_v2),
    (3, _migrate_v3),
]


def schema_version(conn: Connection) -> int:
    """The database's schema version; 0 for an empty database."""
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    return int(conn.execute(sa.text("SELECT version FROM schema_version")).scalar_one())


def migrate(engine: Engine, target: int = SCHEMA_VERSION) -> int:
    """Apply the migrations after the database's version, up to `target`, each in
    its own transaction together with the version bump. Returns the final version."""
    if not 0 <= target <= SCHEMA_VERSION:
        raise ValueError(f"target: schema version {target} is not in 0..{SCHEMA_VERSION}")
    for version, step in MIGRATIONS:
        if version > target:
            break
        try:
            with _writing(engine).begin() as conn:
                if engine.dialect.name == "postgresql":
                    # Replicas starting together: one migrates, the others wait here.
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(7311001)"))
                current = schema_version(conn)
                if current > SCHEMA_VERSION:
                    raise StoreError(
                        f"database schema version {current} is newer than this code "
                        f"({SCHEMA_VERSION}); upgrade repic-ray")
                if current >= version:
                    continue
                step(conn)
                if version == 1:
                    conn.execute(sa.text("CREATE TABLE schema_version (version INTEGER NOT NULL)"))
                    conn.execute(sa.text("INSERT INTO schema_version (version) VALUES (1)"))
                else:
                    conn.execute(sa.text("UPDATE schema_version SET version = :v"), {"v": version})
        except sa.exc.SQLAlchemyError:
            # Another process may have applied this step first (SQLite serializes the
            # migrations with its write lock, PostgreSQL with the advisory lock, so this
            # is a second line of defence). Anything else is real.
            with engine.connect() as conn:
                if schema_version(conn) < version:
                    raise
    with engine.connect() as conn:
        return schema_version(conn)


# ---------------------------------------------------------------------------
# Tables as the current code uses them (schema version SCHEMA_VERSION).

_md = sa.MetaData()
_users = sa.Table(
    "users", _md,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64)),
    sa.Column("is_admin", sa.Boolean),
    sa.Column("created_at", sa.Float),
)
_keys = sa.Table(
    "api_keys", _md,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.Integer),
    sa.Column("key_hash", sa.String(64)),
    sa.Column("revoked", sa.Boolean),
    sa.Column("created_at", sa.Float),
)
_concepts = sa.Table(
    "concepts", _md,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.Integer),
    sa.Column("name", sa.String(64)),
    sa.Column("category", sa.String(64)),
    sa.Column("info", sa.Text),
    sa.Column("created_at", sa.Float),
)
_images = sa.Table(
    "concept_images", _md,
    sa.Column("concept_id", sa.Integer, primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("sha256", sa.String(64)),
)
_files = sa.Table(
    "image_files", _md,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("refs", sa.Integer),
)


def _writing(engine: Engine) -> Engine:
    """`engine` whose transactions take SQLite's write lock when they begin."""
    return engine.execution_options(sqlite_immediate=True)


class LimitReached(StoreError):
    """A per-user quota would be exceeded."""


class ImageDir:
    """Content-addressed image files: `<root>/<sha[:2]>/<sha>`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise StoreError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        """Store `data` (idempotent) and return its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        dest = self.path(sha)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a reader never sees a half-written file.
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
        return sha

    def get(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)


class ConceptStore:
    """Users, API keys and concepts. Thread-safe (one SQLAlchemy engine, one
    connection per call); several processes may share one database."""

    def __init__(self, config: StoreConfig):
        self.config = config
        root = config.resolved_root()
        root.mkdir(parents=True, exist_ok=True)
        url = normalize_url(config.database_url or f"sqlite:///{root / 'concepts.db'}")
        self.engine = _make_engine(url)
        self._writer = _writing(self.engine)
        self.images = ImageDir(root / "images")
        self.version = migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- users and keys ---------------------------------------------------

    def create_user(self, name: str, *, is_admin: bool = False) -> User:
        if not name or len(name) > 64:
            raise StoreError(f"user name must be 1-64 characters, got {name!r}")
        try:
            with self._writer.begin() as conn:
                if conn.execute(sa.select(_users.c.id).where(_users.c.name == name)).first():
                    raise StoreError(f"user {name!r} already exists")
                uid = conn.execute(
                    _users.insert().values(name=name, is_admin=is_admin, created_at=time.time())
                ).inserted_primary_key[0]
        except sa.exc.IntegrityError:  # a concurrent create of the same name won
            raise StoreError(f"user {name!r} already exists") from None
        return User(id=int(uid), name=name, is_admin=is_admin)

    def get_user(self, name: str) -> User | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(_users).where(_users.c.name == name)).first()
        return User(id=row.id, name=row.name, is_admin=bool(row.is_admin)) if row else None

    def create_api_key(self, user_name: str) -> str:
        """A new API key for the user; only its hash is stored, so this return
        value is the one and only time the key is seen."""
        user = self.get_user(user_name)
        if user is None:
            raise StoreError(f"no user named {user_name!r}")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(_keys.insert().values(
                user_id=user.id, key_hash=hash_key(key), revoked=False, created_at=time.time()))
        return key

    def revoke_api_key(self, api_key: str) -> bool:
        with self.engine.begin() as conn:
            res = conn.execute(
                _keys.update().where(_keys.c.key_hash == hash_key(api_key)).values(revoked=True))
        return res.rowcount > 0

    def authenticate(self, api_key: str) -> User | None:
        """The user owning an unrevoked `api_key`, or None."""
        if not api_key:
            return None
        query = (
            sa.select(_users)
            .join(_keys, _keys.c.user_id == _users.c.id)
            .where(_keys.c.key_hash == hash_key(api_key), _keys.c.revoked == sa.false())
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return User(id=row.id, name=row.name, is_admin=bool(row.is_admin)) if row else None

    # -- concepts (always scoped by user_id) -------------------------------

    def add_concept(
        self, user_id: int, name: str, category: str, info: str, images: list[bytes],
        *, max_concepts: int | None = None,
    ) -> Concept:
        """Store a concept with its reference images (already validated bytes).

        `max_concepts`: the user's quota, counted in the same transaction as the insert
        (concurrent adds of one user are serialized), so it holds under concurrency."""
        if not images:
            raise StoreError(f"concept {name!r}: needs at least one reference image")
        hashes = [hashlib.sha256(data).hexdigest() for data in images]
        now = time.time()
        try:
            with self._writer.begin() as conn:
                # Lock the owner's row: this user's adds run one at a time.
                conn.execute(sa.select(_users.c.id).where(_users.c.id == user_id).with_for_update())
                if conn.execute(sa.select(_concepts.c.id).where(
                        _concepts.c.user_id == user_id, _concepts.c.name == name)).first():
                    raise StoreError(f"concept {name!r} already exists")
                if max_concepts is not None:
                    count = conn.execute(sa.select(sa.func.count()).select_from(_concepts)
                                         .where(_concepts.c.user_id == user_id)).scalar_one()
                    if count >= max_concepts:
                        raise LimitReached(f"concept limit reached ({max_concepts} per user); "
                                           "delete one first")
                cid = conn.execute(_concepts.insert().values(
                    user_id=user_id, name=name, category=category, info=info, created_at=now,
                )).inserted_primary_key[0]
                conn.execute(_images.insert(), [
                    {"concept_id": cid, "position": i, "sha256": h} for i, h in enumerate(hashes)
                ])
                self._add_refs(conn, hashes)
                # Written while this transaction holds the file's reference row: a
                # concurrent delete of the last other reference waits or went first.
                for data in images:
                    self.images.put(data)
        except sa.exc.IntegrityError:
            # Two adds of one name that both passed the check (the unique constraint
            # decides): the loser gets the same answer as a sequential duplicate.
            raise StoreError(f"concept {name!r} already exists") from None
        return Concept(id=int(cid), name=name, category=category, info=info,
                       image_sha256=hashes, created_at=now)

    def _add_refs(self, conn: Connection, hashes: list[str]) -> None:
        counts: dict[str, int] = {}
        for h in hashes:
            counts[h] = counts.get(h, 0) + 1
        insert = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        for sha, n in sorted(counts.items()):  # a fixed order: no lock-order deadlocks
            stmt = insert(_files).values(sha256=sha, refs=n)
            conn.execute(stmt.on_conflict_do_update(
                index_elements=[_files.c.sha256], set_={"refs": _files.c.refs + n}))

    def count_concepts(self, user_id: int) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(_concepts)
                                    .where(_concepts.c.user_id == user_id)).scalar_one())

    def list_concepts(self, user_id: int, names: list[str] | None = None) -> list[Concept]:
        """The user's concepts ordered by name; with `names`, only those (missing
        names are simply absent from the result — the caller reports them)."""
        query = sa.select(_concepts).where(_concepts.c.user_id == user_id)
        if names is not None:
            query = query.where(_concepts.c.name.in_(names))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(_concepts.c.name)).all()
            ids = [r.id for r in rows]
            hashes: dict[int, list[str]] = {i: [] for i in ids}
            if ids:
                for cid, _, sha in conn.execute(
                    sa.select(_images.c.concept_id, _images.c.position, _images.c.sha256)
                    .where(_images.c.concept_id.in_(ids))
                    .order_by(_images.c.concept_id, _images.c.position)
                ):
                    hashes[cid].append(sha)
        return [Concept(id=r.id, name=r.name, category=r.category, info=r.info,
                        image_sha256=hashes[r.id], created_at=r.created_at) for r in rows]

    def get_concept(self, user_id: int, name: str) -> Concept | None:
        found = self.list_concepts(user_id, [name])
        return found[0] if found else None

    def concept_image(self, user_id: int, name: str, index: int) -> bytes | None:
        """Bytes of the `index`-th reference image of the user's concept, or None."""
        concept = self.get_concept(user_id, name)
        if concept is None or not 0 <= index < len(concept.image_sha256):
            return None
        return self.images.get(concept.image_sha256[index])

    def update_concept(
        self, user_id: int, name: str, *, new_name: str | None = None,
        category: str | None = None, info: str | None = None,
    ) -> Concept | None:
        """Rename the user's concept and/or change its category or info; its reference
        images stay. None when the user has no concept `name`; StoreError when `new_name`
        is taken by another of the user's concepts."""
        values: dict[str, str] = {}
        if new_name is not None and new_name != name:
            values["name"] = new_name
        if category is not None:
            values["category"] = category
        if info is not None:
            values["info"] = info
        try:
            with self._writer.begin() as conn:
                row = conn.execute(sa.select(_concepts.c.id).where(
                    _concepts.c.user_id == user_id, _concepts.c.name == name)
                    .with_for_update()).first()
                if row is None:
                    return None
                if "name" in values and conn.execute(sa.select(_concepts.c.id).where(
                        _concepts.c.user_id == user_id, _concepts.c.name == new_name)).first():
                    raise StoreError(f"concept {new_name!r} already exists")
                if values:
                    conn.execute(_concepts.update().where(_concepts.c.id == row.id)
                                 .values(**values))
        except sa.exc.IntegrityError:
            raise StoreError(f"concept {new_name!r} already exists") from None
        return self.get_concept(user_id, values.get("name", name))

    def delete_concept(self, user_id: int, name: str) -> bool:
        """Delete the user's concept; image files no other concept uses go too."""
        with self._writer.begin() as conn:
            row = conn.execute(sa.select(_concepts.c.id).where(
                _concepts.c.user_id == user_id, _concepts.c.name == name)).first()
            if row is None:
                return False
            hashes = [sha for (sha,) in conn.execute(
                sa.select(_images.c.sha256).where(_images.c.concept_id == row.id))]
            conn.execute(_images.delete().where(_images.c.concept_id == row.id))
            conn.execute(_concepts.delete().where(_concepts.c.id == row.id))
            unused = []
            for sha in sorted(set(hashes)):
                n = hashes.count(sha)
                left = conn.execute(_files.update().where(_files.c.sha256 == sha)
                                    .values(refs=_files.c.refs - n)
                                    .returning(_files.c.refs)).scalar_one_or_none()
                if left is not None and left <= 0:
                    conn.execute(_files.delete().where(_files.c.sha256 == sha))
                    unused.append(sha)
            # Last, still holding the rows' locks: an add of the same bytes waits for
            # this commit and then writes the file again.
            for sha in unused:
                self.images.delete(sha)
        return True


def _use_wal(cur, timeout: float = 30.0) -> None:
    """Put the database in WAL mode (readers do not block the writer).

    The mode is stored in the file, so it is set once; but switching needs the
    database to itself, and SQLite answers "database is locked" at once, without
    its busy timeout, when another process opens it at that moment (two replicas
    starting together). Retry until the mode is WAL or the timeout passes.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            mode = cur.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() == "wal":
                return
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            # SQLAlchemy, not the sqlite3 module, begins transactions (below): the
            # module's own handling commits before DDL, so migrations were not atomic.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            _use_wal(cur)
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _begin(conn):
            immediate = conn.get_execution_options().get("sqlite_immediate")
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    return sa.create_engine(url, pool_pre_ping=True)
