-- The single-node writer's fencing token. A single-node instance holds a session advisory
-- lock on the database for its life and, once it has it, takes the next token; every
-- flush it makes checks the token inside its transaction. So a second single-node
-- instance refuses to start while the first holds the lock, and an instance that lost its
-- lock (its session died) and was replaced can no longer commit a flush.
CREATE TABLE single_writer (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    token bigint NOT NULL CHECK (token >= 0)
);
INSERT INTO single_writer (id, token) VALUES (true, 0);
