"""Tests of knowledge entries, the packaged embedder, the Qdrant store and the retrievers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dspy
import pytest

from nesycd.errors import KnowledgeBaseError
from nesycd.knowledge import (
    DenseRetriever,
    Embedder,
    KnowledgeEntry,
    KnowledgeStore,
    NoRetriever,
    make_retriever,
    parse_teacher_entry,
)
from nesycd.knowledge.store import SIDECAR_NAME

SUMMARY = "The student added the tens before carrying."
KNOWLEDGE = "1. Add the ones first.\n2. Carry a ten when the sum exceeds 9."

PARSE_ACCEPTED = [
    ("plain", f"Learning Summary: {SUMMARY}\nSupplementary Knowledge:\n{KNOWLEDGE}"),
    ("bold_colon_outside", f"**Learning Summary**: {SUMMARY}\n\n**Supplementary Knowledge**:\n{KNOWLEDGE}"),
    ("bold_colon_inside", f"**Learning Summary:** {SUMMARY}\n**Supplementary Knowledge:**\n{KNOWLEDGE}"),
    ("markdown_heading", f"### Learning Summary\n{SUMMARY}\n\n### Supplementary Knowledge\n{KNOWLEDGE}\n"),
    ("numbered", f"1. Learning summary: {SUMMARY}\n2. Supplementary knowledge:\n{KNOWLEDGE}"),
    ("lower_case", f"learning summary:\n{SUMMARY}\nsupplementary knowledge:\n{KNOWLEDGE}"),
    ("reversed_order", f"Supplementary Knowledge:\n{KNOWLEDGE}\nLearning Summary: {SUMMARY}"),
    ("follow_on_question", f"Learning Summary: {SUMMARY}\nSupplementary Knowledge:\n{KNOWLEDGE}\nQuestion: 17 + 25?"),
    (
        "follow_on_student",
        f"Learning Summary: {SUMMARY}\nSupplementary Knowledge:\n{KNOWLEDGE}\n"
        "The student was given another sum.",
    ),
]

PARSE_REJECTED = [
    ("no_knowledge_heading", f"Learning Summary: {SUMMARY}\n1. Add the ones first.\n2. Carry a ten."),
    ("no_summary_heading", f"{SUMMARY}\nSupplementary Knowledge:\n{KNOWLEDGE}"),
    ("empty_summary", f"Learning Summary:\nSupplementary Knowledge:\n{KNOWLEDGE}"),
    ("empty_knowledge", f"Learning Summary: {SUMMARY}\nSupplementary Knowledge:\n   \n"),
    ("knowledge_only_follow_on", f"Learning Summary: {SUMMARY}\nSupplementary Knowledge:\nQuestion: 3 + 4?"),
    ("sentence_not_heading", f"Learning summary is below.\n{SUMMARY}\nSupplementary Knowledge:\n{KNOWLEDGE}"),
    ("empty_reply", ""),
]

TOPIC_ENTRIES = [
    ("math", "Add multi-digit integers. What is 487 + 356?", "Carry into the next column."),
    ("geography", "Name capital cities. What is the capital of Australia?", "Canberra, not Sydney."),
    ("chemistry", "Balance chemical equations. Balance H2 + O2 -> H2O.", "Count atoms on both sides."),
]

QUERIES = [
    "What is 915 + 278?",
    "Which city is the capital of Canada?",
    "Balance the equation Fe + O2 -> Fe2O3.",
]


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def make_entries():
    return [
        KnowledgeEntry(
            id=f"entry-{task}",
            task=task,
            learning_summary=f"Lesson about {task}.",
            supplementary_knowledge=knowledge,
            key=key,
        )
        for task, key, knowledge in TOPIC_ENTRIES
    ]


@pytest.fixture
def folder_store(tmp_path, embedder):
    store = KnowledgeStore(tmp_path / "kb", embedder=embedder)
    store.add(make_entries())
    yield store
    store.close()


@pytest.mark.parametrize("name,reply", PARSE_ACCEPTED, ids=[case[0] for case in PARSE_ACCEPTED])
def test_parse_accepts_heading_variants(name, reply):
    summary, knowledge = parse_teacher_entry(reply)
    assert summary == SUMMARY
    assert knowledge == KNOWLEDGE


@pytest.mark.parametrize("name,reply", PARSE_REJECTED, ids=[case[0] for case in PARSE_REJECTED])
def test_parse_rejects_missing_part(name, reply):
    with pytest.raises(KnowledgeBaseError) as caught:
        parse_teacher_entry(reply)
    assert repr(reply[:200]) in str(caught.value)


def test_parse_quotes_only_200_chars():
    reply = "Learning Summary: " + "x" * 400
    with pytest.raises(KnowledgeBaseError) as caught:
        parse_teacher_entry(reply)
    assert repr(reply[:200]) in str(caught.value)
    assert "x" * 201 not in str(caught.value)


def test_entry_dict_round_trip():
    entry = KnowledgeEntry(
        task="math",
        learning_summary="s",
        supplementary_knowledge="k",
        key="q",
        source_run="run-1",
        teacher_model="teacher",
    )
    data = json.loads(json.dumps(entry.to_dict()))
    assert KnowledgeEntry.from_dict(data) == entry
    assert len(entry.id) == 32
    assert entry.created_at.endswith("+00:00")
    assert entry.text == "Learning summary: s\nSupplementary knowledge:\nk"


def test_entry_from_dict_missing_key():
    with pytest.raises(KnowledgeBaseError, match="learning_summary"):
        KnowledgeEntry.from_dict({"task": "t", "supplementary_knowledge": "k", "key": "q"})


def test_embedder_vectors_normalised(embedder):
    vectors = embedder.embed(["first text", "second text"])
    assert len(vectors) == 2
    assert len(vectors[0]) == embedder.dimension
    assert sum(value * value for value in vectors[0]) == pytest.approx(1.0, abs=1e-4)


def test_embedder_offline_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = Embedder("nesycd-test/no-such-model")
    with pytest.raises(KnowledgeBaseError, match="local folder"):
        missing.embed(["text"])


def test_embedder_missing_folder(tmp_path):
    with pytest.raises(KnowledgeBaseError, match="does not exist"):
        Embedder(str(tmp_path / "absent"))


def test_store_query_returns_closest(folder_store):
    for query, (task, _, _) in zip(QUERIES, TOPIC_ENTRIES):
        hits = folder_store.search(query, k=3)
        assert hits[0].entry.id == f"entry-{task}", query


def test_store_hits_sorted_and_ranked(folder_store):
    hits = folder_store.search(QUERIES[0], k=3)
    scores = [hit.score for hit in hits]
    assert scores == sorted(scores, reverse=True)
    assert [hit.rank for hit in hits] == [1, 2, 3]


def test_store_task_filter(folder_store):
    hits = folder_store.search(QUERIES[0], k=3, task="geography")
    assert [hit.entry.task for hit in hits] == ["geography"]


def test_store_min_score(folder_store):
    unfiltered = folder_store.search(QUERIES[1], k=3)
    threshold = (unfiltered[0].score + unfiltered[1].score) / 2
    hits = folder_store.search(QUERIES[1], k=3, min_score=threshold)
    assert [hit.entry.id for hit in hits] == [unfiltered[0].entry.id]


def test_store_skips_inactive(folder_store):
    retired = folder_store.get("entry-math")
    retired.status = "retired"
    folder_store.add([retired])
    active_ids = [hit.entry.id for hit in folder_store.search(QUERIES[0], k=3)]
    all_ids = [hit.entry.id for hit in folder_store.search(QUERIES[0], k=3, status=None)]
    assert "entry-math" not in active_ids
    assert "entry-math" in all_ids


def test_store_get_delete_count(folder_store):
    assert folder_store.count() == 3
    assert folder_store.get("entry-math").task == "math"
    folder_store.delete("entry-math")
    assert folder_store.count() == 2
    with pytest.raises(KnowledgeBaseError, match="entry-math"):
        folder_store.get("entry-math")
    with pytest.raises(KnowledgeBaseError, match="entry-math"):
        folder_store.delete("entry-math")


def test_store_reopen_keeps_entries(tmp_path, embedder):
    location = tmp_path / "kb"
    with KnowledgeStore(location, embedder=embedder) as store:
        store.add(make_entries())
        expected = [entry.to_dict() for entry in store.entries()]
    assert store.closed

    with KnowledgeStore(location, embedder=embedder) as reopened:
        assert [entry.to_dict() for entry in reopened.entries()] == expected
        assert reopened.search(QUERIES[2], k=1)[0].entry.id == "entry-chemistry"


def test_memory_and_folder_agree(folder_store, embedder):
    with KnowledgeStore(":memory:", embedder=embedder) as memory_store:
        memory_store.add(make_entries())
        for query in QUERIES:
            memory_ids = [hit.entry.id for hit in memory_store.search(query, k=3)]
            folder_ids = [hit.entry.id for hit in folder_store.search(query, k=3)]
            assert memory_ids == folder_ids, query


def test_store_sidecar_mismatch(tmp_path, embedder):
    location = tmp_path / "kb"
    KnowledgeStore(location, embedder=embedder).close()
    sidecar = location / SIDECAR_NAME
    data = json.loads(sidecar.read_text())
    data["collections"]["nesycd_kb"] = {"embedder_id": "other/model-768", "dimension": 768}
    sidecar.write_text(json.dumps(data))

    with pytest.raises(KnowledgeBaseError) as caught:
        KnowledgeStore(location, embedder=embedder)
    message = str(caught.value)
    assert "other/model-768" in message
    assert embedder.model_id in message
    assert "768" in message
    assert str(embedder.dimension) in message
    assert "rebuild" in message


def test_store_mismatch_releases_lock(tmp_path, embedder):
    location = tmp_path / "kb"
    KnowledgeStore(location, embedder=embedder).close()
    (location / SIDECAR_NAME).write_text(json.dumps({"format": 1, "collections": {"nesycd_kb": {}}}))
    with pytest.raises(KnowledgeBaseError):
        KnowledgeStore(location, embedder=embedder)
    (location / SIDECAR_NAME).unlink()
    KnowledgeStore(location, embedder=embedder).close()


def test_store_folder_open_twice(tmp_path, embedder):
    location = tmp_path / "kb"
    with KnowledgeStore(location, embedder=embedder) as first:
        with pytest.raises(KnowledgeBaseError, match="already open"):
            KnowledgeStore(location, embedder=embedder)
        assert first.count() == 0


def test_store_closed_raises(tmp_path, embedder):
    store = KnowledgeStore(tmp_path / "kb", embedder=embedder)
    store.close()
    with pytest.raises(KnowledgeBaseError, match="closed"):
        store.count()


def test_dense_retriever_counts(folder_store):
    retriever = DenseRetriever(k=3, insert=2).bind(folder_store)
    prediction = retriever(query=QUERIES[1])
    assert len(prediction.passages) == 2
    assert len(prediction.ids) == 3
    assert prediction.inserted_ids == prediction.ids[:2]
    assert prediction.passages[0] == folder_store.get(prediction.ids[0]).text
    assert prediction.k == 3


def test_dense_retriever_task_filter(folder_store):
    retriever = DenseRetriever(k=3, task_filter=True).bind(folder_store)
    prediction = retriever(query=QUERIES[1], task="math")
    assert prediction.ids == ["entry-math"]
    with pytest.raises(KnowledgeBaseError, match="task"):
        retriever(query=QUERIES[1])


def test_no_retriever_empty(folder_store):
    retriever = NoRetriever().bind(folder_store)
    prediction = retriever(query=QUERIES[0], task="math")
    assert prediction.passages == []
    assert prediction.ids == []


def test_dense_retriever_unbound():
    with pytest.raises(KnowledgeBaseError, match="bind"):
        DenseRetriever()(query="anything")


def test_make_retriever_round_trip():
    dense = DenseRetriever(k=5, insert=2, min_score=0.3, task_filter=True)
    assert make_retriever(dense.config()).config() == dense.config()
    assert isinstance(make_retriever(NoRetriever().config()), NoRetriever)
    with pytest.raises(KnowledgeBaseError, match="dense"):
        make_retriever({"kind": "bm26"})


def test_retriever_rejects_bad_insert():
    with pytest.raises(KnowledgeBaseError, match="insert"):
        DenseRetriever(k=2, insert=3)


class _Program(dspy.Module):
    def __init__(self, retriever):
        super().__init__()
        self.retriever = retriever
        self.answer = dspy.Predict("question -> answer")


def test_program_state_serialisable(folder_store, tmp_path):
    program = _Program(DenseRetriever(k=2).bind(folder_store))
    state = program.dump_state()
    assert json.loads(json.dumps(state)) == state
    program.save(str(tmp_path / "program.json"))
    program.load(str(tmp_path / "program.json"))
    assert program.retriever.store is folder_store


def test_program_copy_shares_store(folder_store):
    program = _Program(DenseRetriever(k=2).bind(folder_store))
    copied = program.deepcopy()
    assert copied.retriever is not program.retriever
    assert copied.retriever.store is folder_store


def test_package_import_is_light():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    heavy = ("torch", "sentence_transformers", "qdrant_client")
    code = f"import sys, nesycd.knowledge; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
        check=True,
    )
    assert result.stdout.strip() == "[]"


def _linked_copy(source: Path, target: Path) -> Path:
    """A folder of symlinks to a sentence-transformers model, whose config files the test can rewrite."""
    for path in source.rglob("*"):
        if path.is_file():
            link = target / path.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    return target


def _write_json(path: Path, value) -> None:
    """Replace the file or symlink at `path` with `value` as JSON, leaving the linked original alone."""
    path.unlink()
    path.write_text(json.dumps(value))


def test_embedder_dimension_without_loading_the_model():
    embedder = Embedder()
    assert embedder.dimension == 384
    assert embedder._model is None
    assert len(embedder.embed(["one text"])[0]) == 384


def test_embedder_dimension_follows_the_pooling_config(tmp_path):
    from nesycd.knowledge.embedder import _packaged_model_path

    folder = _linked_copy(_packaged_model_path(), tmp_path / "model")
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    _write_json(folder / "1_Pooling" / "config.json", {**pooling, "pooling_mode_max_tokens": True})
    embedder = Embedder(str(folder))
    assert embedder.dimension == 768  # mean and max pooling, concatenated
    assert embedder._model is None
    assert len(embedder.embed(["one text"])[0]) == 768


def test_embedder_dimension_disagreeing_with_the_model_is_caught(monkeypatch):
    from nesycd.knowledge import embedder as embedder_module

    monkeypatch.setattr(embedder_module, "declared_dimension", lambda folder: 512)
    embedder = Embedder()
    assert embedder.dimension == 512
    with pytest.raises(KnowledgeBaseError, match="produces 384-dimensional vectors.*declare 512"):
        embedder.embed(["one text"])


def test_embedder_dimension_of_unknown_modules_loads_the_model(tmp_path, monkeypatch):
    from nesycd.knowledge import embedder as embedder_module
    from nesycd.knowledge.embedder import _packaged_model_path, declared_dimension

    folder = _linked_copy(_packaged_model_path(), tmp_path / "model")
    assert declared_dimension(folder) == 384
    modules = json.loads((folder / "modules.json").read_text())
    _write_json(folder / "modules.json", modules[:2] + [{**modules[2], "type": "custom.Projection"}])
    assert declared_dimension(folder) is None
    _write_json(folder / "modules.json", modules)
    (folder / "1_Pooling" / "config.json").unlink()
    assert declared_dimension(folder) is None

    monkeypatch.setattr(embedder_module, "declared_dimension", lambda folder: None)
    embedder = Embedder()
    assert embedder.dimension == 384
    assert embedder._model is not None
