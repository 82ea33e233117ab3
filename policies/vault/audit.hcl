# What an audit writer (the controller's `spark`, a site's worker) needs for its checkpoints: sign and verify with
# the fleet's transit key primespark-audit-<fleet>, and read its public part. Nothing here exports the key (it is
# made with exportable=false, so no token can), rotates it, or changes its config; the deployer's token (or the
# lab's root token) enables the transit engine and makes the key the first time (primespark.audit.checkpoints).
path "transit/sign/primespark-audit-*" {
  capabilities = ["update"]
}
path "transit/verify/primespark-audit-*" {
  capabilities = ["update"]
}
path "transit/keys/primespark-audit-*" {
  capabilities = ["read"]
}
