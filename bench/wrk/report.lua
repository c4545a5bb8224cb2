-- Loaded by new_chart.lua (with dofile): numbers the threads, counts answers
-- without a card, and prints one JSON line that bench_hooks.py parses.
--
-- wrk runs every thread in its own Lua state; done() runs in the main one and reads the threads' counters.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("thread_number", #threads)
end

no_card = 0

function response(status, headers, body)
   -- Every card has a summary; a 200 without one means the rule card was lost.
   if status == 200 and not string.find(body, '"summary"', 1, true) then
      no_card = no_card + 1
   end
end

function done(summary, latency, requests)
   local missing = 0
   for _, thread in ipairs(threads) do
      missing = missing + (thread:get("no_card") or 0)
   end
   local errors = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,'
         .. '"status":%d,"timeout":%d,"no_card":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d,'
         .. '"max_us":%d,"mean_us":%.1f}\n',
      summary.requests, summary.duration, summary.bytes, errors.connect, errors.read, errors.write,
      errors.status, errors.timeout, missing, latency:percentile(50), latency:percentile(95),
      latency:percentile(99), latency.max, latency.mean))
end
