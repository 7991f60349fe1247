-- Tamper evidence in the database itself: a running hash chain over the log
-- in tailing order, written by the sealer (see ARCHITECTURE.md). Each link's
-- hash covers the previous link's hash and the canonical JSON of the event.
CREATE TABLE event_chain (
    position        bigint PRIMARY KEY,
    transaction_id  xid8        NOT NULL,
    hash            text        NOT NULL,
    sealed_at       timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX event_chain_tailing ON event_chain (transaction_id, position);

CREATE TRIGGER event_chain_append_only_rows
    BEFORE UPDATE OR DELETE ON event_chain
    FOR EACH ROW EXECUTE FUNCTION events_are_append_only();

CREATE TRIGGER event_chain_append_only_truncate
    BEFORE TRUNCATE ON event_chain
    FOR EACH STATEMENT EXECUTE FUNCTION events_are_append_only();
