-- Tables of this project. `flux dev` runs this file at start ([dev] setup_sql in flux.toml);
-- against another database run it yourself: psql "$FLUX_DATABASE_URL" -f schema.sql
-- Keep it idempotent: it runs on every start.
CREATE TABLE IF NOT EXISTS users (
    id              bigserial PRIMARY KEY,
    email           text UNIQUE NOT NULL,
    plan            text NOT NULL DEFAULT 'free',
    stripe_customer text,
    created_at      timestamptz DEFAULT now()
);
