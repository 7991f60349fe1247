-- Attempts whose password check is still running count against the limit,
-- so a burst of parallel guesses cannot all pass the check at once.
ALTER TABLE login_throttle ADD COLUMN pending integer NOT NULL DEFAULT 0;
