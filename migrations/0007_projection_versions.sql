-- The version of each projection's code that built its tables. A newer
-- version in code triggers a blue/green rebuild at start-up.
CREATE TABLE projection_versions (
    projection  text PRIMARY KEY,
    version     integer     NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
