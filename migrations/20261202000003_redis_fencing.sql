-- The highest version any flush has committed (and any row held when this table was
-- added). In Redis mode, a flush is acknowledged to Redis only if Redis's version counter
-- has reached it: a Redis that went back in time (an older snapshot, a lagging replica)
-- fails the check, nothing is acknowledged, and the instance checks Redis again.
CREATE TABLE version_high_water (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    version bigint NOT NULL CHECK (version >= 0)
);
INSERT INTO version_high_water (id, version)
SELECT true, GREATEST(
    (SELECT COALESCE(max(version), 0) FROM widgets),
    (SELECT COALESCE(max(version), 0) FROM widget_tombstones),
    (SELECT COALESCE(max(version), 0) FROM associations_p),
    (SELECT COALESCE(max(version), 0) FROM associations_r),
    (SELECT COALESCE(max(version), 0) FROM associations_q));

-- Redis mode's fencing epoch. An instance raises it whenever it starts trusting a Redis
-- server it had not checked, and whenever Redis is loaded again from PostgreSQL; Redis
-- keeps the epoch it was checked or loaded under, and every flush carries the epoch of
-- its take and commits only while it is still the current one (read FOR SHARE, so a
-- raise waits for the flushes in flight). So a batch taken from a server before a
-- failover or a reload can never commit after it.
CREATE TABLE redis_epoch (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    epoch bigint NOT NULL CHECK (epoch >= 0)
);
INSERT INTO redis_epoch (id, epoch) VALUES (true, 0);
