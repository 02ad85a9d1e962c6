-- wrk script: send pre-signed requests from a file, each thread its own share of the lines.
-- Arguments (after --): <requests file> <threads> [<requests/s per thread>, 0 = flat out]
-- Each line of the file is "<signature>\t<body>", or "<signature>\t<body>\t<key>" for an
-- idempotency-key source (sent as its Idempotency-Key header). A run that sends more
-- requests than the file holds wraps around (reported as "wrapped"), so the bench sizes
-- the files.
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } timespec;
  int clock_gettime(int clk_id, timespec *tp);
]]
local ts = ffi.new("timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  local file, nthreads = args[1], tonumber(args[2])
  rate = tonumber(args[3] or "0")
  requests, idx, sent, wrapped = {}, 0, 0, 0
  local i = 0
  for line in io.lines(file) do
    if i % nthreads == tid then
      local sig, body, key = line:match("^([^\t]*)\t([^\t]*)\t?(.*)$")
      local headers = { ["Content-Type"] = "application/json", ["X-Signature"] = sig }
      if key ~= "" then headers["Idempotency-Key"] = key end
      requests[#requests + 1] = wrk.format("POST", wrk.path, headers, body)
    end
    i = i + 1
  end
  if rate > 0 then
    -- Constant-rate mode: the thread keeps one schedule of send times and each request
    -- waits for the next slot; a late slot goes at once (backlog capped at one second).
    -- Defined here because wrk only paces requests when a delay() function exists.
    local interval = 1000 / rate
    local next_at = nil
    delay = function()
      local t = now_ms()
      if next_at == nil or next_at < t - 1000 then next_at = t end
      local wait = next_at - t
      next_at = next_at + interval
      if wait < 0 then return 0 end
      return wait
    end
  end
end

function request()
  idx = idx + 1
  if idx > #requests then
    idx = 1
    wrapped = wrapped + 1
  end
  sent = sent + 1
  return requests[idx]
end

function done(summary, latency, reqs)
  local w = 0
  for _, thread in ipairs(threads) do
    w = w + (thread:get("wrapped") or 0)
  end
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}, "wrapped": %d}\n',
    summary.requests, summary.duration, summary.bytes,
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, w))
  -- The latency histogram itself (microseconds:count, the non-empty buckets), so that the
  -- bench can pool several runs' requests and take one percentile over all of them.
  local buckets = {}
  for i = 1, #latency do
    local value, count = latency(i)
    buckets[#buckets + 1] = string.format("%d:%d", value, count)
  end
  io.write("BENCH_HIST " .. table.concat(buckets, " ") .. "\n")
end
