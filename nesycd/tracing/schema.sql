-- Trace store schema, version 1. One DuckDB file contains the trace of one compile run.
-- Timestamps are UTC without a time zone. JSON columns hold text written by json.dumps.
-- When a table or column changes, raise SCHEMA_VERSION in store.py and the value inserted below.

CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL
);

INSERT INTO schema_version SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM schema_version);

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
    pid BIGINT
);

CREATE TABLE IF NOT EXISTS stages (
    stage_id VARCHAR PRIMARY KEY,
    run_id VARCHAR,
    name VARCHAR,
    status VARCHAR,          -- 'running', 'succeeded' or 'failed'
    fingerprint VARCHAR,
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
    latency_s DOUBLE,
    error VARCHAR,
    created_at TIMESTAMP
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
    created_at TIMESTAMP
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
    created_at TIMESTAMP
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
    created_at TIMESTAMP
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
    created_at TIMESTAMP
);

CREATE TABLE IF NOT EXISTS evaluations (
    run_id VARCHAR,
    stage VARCHAR,
    model_label VARCHAR,
    task VARCHAR,
    n BIGINT,
    correct BIGINT,
    accuracy DOUBLE,
    created_at TIMESTAMP
);
