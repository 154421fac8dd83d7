-- The version at which each deleted widget was deleted, so a flusher that is slower than
-- another (several instances in Redis mode) can never bring a deleted widget back by
-- writing an older state of it: widget upserts skip serials tombstoned at a newer version.
CREATE TABLE widget_tombstones (
    serial_number text PRIMARY KEY,
    version bigint NOT NULL CHECK (version >= 0)
);
