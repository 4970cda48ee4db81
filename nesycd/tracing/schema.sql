-- Trace store schema, version 2. One DuckDB file contains the trace of one compile run.
-- Timestamps are UTC without a time zone. JSON columns hold text written by json.dumps.
-- When a table or column changes, raise SCHEMA_VERSION in store.py and the value inserted below.

CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL
);

INSERT INTO schema_version SELECT 2 WHERE NOT EXISTS (SELECT 1 FROM schema_version);

CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    program VARCHAR,
    command VARCHAR,
    config JSON,
    status VARCHAR,
    started_at TIMESTAMP,
    finished_at TIMESTAMP,
    nesycd_version VARCHAR,
    python_version VARCHAR,
    hostname VARCHAR,
    pid BIGINT,
    attempts BIGINT,         -- 1 for a fresh run, +1 each time `nesycd compile` resumes it
    resumed_at TIMESTAMP
);

CREATE TABLE IF NOT EXISTS stages (
    stage_id VARCHAR PRIMARY KEY,
    run_id VARCHAR,
    name VARCHAR,
    status VARCHAR,          -- 'running', 'succeeded', 'failed', 'interrupted' (killed), or 'reused' (outputs of an earlier attempt)
    fingerprint VARCHAR,     -- hash of the stage's inputs and settings; a resume reuses a stage whose hash matches
    started_at TIMESTAMP,
    finished_at TIMESTAMP,
    seconds DOUBLE,
    counts JSON,
    error VARCHAR
);

CREATE TABLE IF NOT EXISTS lm_calls (
    call_id VARCHAR,
    run_id VARCHAR,
    stage VARCHAR,
    role VARCHAR,            -- 'teacher', 'student', ... or 'unknown'
    model VARCHAR,
    messages JSON,
    params JSON,             -- temperature, max_tokens and stop only
    output VARCHAR,
    prompt_tokens BIGINT,
    completion_tokens BIGINT,
    latency_s DOUBLE,
    cache_hit BOOLEAN,
    error VARCHAR,
    thread VARCHAR,
    created_at TIMESTAMP,
    stage_id VARCHAR,        -- the stage attempt (stages.stage_id) that made the call
    span_id VARCHAR          -- the module call (spans.span_id) that made the call
);

-- One row per DSPy module call (programs, predictors, retrievers). parent_id is the enclosing
-- module call's span_id, or the stage_id for a top-level call.
CREATE TABLE IF NOT EXISTS spans (
    span_id VARCHAR,
    parent_id VARCHAR,
    run_id VARCHAR,
    stage VARCHAR,
    stage_id VARCHAR,
    kind VARCHAR,            -- 'module'
    name VARCHAR,            -- the module's class name
    started_at TIMESTAMP,
    seconds DOUBLE,
    error VARCHAR,
    created_at TIMESTAMP
);

CREATE TABLE IF NOT EXISTS retrievals (
    retrieval_id VARCHAR,
    run_id VARCHAR,
    stage VARCHAR,
    query VARCHAR,
    task VARCHAR,
    k BIGINT,
    hits JSON,               -- list of {entry_id, score, rank}, rank 1 is the best hit
    inserted JSON,           -- ids of the entries inserted into the knowledge base by this call
    retrieved BOOLEAN,       -- adaptive retrieval only: whether the confidence gate let it retrieve
    confidence DOUBLE,       -- adaptive retrieval only: the student's confidence, 0 to 100
    latency_s DOUBLE,
    error VARCHAR,
    created_at TIMESTAMP,
    stage_id VARCHAR,
    span_id VARCHAR
);

CREATE TABLE IF NOT EXISTS predictions (
    prediction_id VARCHAR,
    run_id VARCHAR,
    stage VARCHAR,
    model_label VARCHAR,
    example_id VARCHAR,
    task VARCHAR,
    question VARCHAR,
    output VARCHAR,
    answer VARCHAR,
    gold VARCHAR,
    correct BOOLEAN,
    knowledge JSON,
    knowledge_ids JSON,
    created_at TIMESTAMP,
    stage_id VARCHAR,
    score DOUBLE             -- the metric's value; 1.0 or 0.0 for a boolean metric
);

CREATE TABLE IF NOT EXISTS failures (
    failure_id VARCHAR,
    run_id VARCHAR,
    stage VARCHAR,
    example_id VARCHAR,
    task VARCHAR,
    kind VARCHAR,
    question VARCHAR,
    output VARCHAR,
    gold VARCHAR,
    detail VARCHAR,
    created_at TIMESTAMP,
    stage_id VARCHAR
);

CREATE TABLE IF NOT EXISTS kb_entries (
    entry_id VARCHAR,
    run_id VARCHAR,
    stage VARCHAR,
    failure_id VARCHAR,
    example_id VARCHAR,
    task VARCHAR,
    learning_summary VARCHAR,
    supplementary_knowledge VARCHAR,
    key_text VARCHAR,
    teacher_model VARCHAR,
    embedder VARCHAR,
    collection VARCHAR,
    status VARCHAR,
    created_at TIMESTAMP,
    stage_id VARCHAR
);

CREATE TABLE IF NOT EXISTS finetune_jobs (
    job_id VARCHAR,
    run_id VARCHAR,
    stage VARCHAR,
    base_model VARCHAR,
    adapter_path VARCHAR,
    adapter_sha256 VARCHAR,
    n_rows BIGINT,
    rows_by_view JSON,
    loss_weights JSON,
    config JSON,
    loss_curve JSON,
    train_seconds DOUBLE,
    status VARCHAR,
    error VARCHAR,
    created_at TIMESTAMP,
    stage_id VARCHAR,
    resumed_from_step BIGINT -- the checkpoint step an interrupted job restarted from, NULL for a fresh job
);

CREATE TABLE IF NOT EXISTS evaluations (
    run_id VARCHAR,
    stage VARCHAR,
    model_label VARCHAR,
    task VARCHAR,
    n BIGINT,
    correct BIGINT,
    accuracy DOUBLE,
    created_at TIMESTAMP,
    stage_id VARCHAR
);

-- Views. They are replaced on every open, so a change here needs no SCHEMA_VERSION bump.

-- Per knowledge entry and model_label: how often the entry was retrieved and inserted, and the
-- accuracy of that label's predictions that used it next to the label's accuracy on the entry's task.
-- The same query is ENTRY_USAGE_SQL in nesycd/knowledge/usage.py; a test checks that both agree.
CREATE OR REPLACE VIEW kb_entry_usage AS
WITH entries AS (
    SELECT entry_id, arg_min(task, created_at) AS task, arg_max(status, created_at) AS status
    FROM kb_entries
    GROUP BY entry_id
),
retrieved AS (
    SELECT entry_id, count(*) AS times_retrieved
    FROM (SELECT unnest(json_extract_string(hits, '$[*].entry_id')) AS entry_id FROM retrievals WHERE hits IS NOT NULL)
    GROUP BY entry_id
),
inserted AS (
    SELECT entry_id, count(*) AS times_inserted
    FROM (SELECT unnest(json_extract_string(inserted, '$[*]')) AS entry_id FROM retrievals WHERE inserted IS NOT NULL)
    GROUP BY entry_id
),
used AS (
    SELECT model_label, entry_id, count(*) AS predictions_using,
           count(*) FILTER (WHERE correct) AS correct_using
    FROM (
        SELECT model_label, correct, unnest(json_extract_string(knowledge_ids, '$[*]')) AS entry_id
        FROM predictions WHERE knowledge_ids IS NOT NULL
    )
    GROUP BY model_label, entry_id
),
task_accuracy AS (
    SELECT model_label, task, count(*) AS task_predictions,
           avg(CASE WHEN correct THEN 1.0 ELSE 0.0 END) AS task_accuracy
    FROM predictions
    GROUP BY model_label, task
),
labels AS (
    SELECT DISTINCT model_label FROM predictions
    UNION ALL
    SELECT NULL WHERE NOT EXISTS (SELECT 1 FROM predictions)
)
SELECT
    e.entry_id,
    e.task,
    e.status,
    l.model_label,
    coalesce(r.times_retrieved, 0) AS times_retrieved,
    coalesce(i.times_inserted, 0) AS times_inserted,
    coalesce(u.predictions_using, 0) AS predictions_using,
    coalesce(u.correct_using, 0) AS correct_using,
    u.correct_using / u.predictions_using AS accuracy_using,
    t.task_predictions,
    t.task_accuracy,
    u.correct_using / u.predictions_using - t.task_accuracy AS accuracy_difference
FROM entries e
CROSS JOIN labels l
LEFT JOIN retrieved r ON r.entry_id = e.entry_id
LEFT JOIN inserted i ON i.entry_id = e.entry_id
LEFT JOIN used u ON u.entry_id = e.entry_id AND u.model_label IS NOT DISTINCT FROM l.model_label
LEFT JOIN task_accuracy t ON t.task = e.task AND t.model_label IS NOT DISTINCT FROM l.model_label
ORDER BY e.task, e.entry_id, l.model_label;

-- Accuracy per stage, model label and task, from the predictions table.
CREATE OR REPLACE VIEW accuracy_by_stage AS
SELECT
    stage,
    model_label,
    task,
    count(*) AS n,
    count(*) FILTER (WHERE correct) AS correct,
    avg(CASE WHEN correct THEN 1.0 ELSE 0.0 END) AS accuracy
FROM predictions
GROUP BY stage, model_label, task
ORDER BY stage, model_label, task;

-- Calls, tokens and seconds of the teacher per stage. Token counts are NULL for engines that report none.
CREATE OR REPLACE VIEW teacher_tokens_by_stage AS
SELECT
    stage,
    count(*) AS calls,
    count(*) FILTER (WHERE error IS NOT NULL) AS errors,
    sum(prompt_tokens) AS prompt_tokens,
    sum(completion_tokens) AS completion_tokens,
    sum(latency_s) AS seconds
FROM lm_calls
WHERE role = 'teacher'
GROUP BY stage
ORDER BY min(created_at);

-- Failures per stage, kind and task: wrong or unparseable answers, teacher errors, rejected KB entries.
CREATE OR REPLACE VIEW failure_reasons AS
SELECT
    stage,
    kind,
    task,
    count(*) AS failures,
    any_value(detail) AS example_detail
FROM failures
GROUP BY stage, kind, task
ORDER BY failures DESC, stage, kind, task;

-- LM calls from the slowest, with their stage, role, token counts and error.
CREATE OR REPLACE VIEW slowest_lm_calls AS
SELECT
    call_id,
    stage,
    role,
    model,
    latency_s,
    prompt_tokens,
    completion_tokens,
    error,
    created_at
FROM lm_calls
WHERE latency_s IS NOT NULL
ORDER BY latency_s DESC;
