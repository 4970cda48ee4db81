"""Tests of the BM25, hybrid and adaptive retrievers, make_retriever and their traces."""

import json

import dspy
import pytest

from nesycd.errors import KnowledgeBaseError
from nesycd.knowledge import (
    AdaptiveRetriever,
    BM25Retriever,
    DenseRetriever,
    Embedder,
    HybridRetriever,
    KnowledgeEntry,
    KnowledgeStore,
    NoRetriever,
    attach_lm,
    make_retriever,
)
from nesycd.knowledge.adaptive import probe_prompt
from nesycd.tracing import TraceCallback, TraceStore, query_file

KEYS = [
    ("boolean", "Evaluate boolean expressions. not ( True ) and ( False ) is"),
    ("boolean", "Evaluate boolean expressions. True or False and not True is"),
    ("navigate", "Follow the steps and tell whether you return to the start. Take 3 steps. Turn left."),
    ("sports", "Is the sentence plausible? Tom Brady threw a touchdown pass."),
    ("sports", "Is the sentence plausible? Lionel Messi scored a penalty kick."),
]


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture
def store(embedder):
    with KnowledgeStore(":memory:", embedder=embedder, dedup_threshold=None) as opened:
        opened.add(
            [
                KnowledgeEntry(
                    id=f"k{index}", task=task, learning_summary=f"Summary {index}.",
                    supplementary_knowledge=f"Knowledge {index}.", key=key,
                )
                for index, (task, key) in enumerate(KEYS)
            ]
        )
        yield opened


class FixedProbe:
    """A confidence probe that returns a set value and records the prompts it saw."""

    def __init__(self, confidence):
        self.confidence = confidence
        self.prompts = []

    def probe_confidence(self, prompt, max_new_tokens=16):
        self.prompts.append((prompt, max_new_tokens))
        return self.confidence


def test_bm25_ranks_by_words(store):
    prediction = BM25Retriever(k=2).bind(store)(query="Messi penalty kick")
    assert prediction.ids[0] == "k4"
    assert prediction.scores[0] > 0


def test_bm25_skips_unrelated(store):
    prediction = BM25Retriever(k=5).bind(store)(query="zebra xylophone")
    assert prediction.ids == []
    assert prediction.passages == []


def test_bm25_task_filter(store):
    prediction = BM25Retriever(k=5, task_filter=True).bind(store)(query="plausible sentence", task="sports")
    assert set(prediction.ids) == {"k3", "k4"}


def test_bm25_sees_added_entries(store):
    retriever = BM25Retriever(k=1).bind(store)
    assert retriever(query="quokka habitat").ids == []
    store.add([KnowledgeEntry(id="new", task="animals", learning_summary="s", supplementary_knowledge="k",
                              key="Where does the quokka live? Its habitat is Rottnest Island.")])
    assert retriever(query="quokka habitat").ids == ["new"]


def test_bm25_fields_match_dense(store):
    dense = DenseRetriever(k=3, insert=2).bind(store)(query="Tom Brady touchdown")
    lexical = BM25Retriever(k=3, insert=2).bind(store)(query="Tom Brady touchdown")
    assert sorted(lexical.keys()) == sorted(dense.keys())
    assert lexical.inserted_ids == lexical.ids[:2]
    assert lexical.passages[0] == store.get(lexical.ids[0]).text


def test_hybrid_fuses_rankings(store):
    hybrid = HybridRetriever(k=3, candidates=5).bind(store)
    prediction = hybrid(query="Tom Brady touchdown pass")
    assert prediction.ids[0] == "k3"
    assert prediction.scores[0] == pytest.approx(2 / 61)
    assert prediction.scores == sorted(prediction.scores, reverse=True)


def test_hybrid_min_score(store):
    prediction = HybridRetriever(k=3, candidates=5, min_score=1.5 / 61).bind(store)(query="Tom Brady touchdown pass")
    assert prediction.ids == ["k3"]


def test_hybrid_rejects_small_pool():
    with pytest.raises(KnowledgeBaseError, match="candidates"):
        HybridRetriever(k=5, candidates=3)


@pytest.mark.parametrize(
    "retriever",
    [
        DenseRetriever(k=4, insert=2, min_score=0.2, task_filter=True),
        BM25Retriever(k=2, insert=1),
        HybridRetriever(k=3, insert=0, candidates=7, rrf_k=10),
        NoRetriever(),
        AdaptiveRetriever(BM25Retriever(k=2), threshold=40.0, max_new_tokens=8),
    ],
    ids=["dense", "bm25", "hybrid", "none", "adaptive"],
)
def test_config_round_trip(retriever):
    rebuilt = make_retriever(retriever.config())
    assert type(rebuilt) is type(retriever)
    assert rebuilt.config() == retriever.config()
    assert json.loads(json.dumps(retriever.config())) == retriever.config()


def test_make_retriever_switches_kind():
    hybrid = HybridRetriever(k=4, candidates=9)
    dense = make_retriever({**hybrid.config(), "kind": "dense"})
    assert dense.config() == {"kind": "dense", "k": 4, "insert": 1, "min_score": None, "task_filter": False}


def test_make_retriever_rejects_unknown():
    with pytest.raises(KnowledgeBaseError, match="bm26"):
        make_retriever({"kind": "bm26"})
    with pytest.raises(KnowledgeBaseError, match="top_k"):
        make_retriever({"kind": "bm25", "top_k": 3})


def test_make_retriever_flat_adaptive():
    adaptive = make_retriever({"kind": "adaptive", "k": 5, "insert": 2, "threshold": 50})
    assert adaptive.inner.config()["k"] == 5
    assert adaptive.threshold == 50.0


def test_adaptive_retrieves_when_unsure(store):
    probe = FixedProbe(40.0)
    retriever = AdaptiveRetriever(DenseRetriever(k=2), threshold=68.0).bind(store).attach(probe)
    prediction = retriever(query="Is the sentence plausible?\nTom Brady threw a touchdown pass.", task="sports")
    assert prediction.retrieved is True
    assert prediction.confidence == 40.0
    assert len(prediction.ids) == 2
    assert prediction.k == 2


def test_adaptive_skips_when_confident(store):
    retriever = AdaptiveRetriever(DenseRetriever(k=2), threshold=68.0).bind(store).attach(FixedProbe(90.0))
    prediction = retriever(query="Tom Brady threw a touchdown pass.")
    assert prediction.retrieved is False
    assert prediction.ids == []
    assert prediction.passages == []
    assert prediction.k == 0


def test_adaptive_threshold_is_inclusive(store):
    retriever = AdaptiveRetriever(DenseRetriever(k=1), threshold=68.0).bind(store).attach(FixedProbe(68.0))
    assert retriever(query="touchdown").retrieved is True


def test_adaptive_probe_prompt(store):
    probe = FixedProbe(10.0)
    AdaptiveRetriever(DenseRetriever(k=1), max_new_tokens=5).bind(store).attach(probe)(query="Describe.\nWhat is 2+2?")
    prompt, tokens = probe.prompts[0]
    assert prompt == probe_prompt("Describe.\nWhat is 2+2?")
    assert prompt.endswith("Question: What is 2+2?\nAnswer: Let's think step by step.")
    assert prompt.startswith("Describe.")
    assert tokens == 5


def test_adaptive_without_lm_fails(store):
    with pytest.raises(KnowledgeBaseError, match="attach_lm"):
        AdaptiveRetriever(DenseRetriever()).bind(store)(query="anything")


def test_adaptive_rejects_remote_lm():
    with pytest.raises(KnowledgeBaseError, match="in-process"):
        AdaptiveRetriever(DenseRetriever()).attach(dspy.LM("openai/some-model"))


class Program(dspy.Module):
    def __init__(self, retriever):
        super().__init__()
        self.retriever = retriever
        self.answer = dspy.Predict("question -> answer")

    def forward(self, question):
        return self.retriever(query=question)


def test_attach_lm_finds_adaptive(store):
    program = Program(AdaptiveRetriever(DenseRetriever(k=1)).bind(store))
    assert attach_lm(program, FixedProbe(0.0)) == 1
    assert program(question="touchdown").retrieved is True


def test_attach_lm_ignores_others():
    program = Program(DenseRetriever())
    assert attach_lm(program, object()) == 0


def test_program_copy_shares_probe(store):
    program = Program(AdaptiveRetriever(DenseRetriever(k=1)).bind(store))
    probe = FixedProbe(0.0)
    attach_lm(program, probe)
    copied = program.deepcopy()
    copied(question="touchdown")
    assert copied.retriever is not program.retriever
    assert len(probe.prompts) == 1
    assert copied.retriever.store is store


def test_adaptive_state_serialisable(store, tmp_path):
    program = Program(AdaptiveRetriever(HybridRetriever(k=1)).bind(store).attach(FixedProbe(0.0)))
    state = program.dump_state()
    assert json.loads(json.dumps(state)) == state


def test_adaptive_traced_once(store, tmp_path):
    traces = TraceStore(tmp_path / "traces.duckdb")
    retriever = AdaptiveRetriever(DenseRetriever(k=2, insert=1)).bind(store).attach(FixedProbe(5.0))
    with dspy.context(callbacks=[TraceCallback(traces)]):
        retriever(query="Tom Brady touchdown", task="sports")
    traces.close()
    _, rows = query_file(tmp_path / "traces.duckdb", "select k, hits, inserted from retrievals")
    assert len(rows) == 1
    assert rows[0][0] == 2
    assert len(json.loads(rows[0][1])) == 2
    assert len(json.loads(rows[0][2])) == 1
