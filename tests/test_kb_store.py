"""Tests of the KnowledgeStore backends, the in-process index, server errors and near-duplicate merging."""

import socket

import numpy as np
import pytest

from nesycd.errors import KnowledgeBaseError
from nesycd.knowledge import Embedder, KnowledgeEntry, KnowledgeStore
from nesycd.knowledge.index import VectorIndex

ENTRIES = [
    ("math", "Add multi-digit integers. What is 487 + 356?",
     "The student forgot to carry the tens.", "Carry a ten into the next column when a column sum exceeds nine."),
    ("math", "Multiply two numbers. What is 12 times 13?",
     "The student multiplied only the ones digits.", "Multiply every digit and add the partial products."),
    ("geography", "Name capital cities. What is the capital of Australia?",
     "The student named the largest city.", "Canberra is the capital of Australia; Sydney is its largest city."),
    ("geography", "Name rivers. Which river flows through Cairo?",
     "The student confused African rivers.", "The Nile flows through Cairo; the Congo flows through Kinshasa."),
    ("chemistry", "Balance chemical equations. Balance H2 + O2 -> H2O.",
     "The student balanced hydrogen but not oxygen.", "Count the atoms of every element on both sides."),
    ("sports", "Judge plausibility. Did the goalie score a touchdown?",
     "The student mixed up sports.", "Goalies play soccer or hockey; touchdowns belong to American football."),
]

QUERIES = [
    "What is 915 + 278?",
    "Which city is the capital of Canada?",
    "Balance the equation Fe + O2 -> Fe2O3.",
    "Is it plausible that a striker hit a home run?",
    "Which river runs through Paris?",
]


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def make_entry(index, task, key, summary=None, knowledge=None, **fields):
    return KnowledgeEntry(
        id=f"e{index}",
        task=task,
        learning_summary=summary or f"Lesson {index}.",
        supplementary_knowledge=knowledge or f"Fact {index}.",
        key=key,
        source_example_id=f"example-{index}",
        failure_id=f"failure-{index}",
        **fields,
    )


def make_entries():
    return [make_entry(index, *fields) for index, fields in enumerate(ENTRIES)]


def ranking(store, query, **options):
    return [(hit.entry.id, round(hit.score, 4)) for hit in store.search(query, k=4, **options)]


def closed_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("task", [None, "geography"])
def test_backends_agree(tmp_path, embedder, task):
    with KnowledgeStore(":memory:", embedder=embedder) as memory, KnowledgeStore(
        tmp_path / "kb", embedder=embedder
    ) as folder:
        memory.add(make_entries())
        folder.add(make_entries())
        for query in QUERIES:
            assert ranking(memory, query, task=task) == ranking(folder, query, task=task), query


@pytest.mark.parametrize("task", [None, "math"])
def test_index_matches_qdrant_scan(embedder, task):
    with KnowledgeStore(":memory:", embedder=embedder) as indexed, KnowledgeStore(
        ":memory:", embedder=embedder, vector_index=False
    ) as scanned:
        indexed.add(make_entries())
        scanned.add(make_entries())
        for query in QUERIES:
            assert ranking(indexed, query, task=task) == ranking(scanned, query, task=task), query


def test_index_reloads_from_folder(tmp_path, embedder):
    with KnowledgeStore(tmp_path / "kb", embedder=embedder) as store:
        store.add(make_entries())
        expected = ranking(store, QUERIES[1])
    with KnowledgeStore(tmp_path / "kb", embedder=embedder) as reopened:
        assert ranking(reopened, QUERIES[1]) == expected


def test_index_follows_delete_and_status(embedder):
    with KnowledgeStore(":memory:", embedder=embedder) as store:
        store.add(make_entries())
        store.delete("e2")
        retired = store.get("e3")
        retired.status = "retired"
        store.add([retired])
        ids = [hit.entry.id for hit in store.search(QUERIES[4], k=6)]
        assert "e2" not in ids
        assert "e3" not in ids
        assert "e3" in [hit.entry.id for hit in store.search(QUERIES[4], k=6, status=None)]


def test_vector_index_top_k_order():
    index = VectorIndex(2)
    index.upsert(["a", "b", "c"], [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], ["t", "t", "u"], ["active"] * 3)
    assert [entry_id for entry_id, _ in index.search([1.0, 0.0], 2)] == ["a", "c"]
    assert [entry_id for entry_id, _ in index.search([1.0, 0.0], 5, task="u")] == ["c"]
    assert index.search([1.0, 0.0], 2, task="missing") == []
    index.remove("a")
    assert [entry_id for entry_id, _ in index.search([1.0, 0.0], 3)] == ["c", "b"]


def test_unreachable_url_fails_clearly(embedder):
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(KnowledgeBaseError) as caught:
        KnowledgeStore(url, embedder=embedder, timeout_s=2)
    message = str(caught.value)
    assert url in message
    assert "Start the server" in message


def test_url_rejects_vector_index(embedder):
    with pytest.raises(KnowledgeBaseError, match="vector_index"):
        KnowledgeStore("http://127.0.0.1:1", embedder=embedder, vector_index=True)


def test_collection_metadata_records_embedder(embedder):
    with KnowledgeStore(":memory:", embedder=embedder) as store:
        info = store._client.get_collection(store.collection)
        assert info.config.metadata["nesycd_embedder_id"] == embedder.model_id
        assert info.config.metadata["nesycd_dimension"] == embedder.dimension


def test_named_collections_are_versions(tmp_path, embedder):
    with KnowledgeStore(tmp_path / "kb", collection="kb_v1", embedder=embedder) as first:
        first.add(make_entries()[:2])
    with KnowledgeStore(tmp_path / "kb", collection="kb_v2", embedder=embedder) as second:
        second.add(make_entries())
        assert second.collections() == ["kb_v1", "kb_v2"]
        assert second.count() == len(ENTRIES)
    with KnowledgeStore(tmp_path / "kb", collection="kb_v1", embedder=embedder) as first:
        assert first.count() == 2


def test_missing_collection_without_create(tmp_path, embedder):
    KnowledgeStore(tmp_path / "kb", collection="kb_v1", embedder=embedder).close()
    with pytest.raises(KnowledgeBaseError) as caught:
        KnowledgeStore(tmp_path / "kb", collection="kb_v9", embedder=embedder, create=False)
    assert "kb_v9" in str(caught.value)
    assert "kb_v1" in str(caught.value)


def test_recreate_empties_collection(tmp_path, embedder):
    with KnowledgeStore(tmp_path / "kb", embedder=embedder) as store:
        store.add(make_entries())
    with KnowledgeStore(tmp_path / "kb", embedder=embedder, recreate=True) as store:
        assert store.count() == 0
        assert store.search(QUERIES[0], k=3) == []


def near_duplicate(index, task="math"):
    """An entry with another key but the text of e0, as a teacher writes for a similar error."""
    _, _, summary, knowledge = ENTRIES[0]
    return make_entry(index, task, "Add two numbers. What is 58 + 67?", summary, knowledge + " ")


def test_dedup_merges_provenance(embedder):
    with KnowledgeStore(":memory:", embedder=embedder) as store:
        store.add(make_entries())
        holders = store.add([near_duplicate(10)])
        merged = store.get("e0")
        assert holders == ["e0"]
        assert store.count() == len(ENTRIES)
        assert merged.source_example_ids == ["example-0", "example-10"]
        assert merged.failure_ids == ["failure-0", "failure-10"]
        assert merged.merged_ids == ["e10"]
        assert merged.source_example_id == "example-0"
        assert merged.learning_summary == ENTRIES[0][2]


def test_dedup_within_one_batch(embedder):
    with KnowledgeStore(":memory:", embedder=embedder) as store:
        holders = store.add([*make_entries(), near_duplicate(10), near_duplicate(11)])
        assert holders[-2:] == ["e0", "e0"]
        assert store.get("e0").merged_ids == ["e10", "e11"]
        assert store.count() == len(ENTRIES)


def test_dedup_keeps_other_tasks_apart(embedder):
    with KnowledgeStore(":memory:", embedder=embedder) as store:
        store.add(make_entries())
        holders = store.add([near_duplicate(10, task="arithmetic")])
        assert holders == ["e10"]
        assert store.count() == len(ENTRIES) + 1


def test_dedup_threshold_and_switch(embedder):
    with KnowledgeStore(":memory:", embedder=embedder, dedup_threshold=None) as store:
        store.add(make_entries())
        store.add([near_duplicate(10)])
        assert store.count() == len(ENTRIES) + 1
    with KnowledgeStore(":memory:", embedder=embedder) as store:
        store.add(make_entries())
        store.add([near_duplicate(10)], dedup=False)
        assert store.count() == len(ENTRIES) + 1
    with KnowledgeStore(":memory:", embedder=embedder, dedup_threshold=0.05) as store:
        holders = store.add(make_entries()[:2])
        assert holders == ["e0", "e0"]


def test_same_id_replaces_not_merges(embedder):
    with KnowledgeStore(":memory:", embedder=embedder) as store:
        store.add(make_entries())
        edited = store.get("e1")
        edited.learning_summary, edited.supplementary_knowledge = ENTRIES[0][2], ENTRIES[0][3]
        holders = store.add([edited])
        assert holders == ["e1"]
        assert store.count() == len(ENTRIES)
        assert store.get("e1").merged_ids == []


def test_add_with_vectors(embedder):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2, embedder.dimension))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    entries = make_entries()[:2]
    with KnowledgeStore(":memory:", embedder=embedder) as store:
        store.add(entries, vectors=vectors)
        hits = store.search_vector(vectors[1].tolist(), k=1)
        assert hits[0].entry.id == "e1"
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        with pytest.raises(KnowledgeBaseError, match="unit length"):
            store.add(entries, vectors=vectors * 2)
        with pytest.raises(KnowledgeBaseError, match="shape"):
            store.add(entries, vectors=vectors[:1])


def test_add_rejects_repeated_id(embedder):
    with KnowledgeStore(":memory:", embedder=embedder) as store:
        with pytest.raises(KnowledgeBaseError, match="twice"):
            store.add([make_entries()[0], make_entries()[0]])


def test_generation_counts_changes(embedder):
    with KnowledgeStore(":memory:", embedder=embedder) as store:
        before = store.generation
        store.add(make_entries())
        store.delete("e0")
        assert store.generation == before + 2


def test_entry_lists_from_single_fields():
    entry = make_entry(1, "math", "key")
    assert entry.source_example_ids == ["example-1"]
    assert entry.failure_ids == ["failure-1"]
    with pytest.raises(KnowledgeBaseError, match="failure_ids"):
        make_entry(2, "math", "key", failure_ids="failure-9")
