-- The identity of the history this database belongs to, shared with the single-node
-- instance's WAL (`<data dir>/wal/IDENTITY`): a WAL and a store from different histories
-- refuse to start together instead of mixing silently.
CREATE TABLE store_identity (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    identity text NOT NULL CHECK (identity ~ '^[0-9a-f]{32}$')
);
