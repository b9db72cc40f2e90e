"""End-to-end load test of the gateway: ``python -m loadtest`` (``make loadtest``).

One machine, no setup: a throwaway PostgreSQL (unless DATABASE_URL is set), the real capture
trigger, ``gateway serve --workers N``, client processes full of aiohttp WebSocket clients,
and writers committing rows at a target rate. Every client checks that it got every event of
its topic exactly once; latency is commit time (written into the row) to receive time.
Results go to ``loadtest/report/`` as JSON and a self-contained HTML page. See
docs/performance.md for what is measured and what the numbers were.
"""
