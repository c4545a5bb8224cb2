-- POSTs the same chart on every request (an EHR reopening a chart, or every service of a hook).
--
-- Usage: wrk -s bench/wrk/same_chart.lua URL -- BODY_FILE
-- The request is built once per thread (no request() function: wrk's static path).

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")

function init(args)
   local file = assert(io.open(args[1], "rb"))
   wrk.body = file:read("*a")
   file:close()
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
end
