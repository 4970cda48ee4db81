-- Migrate a version 1 trace file to version 2: stage attempts, module spans, scores and resume counters.
-- The schema file then creates the spans table and replaces the views.
ALTER TABLE runs ADD COLUMN IF NOT EXISTS attempts BIGINT;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS resumed_at TIMESTAMP;
ALTER TABLE lm_calls ADD COLUMN IF NOT EXISTS stage_id VARCHAR;
ALTER TABLE lm_calls ADD COLUMN IF NOT EXISTS span_id VARCHAR;
ALTER TABLE retrievals ADD COLUMN IF NOT EXISTS stage_id VARCHAR;
ALTER TABLE retrievals ADD COLUMN IF NOT EXISTS span_id VARCHAR;
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS stage_id VARCHAR;
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS score DOUBLE;
ALTER TABLE failures ADD COLUMN IF NOT EXISTS stage_id VARCHAR;
ALTER TABLE kb_entries ADD COLUMN IF NOT EXISTS stage_id VARCHAR;
ALTER TABLE finetune_jobs ADD COLUMN IF NOT EXISTS stage_id VARCHAR;
ALTER TABLE finetune_jobs ADD COLUMN IF NOT EXISTS resumed_from_step BIGINT;
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS stage_id VARCHAR;
UPDATE runs SET attempts = 1;
UPDATE schema_version SET version = 2;
