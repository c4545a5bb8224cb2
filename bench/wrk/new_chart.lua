-- POSTs a chart the service has not seen on every request.
--
-- Usage: wrk -s bench/wrk/new_chart.lua URL -- TEMPLATE RUN
-- TEMPLATE is a CDS Hooks call whose JSON holds __PID__ (every occurrence of the patient id: context,
-- Patient.id, subject references), __HOOK__ (hookInstance) and __N__ (digits inside one Observation value).
-- Each request fills them from RUN, the thread's number and a per-thread counter, so no two requests of a
-- bench run (RUN differs per wrk run) carry the same patient, prefetch JSON or content hashes.

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")

local literals, names, tail = {}, {}, ""
local run, counter = 0, 0

function init(args)
   local file = assert(io.open(args[1], "rb"))
   local text = file:read("*a")
   file:close()
   run = tonumber(args[2]) or 0
   -- Split once into literal text and placeholder names, so a request is one table.concat.
   local position = 1
   for start, name, finish in string.gmatch(text, "()__([A-Z]+)__()") do
      table.insert(literals, string.sub(text, position, start - 1))
      table.insert(names, name)
      position = finish
   end
   tail = string.sub(text, position)
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
end

function request()
   counter = counter + 1
   local values = {
      PID = string.format("00000000-%04x-4%03x-8000-%012x", run, thread_number, counter),
      HOOK = string.format("00000000-%04x-4%03x-9000-%012x", run, thread_number, counter),
      N = tostring(counter),
   }
   local parts = {}
   for i = 1, #names do
      parts[2 * i - 1] = literals[i]
      parts[2 * i] = values[names[i]]
   end
   parts[#parts + 1] = tail
   return wrk.format(nil, nil, nil, table.concat(parts))
end
