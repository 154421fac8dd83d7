-- Widgets and their associations, as the flusher writes them behind from the WAL.
-- Constraints repeat the API's value rules, so a bug cannot write garbage here.

CREATE TABLE widgets (
    serial_number text PRIMARY KEY
        CHECK (serial_number ~ '^[A-Za-z0-9._:-]{1,36}$'),
    name text NOT NULL
        CHECK (char_length(name) BETWEEN 1 AND 64 AND name ~ '^[ -~]+$'),
    -- Bitmask of port types: P = 1, R = 2, Q = 4.
    ports smallint NOT NULL CHECK (ports BETWEEN 1 AND 7),
    -- The WAL LSN of the state this row holds; rows only move forward.
    version bigint NOT NULL CHECK (version >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One narrow table per port type, both directions stored, so an association change
-- touches two narrow rows and never the widget row.
CREATE TABLE associations_p (
    serial_number text PRIMARY KEY REFERENCES widgets ON DELETE CASCADE,
    peer_serial_number text NOT NULL CHECK (peer_serial_number <> serial_number),
    version bigint NOT NULL CHECK (version >= 0)
);
CREATE TABLE associations_r (LIKE associations_p INCLUDING ALL);
ALTER TABLE associations_r ADD FOREIGN KEY (serial_number) REFERENCES widgets ON DELETE CASCADE;
CREATE TABLE associations_q (LIKE associations_p INCLUDING ALL);
ALTER TABLE associations_q ADD FOREIGN KEY (serial_number) REFERENCES widgets ON DELETE CASCADE;

-- The WAL LSN every row above is complete up to: written in the same transaction as the
-- rows it covers, so start-up knows exactly where WAL replay begins.
CREATE TABLE checkpoint (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    lsn bigint NOT NULL CHECK (lsn >= 0)
);
INSERT INTO checkpoint (id, lsn) VALUES (true, 0);

-- Changes PostgreSQL refused for a reason a retry cannot fix (a constraint): kept here for
-- an operator, with the error, instead of being dropped or blocking every later flush.
CREATE TABLE flush_rejects (
    id bigserial PRIMARY KEY,
    serial_number text NOT NULL,
    state jsonb,
    error text NOT NULL,
    checkpoint_lsn bigint NOT NULL,
    rejected_at timestamptz NOT NULL DEFAULT now()
);
