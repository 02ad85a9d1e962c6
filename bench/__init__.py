"""``make bench``: the receiver against a bare Flask+psycopg2 baseline, side by side.

``python -m bench.run`` (see ``docs/performance.md``) creates a fresh database,
starts both servers under identical gunicorn settings, drives them with wrk and
writes ``bench/results/`` and ``docs/performance.md``.
"""
