"""The audit log (docs/audit.md): one record per operation that changes something, who ran it, where, with what
(secrets HMAC'd) and how it ended; a SHA-256 hash chain per machine; signed checkpoints of its head.

`chain` writes and reads the chain, `redact` the parameters, `checkpoints` signs (Vault transit or an HMAC),
`verify` names the first bad record, `log` ties them to an operation. The hooks live where commands and flows
start: `primespark.cli.app` (the `AUDITED` table) and `primespark.orchestration.auditing` (the flows' decorator).
"""
