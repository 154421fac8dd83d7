-- Every flush counts itself, in the same update that raises the high-water mark (which
-- serialises the commits), and a Redis-mode flush logs its count with an id of its own.
-- Redis keeps the counts and ids of the latest flushes it acknowledged: a database that
-- lacks one of them, or holds another flush under its count, has gone back in time
-- (restored from an older backup, failed over to a replica that lagged) and lost
-- flushes whose dirty marks Redis has already cleared; the flusher then writes the widgets
-- it lost again from Redis. The log keeps the last 10,000 flushes.
ALTER TABLE version_high_water ADD COLUMN flushes bigint NOT NULL DEFAULT 0
    CHECK (flushes >= 0);
CREATE TABLE flush_log (
    flushes bigint PRIMARY KEY CHECK (flushes > 0),
    id bigint NOT NULL
);
