"""Concept store on SQLite and on a real PostgreSQL server: users, keys, concepts,
isolation, image garbage collection, persistence and schema migrations."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from repic_ray.serving.store import (
    SCHEMA_VERSION,
    ConceptStore,
    LimitReached,
    StoreConfig,
    StoreError,
    migrate,
    normalize_url,
    schema_version,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def config(request, tmp_path) -> StoreConfig:
    if request.param == "sqlite":
        return StoreConfig(root=str(tmp_path / "store"))
    url = request.getfixturevalue("fresh_postgres_url")
    return StoreConfig(root=str(tmp_path / "store"), database_url=url)


def test_keys_are_stored_hashed_and_authenticate(config):
    store = ConceptStore(config)
    alice = store.create_user("alice")
    key = store.create_api_key("alice")
    assert store.authenticate(key) == alice
    assert store.authenticate(key + "x") is None
    assert store.authenticate("") is None
    with store.engine.connect() as conn:
        stored = [r[0] for r in conn.execute(sa.text("SELECT key_hash FROM api_keys"))]
    assert stored == [hashlib.sha256(key.encode()).hexdigest()]
    assert key not in json.dumps(stored)
    assert store.revoke_api_key(key)
    assert store.authenticate(key) is None
    with pytest.raises(StoreError, match="already exists"):
        store.create_user("alice")
    with pytest.raises(StoreError, match="no user named 'bob'"):
        store.create_api_key("bob")


def test_update_concept_renames_and_keeps_images(config):
    store = ConceptStore(config)
    alice = store.create_user("alice")
    store.add_concept(alice.id, "Bo", "dog", "a corgi", [b"img-1", b"img-2"])
    store.add_concept(alice.id, "Mia", "mug", "", [b"img-3"])
    renamed = store.update_concept(alice.id, "Bo", new_name="Biscuit", info="the corgi")
    assert (renamed.name, renamed.category, renamed.info) == ("Biscuit", "dog", "the corgi")
    assert store.get_concept(alice.id, "Bo") is None
    assert store.concept_image(alice.id, "Biscuit", 1) == b"img-2"
    with pytest.raises(StoreError, match="already exists"):
        store.update_concept(alice.id, "Biscuit", new_name="Mia")
    assert store.update_concept(alice.id, "Nobody", new_name="X") is None
    assert sorted(c.name for c in store.list_concepts(alice.id)) == ["Biscuit", "Mia"]


def test_concepts_are_isolated_per_user(config):
    store = ConceptStore(config)
    alice, bob = store.create_user("alice"), store.create_user("bob")
    store.add_concept(alice.id, "Bo", "dog", "a corgi", [b"img-a1", b"img-a2"])
    # Bob may use the same concept name: names are unique per user only.
    store.add_concept(bob.id, "Bo", "cat", "a tabby", [b"img-b"])
    assert [c.category for c in store.list_concepts(alice.id)] == ["dog"]
    assert store.get_concept(bob.id, "Bo").info == "a tabby"
    assert store.concept_image(alice.id, "Bo", 1) == b"img-a2"
    assert store.concept_image(bob.id, "Bo", 1) is None  # bob's Bo has one image
    assert store.concept_image(bob.id, "Bo", 0) == b"img-b"
    assert store.delete_concept(bob.id, "Bo")
    assert store.get_concept(alice.id, "Bo") is not None
    assert not store.delete_concept(bob.id, "Bo")
    with pytest.raises(StoreError, match="already exists"):
        store.add_concept(alice.id, "Bo", "dog", "", [b"x"])


def test_images_are_content_addressed_and_collected(config):
    store = ConceptStore(config)
    alice, bob = store.create_user("alice"), store.create_user("bob")
    a = store.add_concept(alice.id, "Bo", "dog", "", [b"shared", b"only-alice"])
    b = store.add_concept(bob.id, "Mo", "dog", "", [b"shared"])
    sha_shared = hashlib.sha256(b"shared").hexdigest()
    assert a.image_sha256[0] == b.image_sha256[0] == sha_shared
    assert store.images.path(sha_shared).read_bytes() == b"shared"
    store.delete_concept(alice.id, "Bo")
    # The file bob still uses stays; alice's own file is gone.
    assert store.images.exists(sha_shared)
    assert not store.images.exists(a.image_sha256[1])
    store.delete_concept(bob.id, "Mo")
    assert not store.images.exists(sha_shared)


def test_data_survives_reopening(config):
    store = ConceptStore(config)
    user = store.create_user("alice")
    key = store.create_api_key("alice")
    store.add_concept(user.id, "Bo", "dog", "a corgi", [b"png-bytes"])
    store.close()
    reopened = ConceptStore(config)
    assert reopened.authenticate(key) == user
    [bo] = reopened.list_concepts(user.id)
    assert (bo.name, bo.info) == ("Bo", "a corgi")
    assert reopened.concept_image(user.id, "Bo", 0) == b"png-bytes"
    assert reopened.version == SCHEMA_VERSION


def test_upgrade_from_v1_keeps_concepts(config, tmp_path):
    url = normalize_url(config.database_url or f"sqlite:///{tmp_path / 'store' / 'concepts.db'}")
    (tmp_path / "store").mkdir(exist_ok=True)
    engine = sa.create_engine(url)
    assert migrate(engine, target=1) == 1
    hashes = [hashlib.sha256(b).hexdigest() for b in (b"one", b"two")]
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO users (name, is_admin, created_at) VALUES ('alice', false, 0)"))
        conn.execute(sa.text(
            "INSERT INTO concepts (user_id, name, category, info, images, created_at) "
            "VALUES (1, 'Bo', 'dog', 'v1 info', :images, 0)"), {"images": json.dumps(hashes)})
        assert schema_version(conn) == 1
    engine.dispose()
    store = ConceptStore(config)  # opening upgrades
    assert store.version == SCHEMA_VERSION == 3
    [bo] = store.list_concepts(store.get_user("alice").id)
    assert (bo.info, bo.image_sha256) == ("v1 info", hashes)
    with store.engine.connect() as conn:  # v3 counted the references of each file
        refs = dict(conn.execute(sa.text("SELECT sha256, refs FROM image_files")).all())
    assert refs == {h: 1 for h in hashes}
    with store.engine.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("concepts")}
    assert "images" not in columns
    # Migrating again is a no-op.
    assert migrate(store.engine) == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path):
    store = ConceptStore(StoreConfig(root=str(tmp_path)))
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE schema_version SET version = 99"))
    store.close()
    with pytest.raises(StoreError, match="newer than this code"):
        ConceptStore(StoreConfig(root=str(tmp_path)))


def test_config_and_bad_input(monkeypatch, tmp_path):
    monkeypatch.setenv("REPIC_CACHE", str(tmp_path))
    assert StoreConfig().resolved_root() == tmp_path / "serve"
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"


def _race(n: int, fn) -> list:
    """Run fn(i) for i < n in n threads released together; results or exceptions."""
    barrier = threading.Barrier(n)

    def call(i):
        barrier.wait()
        try:
            return fn(i)
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(call, range(n)))


def test_concurrent_duplicates_and_quota_are_refused_cleanly(config):
    store = ConceptStore(config)
    alice, bob = store.create_user("alice"), store.create_user("bob")
    # 8 adds of one name at once: one wins, the others get the duplicate error.
    out = _race(8, lambda i: store.add_concept(alice.id, "Bo", "dog", "", [b"img%d" % i]))
    errors = [o for o in out if isinstance(o, Exception)]
    assert len(out) - len(errors) == 1
    assert all(type(e) is StoreError and "already exists" in str(e) for e in errors), errors
    # 8 different names against a quota of 3: exactly 3 stored, counted in the insert's
    # transaction (a count taken before it lets all 8 through).
    out = _race(8, lambda i: store.add_concept(bob.id, f"C{i}", "dog", "", [b"x"],
                                               max_concepts=3))
    assert sum(not isinstance(o, Exception) for o in out) == 3
    assert all(isinstance(o, LimitReached) for o in out if isinstance(o, Exception)), out
    assert store.count_concepts(bob.id) == 3
    out = _race(4, lambda i: store.create_user("carol"))
    assert sum(not isinstance(o, Exception) for o in out) == 1
    assert all("already exists" in str(o) for o in out if isinstance(o, Exception))


def test_delete_never_removes_a_file_another_concept_uses(config):
    store = ConceptStore(config)
    alice, bob = store.create_user("alice"), store.create_user("bob")
    shared = b"the same photo"
    sha = hashlib.sha256(shared).hexdigest()
    stop = threading.Event()

    def churn():  # alice adds and deletes a concept holding the shared bytes
        while not stop.is_set():
            store.add_concept(alice.id, "Bo", "dog", "", [shared])
            store.delete_concept(alice.id, "Bo")

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(40):
            store.add_concept(bob.id, "Mo", "dog", "", [shared])
            # While bob holds a reference, the file is there, whatever alice does.
            assert store.concept_image(bob.id, "Mo", 0) == shared
            store.delete_concept(bob.id, "Mo")
    finally:
        stop.set()
        t.join()
    assert store.list_concepts(alice.id) == [] and not store.images.exists(sha)
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM image_files")).scalar_one() == 0


def _open_store(config: StoreConfig, barrier) -> int:
    barrier.wait()
    store = ConceptStore(config)
    store.close()
    return store.version


def test_four_replicas_migrate_one_database_at_once(config):
    ctx = multiprocessing.get_context("spawn")
    # Four at once: with two, the WAL switch collided about one run in ten.
    barrier = ctx.Manager().Barrier(4)
    with ctx.Pool(4) as pool:
        versions = pool.starmap(_open_store, [(config, barrier)] * 4)
    assert versions == [SCHEMA_VERSION] * 4
    store = ConceptStore(config)
    user = store.create_user("alice")
    store.add_concept(user.id, "Bo", "dog", "", [b"x"])
    assert [c.name for c in store.list_concepts(user.id)] == ["Bo"]
