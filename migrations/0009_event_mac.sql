-- Each event's HMAC, computed by the service at append with a key the
-- database never holds: rows inserted or edited out of band cannot carry a
-- valid one (checked by `ledger audit verify --db`). Older rows have none.
ALTER TABLE events ADD COLUMN mac text;
