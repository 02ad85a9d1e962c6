"""The store: every statement idemhook runs, in modules named for their tables.

The engine's modules (the claim, the key operation, the worker's applier and sender, the
worker's loop) decide what to do; the statements that do it live here, so that no
module of policy holds SQL text (docs/development.md, "Layers").
"""
