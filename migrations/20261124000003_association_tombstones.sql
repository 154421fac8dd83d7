-- A freed port keeps its association row, with no peer and the version that freed it, so
-- a slower flusher's older state of that port (several instances in Redis mode) cannot
-- plug it again: the upsert's version guard needs a row to compare with.
ALTER TABLE associations_p ALTER COLUMN peer_serial_number DROP NOT NULL;
ALTER TABLE associations_r ALTER COLUMN peer_serial_number DROP NOT NULL;
ALTER TABLE associations_q ALTER COLUMN peer_serial_number DROP NOT NULL;
