"""``trustmesh audit …`` (DESIGN §6, §7): the tamper-evident audit log from the command
line. ``verify`` (verify, checkpoint, proof) checks the log and trusts only its verifier
key; ``query`` (query, trace, sources) reads it; ``_shared`` holds the client, key and
checkpoint helpers both use. Reading a stored log straight from the database is not
done here but in :mod:`trustmesh.audit.offline`.
"""

from __future__ import annotations

import typer

from trustmesh.cli.audit import query, verify

audit_app = typer.Typer(
    help="The tamper-evident audit log: verify it, its checkpoints and proofs; query it.",
    no_args_is_help=True,
)
audit_app.command("verify")(verify.verify)
audit_app.command("checkpoint")(verify.checkpoint)
audit_app.command("proof")(verify.proof)
audit_app.command("query")(query.query)
audit_app.command("trace")(query.trace)
audit_app.command("sources")(query.sources)

__all__ = ["audit_app"]
