//! The Lua scripts every Redis mutation and flush step runs as, each one atomic on the
//! server. They are sent with `EVALSHA` and loaded again when Redis answers `NOSCRIPT`
//! (redis-rs's `Script` does both).
//!
//! Keys, under the instance's prefix: `w:<serial>` (hash: `name`, `ports` bitmask,
//! `version`), `c:<serial>` (hash: `p`, `r`, `q` peer serials, a field only while that
//! port is plugged), `dirty` (hash: serial -> `<mark>:<version>`, the widgets PostgreSQL
//! has not caught up with), `l:<serial>` (set: the other widgets of the changes that made
//! a dirty widget dirty, so a flush takes every change whole), `seq` (the version
//! counter), `epoch` (the fencing epoch it was checked or loaded under, see the
//! `redis_epoch` table), `acked` (sorted set: the id of each of the latest flushes
//! acknowledged, scored by its count, see the `flush_log` table) and `lost_flush` (the count
//! of a flush PostgreSQL lost, until a repair), `count` (widgets), `dirty_since`
//! (ms timestamp of when `dirty` last became non-empty), `loaded`, `load_lock` and `loads`
//! (the one-time load from PostgreSQL; a lock whose token starts with `repair-` is a
//! repair's, see [`MARK_LOST`]) and `repairs` (the repairs of a PostgreSQL gone back in
//! time). Scripts build keys from the serials they are given,
//! which is why they need every key on one Redis node (no Cluster across slots).

use redis::Script;
use std::sync::LazyLock;

/// Strings the read scripts give per widget: exists ("1"/"0"), name, ports, version, and
/// the peer on P, R, Q ("" when free). Keep in step with `read_widget_lua`.
pub const WIDGET_FIELDS: usize = 7;
/// Strings TAKE gives per widget: its serial and dirty entry, then the widget's fields.
pub const TAKEN_FIELDS: usize = 2 + WIDGET_FIELDS;

/// A Lua function the read scripts share: appends the [`WIDGET_FIELDS`] strings of widget
/// `s` to `out`.
macro_rules! read_widget_lua {
    () => {
        r#"
local function read_widget(prefix, s, out)
  local w = redis.call('HMGET', prefix .. 'w:' .. s, 'name', 'ports', 'version')
  if w[1] then
    local c = redis.call('HMGET', prefix .. 'c:' .. s, 'p', 'r', 'q')
    for _, v in ipairs({'1', w[1], w[2], w[3], c[1] or '', c[2] or '', c[3] or ''}) do
      table.insert(out, v)
    end
  else
    for _, v in ipairs({'0', '', '', '', '', '', ''}) do table.insert(out, v) end
  end
end
"#
    };
}

/// A Lua function: the `run_id` of the server the script runs on (which a restart or a
/// failover changes).
macro_rules! run_id_lua {
    () => {
        r#"
-- A run_id is 40 hex digits; a plain find costs a tenth of a pattern match.
local function run_id()
  local info = redis.call('INFO', 'server')
  local at = string.find(info, 'run_id:', 1, true)
  return string.sub(info, at + 7, at + 46)
end
"#
    };
}

/// A Lua preamble for the scripts that read or write widgets: they run only on the Redis
/// server this instance trusts (ARGV[1], its `run_id`), and answer {"untrusted", run_id}
/// on any other, before touching a key. See [`super::RedisEngine::check_server`].
macro_rules! trusted_server_lua {
    () => {
        concat!(
            run_id_lua!(),
            r#"
local server = run_id()
if server ~= ARGV[1] then return {'untrusted', server} end
"#
        )
    };
}

/// The server's `run_id`, `seq` ("0" if unset) and whether `loaded` is set ("1"/"0"), in
/// one atomic call. ARGV: prefix.
pub static STATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        run_id_lua!(),
        r#"
local prefix = ARGV[1]
return {
  run_id(),
  redis.call('GET', prefix .. 'seq') or '0',
  tostring(redis.call('EXISTS', prefix .. 'loaded')),
}
"#
    ))
});

/// Reads widgets atomically. ARGV: trusted run_id, prefix, serials... Returns
/// [`WIDGET_FIELDS`] strings per serial, or {"not_loaded"} if Redis has lost its data (no
/// `loaded` key).
pub static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        trusted_server_lua!(),
        read_widget_lua!(),
        r#"
local prefix = ARGV[2]
if redis.call('EXISTS', prefix .. 'loaded') == 0 then return {'not_loaded'} end
local out = {}
for i = 3, #ARGV do
  read_widget(prefix, ARGV[i], out)
end
return out
"#
    ))
});

/// Applies one command's post-images if every widget it read is unchanged (compare and
/// set on versions), bumping their versions and marking them dirty, all atomically.
/// ARGV: trusted run_id, prefix, max dirty, n, then n pairs (serial, version read; "0" = absent), m, then
/// m groups of 8 (serial, "put"/"del", name, ports, peer P, R, Q, mark bits). Returns
/// {"ok", version}, {"conflict", serial}, or {"overloaded", dirty count} when the dirty set
/// is at its limit (PostgreSQL is behind) and the write would add to it, or
/// {"not_loaded"} if Redis has lost its data.
pub static WRITE_IF_UNCHANGED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        trusted_server_lua!(),
        r#"
local prefix = ARGV[2]
if redis.call('EXISTS', prefix .. 'loaded') == 0 then return {'not_loaded'} end
local dirty = prefix .. 'dirty'
local waiting = redis.call('HLEN', dirty)
if waiting >= tonumber(ARGV[3]) then return {'overloaded', tostring(waiting)} end
local i = 4
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local s, expected = ARGV[i], ARGV[i + 1]; i = i + 2
  local current = redis.call('HGET', prefix .. 'w:' .. s, 'version')
  if (current or '0') ~= expected then return {'conflict', s} end
end
local version = redis.call('INCR', prefix .. 'seq')
if waiting == 0 then
  local t = redis.call('TIME')
  redis.call('SET', prefix .. 'dirty_since', tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)))
end
local m = tonumber(ARGV[i]); i = i + 1
local written = {}
for _ = 1, m do
  local s, kind, name, ports, p, r, q, mark = unpack(ARGV, i, i + 7); i = i + 8
  local wk, ck = prefix .. 'w:' .. s, prefix .. 'c:' .. s
  if kind == 'put' then
    if redis.call('EXISTS', wk) == 0 then redis.call('INCR', prefix .. 'count') end
    redis.call('HSET', wk, 'name', name, 'ports', ports, 'version', version)
    redis.call('DEL', ck)
    local peers = {}
    if p ~= '' then table.insert(peers, 'p'); table.insert(peers, p) end
    if r ~= '' then table.insert(peers, 'r'); table.insert(peers, r) end
    if q ~= '' then table.insert(peers, 'q'); table.insert(peers, q) end
    if #peers > 0 then redis.call('HSET', ck, unpack(peers)) end
  else
    if redis.call('DEL', wk) == 1 then redis.call('DECR', prefix .. 'count') end
    redis.call('DEL', ck)
  end
  local bits = tonumber(mark)
  local old = redis.call('HGET', dirty, s)
  if old then bits = bit.bor(bits, tonumber(string.match(old, '^(%d+):'))) end
  redis.call('HSET', dirty, s, bits .. ':' .. version)
  table.insert(written, s)
end
-- The change's footprint: each widget it wrote links to the others, until flushed.
if #written > 1 then
  for a = 1, #written do
    local others = {}
    for b = 1, #written do
      if a ~= b then table.insert(others, written[b]) end
    end
    redis.call('SADD', prefix .. 'l:' .. written[a], unpack(others))
  end
end
return {'ok', tostring(version)}
"#
    ))
});

/// Takes a batch of dirty widgets with their state, atomically: up to ARGV[3] picked at
/// random, and with each every dirty widget linked to it (`l:<serial>`), transitively, so
/// that every change in the batch is there whole (both ends, the freed old peers) and
/// PostgreSQL never commits one side of it. The links can make a batch larger than asked.
/// ARGV: trusted run_id, prefix, count, the highest version PostgreSQL holds. Returns
/// {"paused"} while a repair holds the load lock (see [`MARK_LOST`]), {"behind"} if `seq`
/// is below that version (Redis went back in time), else the server
/// time in ms, "1" if the batch is the whole dirty set (else "0"), "1" if `loaded` is set
/// (else "0": Redis lost its data), the fencing epoch, then [`TAKEN_FIELDS`] strings per
/// widget. Links to widgets no longer dirty are dropped on the way.
pub static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        trusted_server_lua!(),
        read_widget_lua!(),
        r#"
local prefix = ARGV[2]
local lock = redis.call('GET', prefix .. 'load_lock')
if lock and string.sub(lock, 1, 7) == 'repair-' then return {'paused'} end
if tonumber(redis.call('GET', prefix .. 'seq') or '0') < tonumber(ARGV[4]) then
  return {'behind'}
end
local dirty = prefix .. 'dirty'
local picked = redis.call('HRANDFIELD', dirty, tonumber(ARGV[3]))
local seen, taken = {}, {}
for _, s in ipairs(picked) do
  seen[s] = true
  table.insert(taken, s)
end
local i = 1
while i <= #taken do
  local links = prefix .. 'l:' .. taken[i]
  for _, other in ipairs(redis.call('SMEMBERS', links)) do
    -- A linked widget no longer dirty had its side of the change flushed with this one:
    -- the link is dropped, so a widget that never stays clean does not gather links.
    if redis.call('HEXISTS', dirty, other) == 0 then
      redis.call('SREM', links, other)
    elseif not seen[other] then
      seen[other] = true
      table.insert(taken, other)
    end
  end
  i = i + 1
end
local t = redis.call('TIME')
local whole = (#taken == redis.call('HLEN', dirty)) and '1' or '0'
local loaded = tostring(redis.call('EXISTS', prefix .. 'loaded'))
local epoch = redis.call('GET', prefix .. 'epoch') or '0'
local out = {tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)), whole, loaded, epoch}
for _, s in ipairs(taken) do
  table.insert(out, s); table.insert(out, redis.call('HGET', dirty, s))
  read_widget(prefix, s, out)
end
return out
"#
    ))
});

/// After PostgreSQL committed a batch: records the flush's count and id in `acked` (the
/// latest [`ACKED_KEPT`] by count; another id already there under the count sets
/// `lost_flush`: one history of the database lost it), then removes each serial from the dirty set only if its entry is still the
/// one the batch was taken with (nothing changed since). ARGV: prefix, the take's time in
/// ms if the batch held the whole dirty set (else ""), the highest version PostgreSQL
/// holds, the flush's count ("0": not known, nothing recorded) and id, then pairs (serial,
/// entry), each removed with its links. Returns how many it removed; -2 (recording and
/// removing nothing) if the count is below every one `acked` keeps, so that no later round
/// could check it (the entries stay dirty and are written again); or -1 (removing nothing)
/// if `seq` is below that version:
/// Redis went back in time, and entries whose writes PostgreSQL's guards dropped as older
/// must not be taken for written. After a whole-set batch, everything still
/// dirty changed after the take, so `dirty_since` moves up to the take's time.
pub static ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        &r#"
local prefix = ARGV[1]
local count, id = tonumber(ARGV[4]), ARGV[5]
if count > 0 then
  local acked = prefix .. 'acked'
  local same = redis.call('ZRANGEBYSCORE', acked, count, count)
  if #same == 0 then
    if redis.call('ZCARD', acked) >= KEPT then
      local lowest = redis.call('ZRANGE', acked, 0, 0, 'WITHSCORES')
      if count < tonumber(lowest[2]) then return -2 end
    end
    redis.call('ZADD', acked, count, id)
    redis.call('ZREMRANGEBYRANK', acked, 0, -(KEPT + 1))
  end
  for _, other in ipairs(same) do
    if other ~= id then redis.call('SET', prefix .. 'lost_flush', count) end
  end
end
if tonumber(redis.call('GET', prefix .. 'seq') or '0') < tonumber(ARGV[3]) then return -1 end
local dirty = prefix .. 'dirty'
local removed = 0
for i = 6, #ARGV, 2 do
  if redis.call('HGET', dirty, ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', dirty, ARGV[i])
    redis.call('DEL', prefix .. 'l:' .. ARGV[i])
    removed = removed + 1
  end
end
if redis.call('HLEN', dirty) == 0 then
  redis.call('DEL', prefix .. 'dirty_since')
elseif ARGV[2] ~= '' then
  redis.call('SET', prefix .. 'dirty_since', ARGV[2])
end
return removed
"#
        .replace("KEPT", &ACKED_KEPT.to_string()),
    )
});

/// Marks dirty again the widgets a PostgreSQL gone back in time lost, while a repair holds
/// the load lock (so no flush takes anything until every lost widget is marked). ARGV:
/// trusted run_id, prefix, the repair's lock token, a version no dirty entry has yet, then
/// for each widget PostgreSQL holds or Redis holds: its serial, the version PostgreSQL
/// holds ("-1": no row) and its peer there on P, R, Q ("" where free). A widget whose Redis
/// version is above PostgreSQL's, that Redis holds and PostgreSQL does not, or that
/// PostgreSQL holds and Redis has deleted, is marked: its row and every port plugged on
/// either side (with what its entry marked already), at the new version (so no flush taken
/// before can clear it), linked to those peers, so a flush takes it with every lost widget
/// whose association it shares, and PostgreSQL never shows one side. Returns {"ok", how
/// many it marked}, or {"lock_lost"} (marking nothing) if the token no longer holds the
/// lock: the repair stalled past its lease, and the flushes may have gone on.
pub static MARK_LOST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        trusted_server_lua!(),
        r#"
local prefix, fresh = ARGV[2], ARGV[4]
if redis.call('GET', prefix .. 'load_lock') ~= ARGV[3] then return {'lock_lost'} end
local dirty = prefix .. 'dirty'
local marked = 0
for i = 5, #ARGV, 5 do
  local s, pg = ARGV[i], tonumber(ARGV[i + 1])
  local v = redis.call('HGET', prefix .. 'w:' .. s, 'version')
  if (v and tonumber(v) > pg) or (not v and pg >= 0) then
    local c = redis.call('HMGET', prefix .. 'c:' .. s, 'p', 'r', 'q')
    local bits, links = 8, {}
    for k = 1, 3 do
      for _, peer in ipairs({ARGV[i + 1 + k], c[k] or ''}) do
        if peer ~= '' then
          bits = bit.bor(bits, bit.lshift(1, k - 1))
          table.insert(links, peer)
        end
      end
    end
    local old = redis.call('HGET', dirty, s)
    if old then
      bits = bit.bor(bits, tonumber(string.match(old, '^(%d+):')))
    elseif redis.call('HLEN', dirty) == 0 then
      local t = redis.call('TIME')
      redis.call('SET', prefix .. 'dirty_since', tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)))
    end
    redis.call('HSET', dirty, s, bits .. ':' .. fresh)
    if #links > 0 then redis.call('SADD', prefix .. 'l:' .. s, unpack(links)) end
    marked = marked + 1
  end
end
return {'ok', tostring(marked)}
"#
    ))
});

/// Keeps the count of a flush PostgreSQL lost in `lost_flush` until a repair, if `acked`
/// still holds that flush (a repair that forgot it since is not undone). ARGV: prefix,
/// count, id. Returns 1 if it kept it.
pub static RECORD_LOST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local prefix = ARGV[1]
if redis.call('ZSCORE', prefix .. 'acked', ARGV[3]) ~= ARGV[2] then return 0 end
redis.call('SET', prefix .. 'lost_flush', ARGV[2])
return 1
"#,
    )
});

/// Ends a repair, if its token still holds the load lock: forgets `lost_flush`, and
/// `acked` too if ARGV[3] is "1" (after a comparison of every widget, which marked what an
/// acknowledgement during it cleared; not after an epoch raised alone, which marked
/// nothing), and counts the repair in `repairs`. ARGV: prefix, token, forget acked.
/// Returns 1, or 0 (changing nothing) if the lock is another's.
pub static FINISH_REPAIR: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local prefix = ARGV[1]
if redis.call('GET', prefix .. 'load_lock') ~= ARGV[2] then return 0 end
redis.call('DEL', prefix .. 'lost_flush')
if ARGV[3] == '1' then redis.call('DEL', prefix .. 'acked') end
redis.call('INCR', prefix .. 'repairs')
return 1
"#,
    )
});

/// How many of the latest acknowledged flushes `acked` keeps: each flush round checks
/// them all against PostgreSQL's `flush_log`.
pub const ACKED_KEPT: usize = 256;

/// What Redis has acknowledged of PostgreSQL, in one atomic call: the fencing epoch ("0" if
/// unset), `lost_flush` ("" if unset), then for each flush `acked` keeps its id and count.
/// ARGV: prefix.
pub static ACKED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local prefix = ARGV[1]
local out = {redis.call('GET', prefix .. 'epoch') or '0', redis.call('GET', prefix .. 'lost_flush') or ''}
for _, v in ipairs(redis.call('ZRANGE', prefix .. 'acked', 0, -1, 'WITHSCORES')) do
  table.insert(out, v)
end
return out
"#,
    )
});

/// The state gauges in one atomic call. ARGV: prefix. Returns {count, dirty, lag_ms}.
pub static GAUGES: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local prefix = ARGV[1]
local dirty = redis.call('HLEN', prefix .. 'dirty')
local lag = 0
local since = redis.call('GET', prefix .. 'dirty_since')
if dirty > 0 and since then
  local t = redis.call('TIME')
  lag = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(since)
end
return {tonumber(redis.call('GET', prefix .. 'count') or '0'), dirty, lag}
"#,
    )
});

/// Raises the fencing epoch Redis holds to ARGV[2] (never lowers it). ARGV: prefix, epoch.
pub static RAISE_EPOCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local k = ARGV[1] .. 'epoch'
if tonumber(redis.call('GET', k) or '0') < tonumber(ARGV[2]) then redis.call('SET', k, ARGV[2]) end
return 1
"#,
    )
});

/// Writes a batch of PostgreSQL's widgets into Redis during a load, if its loader still
/// holds the lock: a loader that stalled past its lease, while another loaded and writes
/// began, must not write its older rows over them. ARGV: prefix, the loader's lock token,
/// then for each widget its serial, name, ports, version, the number of plugged ports and
/// that many port field and peer pairs. Returns 1, or 0 (changing nothing) if the lock is
/// another loader's.
pub static LOAD_BATCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local prefix = ARGV[1]
if redis.call('GET', prefix .. 'load_lock') ~= ARGV[2] then return 0 end
local i = 3
while i <= #ARGV do
  local serial = ARGV[i]
  redis.call('HSET', prefix .. 'w:' .. serial, 'name', ARGV[i + 1], 'ports', ARGV[i + 2],
    'version', ARGV[i + 3])
  local plugged = tonumber(ARGV[i + 4])
  i = i + 5
  if plugged > 0 then
    redis.call('HSET', prefix .. 'c:' .. serial, unpack(ARGV, i, i + 2 * plugged - 1))
    i = i + 2 * plugged
  end
end
return 1
"#,
    )
});

/// Ends a load from PostgreSQL, if its loader still holds the lock: sets `count` and
/// `loaded`, counts the load, raises `seq` and the fencing epoch (never lowering either).
/// ARGV: prefix, the loader's lock token, widgets loaded, seq floor, epoch. Returns 1, or 0
/// (changing nothing) if the lock is another loader's.
pub static FINISH_LOAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local prefix = ARGV[1]
if redis.call('GET', prefix .. 'load_lock') ~= ARGV[2] then return 0 end
redis.call('SET', prefix .. 'count', ARGV[3])
for _, k in ipairs({'seq', 'epoch'}) do
  local v = ARGV[k == 'seq' and 4 or 5]
  if tonumber(redis.call('GET', prefix .. k) or '0') < tonumber(v) then
    redis.call('SET', prefix .. k, v)
  end
end
redis.call('SET', prefix .. 'loaded', 1)
redis.call('INCR', prefix .. 'loads')
return 1
"#,
    )
});
