-- The Lua rows of `cargo xtask bench` (xtask/src/bench/nginx.rs): the
-- work a small Lua endpoint does per request. It builds a record of 20
-- fields and a few strings, renders it with concatenation, answers with
-- it, and keeps it in a cache bounded to CAPACITY entries (the oldest is
-- evicted), so the collector has steady work and nothing leaks.
--
-- Loaded once per worker by `require`, so the cache lives as long as the
-- worker's Lua VM.

local CAPACITY = 1000
local FIELDS = 20

local M = {}

local cache = {}
-- Keys in insertion order, a ring of CAPACITY slots.
local ring = {}
local served = 0
local hits = 0

function M.handle()
    served = served + 1
    local n = served
    local record = {
        id = "req-" .. n,
        method = ngx.req.get_method(),
        uri = ngx.var.uri,
        worker = ngx.worker.pid(),
    }
    for i = 1, FIELDS do
        record[i] = (n * 31 + i * 7) % 100003
    end
    local parts = { record.method, " ", record.uri, " ", record.id }
    for i = 1, FIELDS do
        parts[#parts + 1] = " f" .. i .. "=" .. record[i]
    end
    local body = table.concat(parts)
    record.body = body

    -- A request for something seen a little earlier: a hit while it is
    -- still cached.
    local earlier = "req-" .. (n - (n * 7919) % (2 * CAPACITY))
    if cache[earlier] then
        hits = hits + 1
    end

    local slot = n % CAPACITY + 1
    local old = ring[slot]
    if old then
        cache[old] = nil
    end
    ring[slot] = record.id
    cache[record.id] = record

    ngx.say(body, " hits=", hits)
end

return M
