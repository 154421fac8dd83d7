-- How many flushes have committed, counted by every flush in the same update that raises
-- the high-water mark. In Redis mode, Redis keeps the count of the latest flush it
-- acknowledged: a database whose count is below it has lost flushes whose dirty marks
-- Redis has already cleared (restored from an older backup, failed over to a replica that
-- lagged), and the flusher writes the widgets it lost again from Redis.
ALTER TABLE version_high_water ADD COLUMN flushes bigint NOT NULL DEFAULT 0
    CHECK (flushes >= 0);
