"""Tests of the `nesycd kb` commands on a run folder with real Qdrant and DuckDB files."""

import json
import os
import shlex
import socket
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from nesycd.cli.main import app
from nesycd.errors import KnowledgeBaseError
from nesycd.knowledge import Embedder, KnowledgeEntry, KnowledgeStore
from nesycd.knowledge.usage import ENTRY_USAGE_SQL
from nesycd.tracing import TraceStore, query_file

ENTRIES = [
    ("entry-a", "logic", "Evaluate boolean expressions.\nnot ( True ) and ( False ) is",
     "Lesson A: the student ignored the parentheses.", "1. Evaluate the parentheses before and, or."),
    ("entry-b", "logic", "Evaluate boolean expressions.\nTrue or False and not True is",
     "Lesson B: the student applied or before and.", "1. The operator and binds tighter than or."),
    ("entry-c", "sports", "Is the sentence plausible?\nTom Brady threw a touchdown pass.",
     "Lesson C: the student judged a normal pass implausible.", "1. Quarterbacks such as Tom Brady throw passes."),
]

runner = CliRunner()


def make_entries():
    return [
        KnowledgeEntry(id=entry_id, task=task, key=key, learning_summary=summary,
                       supplementary_knowledge=knowledge, source_example_id=f"ex-{entry_id}")
        for entry_id, task, key, summary, knowledge in ENTRIES
    ]


def write_traces(path):
    """Write a trace file whose retrievals and predictions use the entries in known ways."""
    store = TraceStore(path)
    store.start_run("run-1", program="programs/bbh.py", command="nesycd compile", config={"embedder": None})
    for entry in make_entries():
        store.record("kb_entries", {
            "entry_id": entry.id, "stage": "write_knowledge", "failure_id": None, "example_id": entry.source_example_id,
            "task": entry.task, "learning_summary": entry.learning_summary,
            "supplementary_knowledge": entry.supplementary_knowledge, "key_text": entry.key,
            "embedder": "packaged", "collection": "nesycd_kb", "status": "active",
        })
    for hits, inserted in ((["entry-a", "entry-b"], ["entry-a"]), (["entry-a"], ["entry-a"]), (["entry-c", "entry-a"], ["entry-c"])):
        store.record("retrievals", {
            "query": "q", "k": 2, "inserted": inserted,
            "hits": [{"entry_id": entry_id, "score": 0.5, "rank": rank} for rank, entry_id in enumerate(hits, start=1)],
        })
    predictions = [
        ("nesycd", "logic", ["entry-a"], True),
        ("nesycd", "logic", ["entry-a"], False),
        ("nesycd", "logic", [], True),
        ("nesycd", "sports", ["entry-c"], True),
        ("base", "logic", [], False),
        ("base", "sports", [], True),
    ]
    for label, task, ids, correct in predictions:
        store.record("predictions", {"model_label": label, "task": task, "knowledge_ids": ids, "correct": correct})
    store.finish_run("succeeded")
    store.close()


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture
def run_dir(tmp_path, embedder):
    folder = tmp_path / "run"
    folder.mkdir()
    write_traces(folder / "traces.duckdb")
    with KnowledgeStore(folder / "kb", embedder=embedder) as store:
        store.add(make_entries())
    return folder


def invoke(*args, env=None):
    result = runner.invoke(app, ["kb", *map(str, args)], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.stdout


def stored(folder, embedder, collection="nesycd_kb"):
    with KnowledgeStore(folder, embedder=embedder, collection=collection) as store:
        return {entry.id: entry for entry in store.entries()}


def test_list_shows_entries(run_dir):
    output = invoke("list", run_dir)
    assert "3 of 3 entries" in output
    assert "entry-a" in output
    assert "Lesson C: the student" in output


def test_list_filters_task(run_dir):
    output = invoke("list", run_dir, "--task", "sports")
    assert "1 of 3 entries" in output
    assert "entry-a" not in output


def test_list_missing_folder(tmp_path):
    with pytest.raises(KnowledgeBaseError, match="not found"):
        invoke("list", tmp_path / "absent")


def test_show_by_prefix(run_dir):
    output = invoke("show", run_dir, "entry-c", "--json")
    assert json.loads(output)["learning_summary"] == ENTRIES[2][3]
    with pytest.raises(KnowledgeBaseError, match="3 entry ids"):
        invoke("show", run_dir, "entry-")


@pytest.mark.parametrize("kind", ["dense", "bm25", "hybrid"])
def test_search_ranks_match(run_dir, kind):
    output = invoke("search", run_dir, "Brady touchdown pass plausible", "--retriever", kind, "--json")
    hits = json.loads(output)
    assert hits[0]["id"] == "entry-c"


def test_export_import_jsonl(run_dir, tmp_path, embedder):
    invoke("export", run_dir, tmp_path / "kb.jsonl")
    lines = (tmp_path / "kb.jsonl").read_text().splitlines()
    assert len(lines) == 3
    invoke("import", tmp_path / "copy", tmp_path / "kb.jsonl")
    original = stored(run_dir / "kb", embedder)
    copied = stored(tmp_path / "copy", embedder)
    assert copied == original


def test_export_import_markdown(run_dir, tmp_path, embedder):
    invoke("export", run_dir, tmp_path / "kb.md")
    text = (tmp_path / "kb.md").read_text()
    assert f"<!-- nesycd:learning_summary -->\n{ENTRIES[0][3]}" in text
    invoke("import", tmp_path / "copy", tmp_path / "kb.md")
    assert stored(tmp_path / "copy", embedder) == stored(run_dir / "kb", embedder)


def test_import_reports_lines(tmp_path, embedder):
    good = make_entries()[0].to_dict()
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({key: value for key, value in good.items() if key != "learning_summary"} | {"id": "x2"}),
        json.dumps(good | {"id": "x3", "summary": "typo", "status": "activ"}),
        "",
        json.dumps(good),
    ]
    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(KnowledgeBaseError) as caught:
        invoke("import", tmp_path / "kb", source)
    message = str(caught.value)
    assert "line 2: invalid JSON" in message
    assert "line 3: field 'learning_summary'" in message
    assert "line 4: unknown field(s) ['summary']" in message
    assert "line 4: status 'activ'" in message
    assert "line 6: entry id 'entry-a' repeats the record of line 1" in message
    assert not (tmp_path / "kb").exists()


def test_import_markdown_lines(tmp_path):
    source = tmp_path / "bad.md"
    source.write_text(textwrap.dedent("""\
        # Knowledge base

        <!-- nesycd:entry -->
        - id: m1
        - task: logic
        this line is not a field

        <!-- nesycd:key -->
        Key text.

        <!-- nesycd:learning_summary -->
        Summary.
        <!-- nesycd:notes -->
        """))
    with pytest.raises(KnowledgeBaseError) as caught:
        invoke("import", tmp_path / "kb", source)
    message = str(caught.value)
    assert "line 6: expected '- field: value'" in message
    assert "line 13: unknown section 'notes'" in message
    assert "line 3: field 'supplementary_knowledge'" in message


def test_import_keeps_existing_kb(run_dir, tmp_path, embedder):
    source = tmp_path / "bad.jsonl"
    entry = make_entries()[0].to_dict() | {"id": "entry-new", "learning_summary": "New."}
    source.write_text(json.dumps(entry) + "\n" + json.dumps(entry | {"id": "other", "task": ""}) + "\n")
    with pytest.raises(KnowledgeBaseError, match="line 2"):
        invoke("import", run_dir, source)
    assert sorted(stored(run_dir / "kb", embedder)) == ["entry-a", "entry-b", "entry-c"]


def write_editor(tmp_path, replacements):
    script = tmp_path / "editor.py"
    script.write_text(
        "import pathlib, sys\n"
        "path = pathlib.Path(sys.argv[1])\n"
        "text = path.read_text()\n"
        f"for old, new in {replacements!r}:\n"
        "    text = text.replace(old, new)\n"
        "path.write_text(text)\n"
    )
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}"


def test_edit_reembeds_and_records(run_dir, tmp_path, embedder):
    editor = write_editor(tmp_path, [(ENTRIES[1][3], "Edited lesson."),
                                     ("True or False and not True is", "Which planet has the largest moon?")])
    output = invoke("edit", run_dir, "entry-b", env={"EDITOR": editor, "VISUAL": ""})
    assert "Updated entry entry-b" in output
    entries = stored(run_dir / "kb", embedder)
    assert entries["entry-b"].learning_summary == "Edited lesson."
    assert entries["entry-b"].source_example_id == "ex-entry-b"
    hits = json.loads(invoke("search", run_dir, "largest moon of a planet", "--k", "1", "--json"))
    assert hits[0]["id"] == "entry-b"
    _, rows = query_file(run_dir / "traces.duckdb", "select stage, learning_summary from kb_entries where entry_id = 'entry-b' order by created_at")
    assert rows[-1] == ("kb_edit", "Edited lesson.")


def test_edit_rejects_invalid(run_dir, tmp_path, embedder):
    editor = write_editor(tmp_path, [("- task: logic", "- task: logic\n- colour: blue")])
    with pytest.raises(KnowledgeBaseError, match="unknown field"):
        invoke("edit", run_dir, "entry-a", env={"EDITOR": editor, "VISUAL": ""})
    assert stored(run_dir / "kb", embedder)["entry-a"].learning_summary == ENTRIES[0][3]


def test_edit_unchanged(run_dir, tmp_path):
    editor = write_editor(tmp_path, [])
    assert "No change" in invoke("edit", run_dir, "entry-a", env={"EDITOR": editor, "VISUAL": ""})


def test_delete_records(run_dir, embedder):
    assert "2 entries remain" in invoke("delete", run_dir, "entry-a")
    assert "entry-a" not in stored(run_dir / "kb", embedder)
    _, rows = query_file(run_dir / "traces.duckdb", "select status from kb_entries where stage = 'kb_delete'")
    assert rows == [("deleted",)]


def test_rebuild_replays_changes(run_dir, tmp_path, embedder):
    editor = write_editor(tmp_path, [(ENTRIES[1][3], "Edited lesson.")])
    invoke("edit", run_dir, "entry-b", env={"EDITOR": editor, "VISUAL": ""})
    invoke("delete", run_dir, "entry-c")
    output = invoke("rebuild", run_dir, "--collection", "kb_v2")
    assert "2 entries from 2 recorded" in output
    rebuilt = stored(run_dir / "kb", embedder, collection="kb_v2")
    assert sorted(rebuilt) == ["entry-a", "entry-b"]
    assert rebuilt["entry-b"].learning_summary == "Edited lesson."
    assert rebuilt["entry-a"].key == ENTRIES[0][2]


def test_rebuild_after_lost_kb(run_dir, embedder):
    import shutil

    shutil.rmtree(run_dir / "kb")
    invoke("rebuild", run_dir)
    assert sorted(stored(run_dir / "kb", embedder)) == ["entry-a", "entry-b", "entry-c"]


def test_stats_counts(run_dir):
    rows = json.loads(invoke("stats", run_dir, "--json"))
    by_key = {(row["entry_id"], row["model_label"]): row for row in rows}
    assert len(rows) == 6
    first = by_key[("entry-a", "nesycd")]
    assert first["times_retrieved"] == 3
    assert first["times_inserted"] == 2
    assert first["predictions_using"] == 2
    assert first["accuracy_using"] == pytest.approx(0.5)
    assert first["task_accuracy"] == pytest.approx(2 / 3)
    assert first["accuracy_difference"] == pytest.approx(0.5 - 2 / 3)
    assert by_key[("entry-b", "nesycd")]["accuracy_using"] is None
    assert by_key[("entry-c", "nesycd")]["times_inserted"] == 1
    assert by_key[("entry-a", "base")]["predictions_using"] == 0
    assert by_key[("entry-a", "base")]["task_accuracy"] == pytest.approx(0.0)


def test_stats_table(run_dir):
    output = invoke("stats", run_dir, "--label", "nesycd")
    assert "acc_used" in output
    assert "base" not in output


def test_view_matches_query(run_dir):
    trace = run_dir / "traces.duckdb"
    TraceStore(trace).close()
    _, from_view = query_file(trace, "select * from kb_entry_usage")
    _, from_query = query_file(trace, ENTRY_USAGE_SQL)
    assert from_view == from_query
    assert len(from_view) == 6


def test_kb_url_unreachable(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(KnowledgeBaseError, match=f"127.0.0.1:{port}"):
        invoke("list", "-", "--kb-url", f"http://127.0.0.1:{port}")


def test_import_error_exit_code(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"task": "t"}\n')
    result = subprocess.run(
        [sys.executable, "-m", "nesycd.cli.main", "kb", "import", str(tmp_path / "kb"), str(source)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    assert "line 1: field 'learning_summary'" in result.stderr
    assert "Traceback" not in result.stderr


def test_list_compiled_folder(run_dir, tmp_path):
    import shutil

    compiled = tmp_path / "compiled"
    compiled.mkdir()
    shutil.copytree(run_dir / "kb", compiled / "store")
    manifest = {"kb": {"path": "store", "collection": "nesycd_kb"}, "embedder": {"model": None}}
    (compiled / "manifest.json").write_text(json.dumps(manifest))
    assert "3 of 3 entries" in invoke("list", compiled)


def test_list_missing_collection(run_dir):
    with pytest.raises(KnowledgeBaseError) as caught:
        invoke("list", run_dir, "--collection", "kb_v7")
    assert "kb_v7" in str(caught.value)
    assert "nesycd_kb" in str(caught.value)
